"""experiments.py: the measurements beside the table (rows.EXPERIMENTS).

Each writes raw figures into record["experiments"][name]; analysis.py turns
them into the report's figures.  A setup whose setting the code under test
does not know is recorded as not run, with the reason.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import rows
import sampling
from servers import PYTHON, ROOT, SERVERS, VENV, Running, http_get, molds, resolve, run, warm_up
from stack import Load
from support import Process, cpu_seconds, family, memory, resident, wait_until

SPECS = rows.EXPERIMENTS
KiB = 1024


def run_all(stage, record, save):
    """Every experiment, or those BENCH_EXPERIMENTS=name,name names (while developing)."""
    only = [name for name in os.environ.get("BENCH_EXPERIMENTS", "").split(",") if name]
    for name, experiment in (("freeze_memory", freeze_memory), ("mold_memory", mold_memory), ("handoff", handoff),
                             ("only_worker_killed", only_worker_killed), ("recycle_cpu", recycle_cpu),
                             ("config_set_cpu", config_set_cpu), ("launcher", launcher_handoffs)):
        if only and name not in only:
            record["experiments"][name] = {}
            continue
        started = time.time()
        record["experiments"][name] = experiment(stage)
        record["experiment_seconds"][name] = round(time.time() - started, 1)
        print("bench event=experiment name=%s wall_s=%s" % (name, record["experiment_seconds"][name]),
              file=sys.stderr, flush=True)
        save(record)


def ours(stage, name, args=(), env=None, nginx=True):
    """Ours under spawn-fcgi with ARGS and ENV as a pseudo-row: (Running, note), or (None, reason)."""
    row = {"name": name, "server": "ours", "args": list(args), "env": dict(env or {}), "nginx": "shipped"}
    run_args, run_env, note = resolve(row, stage.known)
    if run_args is None:
        return None, note
    running = Running.of_row(stage, row, name, run_args, run_env)
    try:
        if nginx:
            warm_up(stage.front("shipped"), rows.cycle(rows.MIX))
    except BaseException:
        running.stop()
        raise
    return running, note


MOLD = {"mold": ["--mold", "on"], "cold": ["--mold", "off"]}


def counted_load(stage, paths, requests, clients=8, front="shipped"):
    """Closed loop until REQUESTS answers: the answers (stack.Load keeps every one)."""
    nginx = stage.front(front)
    work = Load(nginx.port, paths, clients, timeout=60)
    return work.run(lambda _: len(work.answers) >= requests, max_seconds=600)


def settle(running, workers, timeout=60):
    """Wait until no replacement is warming: WORKERS workers again."""
    wait_until(lambda: len(running.workers()) == workers, timeout, "%d workers" % workers)


# --------------------------------------------------------------------------

def freeze_memory(stage):
    """Many requests over the page mix under the default memory limits, gc.freeze on and off.

    Both run at once, each behind its own nginx, so that both see the same
    machine: what is compared is memory per request, not speed.
    """
    spec, found, runs = SPECS["freeze_memory"], {}, {}
    try:
        for setting, env in spec["settings"].items():
            side = stage.twin("freeze-" + setting)
            running, note = ours(side, "freeze-" + setting, env=env, nginx=False)
            if running is None:
                found[setting] = {"not_run": note}
                continue
            runs[setting] = (side, running, note)
        for side, running, _ in runs.values():
            warm_up(side.front("shipped"), rows.cycle(spec["mix"]))
        with ThreadPoolExecutor(len(runs) or 1) as pool:
            loads = {setting: pool.submit(freeze_load, spec, *run) for setting, run in runs.items()}
            found.update((setting, load.result()) for setting, load in loads.items())
    finally:
        for side, running, _ in runs.values():
            running.stop()
            side.stop()
    return found


def freeze_load(spec, side, running, note):
    """One side of freeze_memory: its raw figures."""
    sampler = sampling.Sampler(running, rows.SAMPLE_EVERY_S)
    sampler.start()
    started, clock = time.time(), time.monotonic()
    work = counted_load(side, rows.cycle(spec["mix"]), spec["requests"], spec["clients"])
    ended = time.time()
    samples = sampler.stop()
    return {
        "note": note, "requests": len(work.answers), "failed": len(work.failures()),
        "seconds": round(work.seconds, 2),
        "answered_at": sorted(round(a.started + a.latency - clock, 2) for a in work.answers),
        "samples": [[round(t - started, 2)] + rest for t, *rest in samples],
        "recycles": [round(t - started, 2) for t in running.recycles(started, ended)],
        "worker_lines": [line for _, line in running.lines()
                         if re.search(r"event=(warm|freeze|recycle)\b", line)][:40]}


def mold_memory(stage):
    """RSS, PSS and private memory of every process under the server, N workers, after load."""
    spec, found = SPECS["mold_memory"], []
    for workers in spec["workers"]:
        for setup in spec["setups"]:
            if setup == "uwsgi":
                if not (VENV / "uwsgi").exists():
                    found.append({"setup": setup, "workers": workers, "not_run": "uWSGI is not installed"})
                    continue
                running = Running(stage, "uwsgi", stage_uwsgi(stage, workers), {}, "memory-uwsgi-%d" % workers)
                note = None
            elif setup == "mod_wsgi":
                # WSGIDaemonProcess processes=N: each loads Trac itself, as it starts.
                running = Running(stage, "mod_wsgi", SERVERS["mod_wsgi"].command(stage, [], processes=workers), {},
                                  "memory-mod_wsgi-%d" % workers)
                note = None
            else:
                running, note = ours(stage, "memory-%s-%d" % (setup, workers),
                                     MOLD[setup] + ["--workers", str(workers)], rows.NEVER_HIT)
                if running is None:
                    found.append({"setup": setup, "workers": workers, "not_run": note})
                    continue
            front = "apache" if setup == "mod_wsgi" else "shipped"
            try:
                warm_up(stage.front(front), rows.cycle(rows.MIX))
                settle(running, workers)
                answers = counted_load(stage, rows.cycle(rows.MIX), workers * spec["requests_per_worker"],
                                       front=front).answers
                time.sleep(0.5)
                serving, mold = set(running.workers()), molds(running.lines())
                processes = []
                for pid in family(running.root):
                    # Apache's own processes are mod_wsgi's front, as nginx is ours: not counted.
                    role = ("worker" if pid in serving else "front" if setup == "mod_wsgi"
                            else "launcher" if pid == running.root and setup != "uwsgi"
                            else "master" if pid == running.root else "mold" if pid in mold else "other")
                    processes.append(dict(memory(pid), pid=pid, role=role, command=sampling.command(pid)))
                found.append({"setup": setup, "workers": workers, "note": note, "requests": len(answers),
                              "processes": processes})
            finally:
                running.stop()
    return {"configurations": found}


def stage_uwsgi(stage, processes):
    """uWSGI with PROCESSES workers, the app loaded once in its master and forked (its default, preload)."""
    return SERVERS["uwsgi"].command(stage, [], processes=processes)


def handoff(stage):
    """SIGUSR1 to the launcher, to the replacement's READY=1 (its event=ready line), mold on and off."""
    found = {}
    for setup in SPECS["handoff"]["setups"]:
        row = {"name": "handoff-" + setup, "server": "ours", "args": MOLD[setup], "env": rows.NEVER_HIT}
        args, env, note = resolve(row, stage.known)
        if args is None:
            found[setup] = {"not_run": note}
            continue
        sock = stage.work / "handoff.sock"
        process = Process([PYTHON, str(ROOT / "launcher.py"), "--bind", "unix:%s" % sock] + args
                          + ["--", str(VENV / "trac-fcgi")], stage.logs / ("handoff-%s.log" % setup),
                          env=dict(env, TRAC_ENV=str(stage.env), PYTHONWARNINGS="ignore"), stamped=True,
                          start_new_session=True)
        times = []
        try:
            process.wait_for_line(r"event=all-ready", timeout=120)
            for _ in range(SPECS["handoff"]["times"]):
                time.sleep(0.3)
                sent = time.time()
                os.kill(process.pid, signal.SIGUSR1)
                ready = process.wait_for_line(r"event=ready ", since=sent, timeout=120)
                times.append(round(ready - sent, 4))
                process.wait_for_line(r"event=(exit|rolling-restart-done)\b", since=ready, timeout=120)
        finally:
            process.stop(timeout=15)
        found[setup] = {"note": note, "ready_s": times}
    return found


def only_worker_killed(stage):
    """The only worker SIGKILLed while it serves nobody: seconds until a 200 comes back through nginx."""
    found = {}
    for setup in SPECS["only_worker_killed"]["setups"]:
        times = []
        running, note = ours(stage, "killed-" + setup, MOLD[setup], rows.NEVER_HIT)
        if running is None:
            found[setup] = {"not_run": note}
            continue
        nginx = stage.front("shipped")
        try:
            for _ in range(SPECS["only_worker_killed"]["times"]):
                settle(running, 1)
                # Warm, as a worker that has served a while is.
                warm_up(nginx, rows.cycle(rows.MIX))
                killed = time.monotonic()
                os.kill(running.workers()[0], signal.SIGKILL)
                while http_get(nginx.url("/wiki/WikiStart"), timeout=60) != 200:
                    if time.monotonic() - killed > 60:
                        raise RuntimeError("no 200 within 60 s of killing the only worker")
                    time.sleep(0.01)
                times.append(round(time.monotonic() - killed, 4))
        finally:
            running.stop()
        found[setup] = {"note": note, "first_200_s": times}
    return found


def recycle_cpu(stage):
    """CPU of every process under the launcher per request, recycling every N requests or never."""
    spec, found = SPECS["recycle_cpu"], []
    every = dict(rows.NEVER_HIT, TRAC_FCGI_MAX_REQUESTS=str(spec["every"]), TRAC_FCGI_JITTER="0")
    configurations = [(setup, name, env) for setup in spec["setups"] for name, env in
                      (("every", every), ("never", rows.NEVER_HIT))]
    for number in range(spec["rounds"]):
        for setup, name, env in (configurations if number % 2 == 0 else configurations[::-1]):
            running, note = ours(stage, "cpu-%s-%s-%d" % (setup, name, number), MOLD[setup], env)
            if running is None:
                found.append({"setup": setup, "recycling": name, "round": number, "not_run": note})
                continue
            try:
                found.append(dict(cpu_of_requests(stage, running, spec["requests"]), setup=setup, recycling=name,
                                  round=number, note=note))
            finally:
                running.stop()
    return {"runs": found}


def cpu_of_requests(stage, running, requests, warm=0):
    """CPU of every process under the launcher over REQUESTS answers of the page mix, after WARM
    answers not counted, once no replacement is warming: a run's figures."""
    if warm:
        counted_load(stage, rows.cycle(rows.MIX), warm)
    settle(running, 1)
    before, started = sampling.tree_cpu(running.root), time.time()
    answers = counted_load(stage, rows.cycle(rows.MIX), requests).answers
    settle(running, 1)
    return {"requests": len(answers), "failed": sum(1 for a in answers if not a.ok),
            "cpu_s": sampling.cpu_between(before, sampling.tree_cpu(running.root)),
            "recycles": len(running.recycles(started, time.time()))}


def config_set_cpu(stage):
    """CPU per request, recycling every N, before and after `trac-admin config set` rewrites
    trac.ini as Trac's web admin does, with no signal sent: the mold notices and is replaced.

    "after" is measured once the launcher logs the new mold ready, so its warm-up is not in it;
    refresh_s is how long that took from the edit.  Both phases start after two workers' worth of
    requests uncounted: the worker serving at the edit, forked from the old mold, reopens its
    environment once, as Trac does for any process whose trac.ini changed, and is not what stays."""
    spec, found = SPECS["config_set_cpu"], []
    env = dict(rows.NEVER_HIT, TRAC_FCGI_MAX_REQUESTS=str(spec["every"]), TRAC_FCGI_JITTER="0")
    for number in range(spec["rounds"]):
        running, note = ours(stage, "config-set-%d" % number, MOLD["mold"], env)
        if running is None:
            found += [{"setup": "mold", "phase": phase, "round": number, "not_run": note}
                      for phase in ("before", "after")]
            continue
        try:
            warm = 2 * spec["every"]
            found.append(dict(cpu_of_requests(stage, running, spec["requests"], warm), setup="mold", phase="before",
                              round=number, note=note))
            edited = time.monotonic()
            run([str(VENV / "trac-admin"), str(stage.env), "config", "set", "project", "descr",
                 "edited by make bench, round %d" % number])
            wait_until(lambda: any(" event=mold-refreshed " in line for _, line in running.lines()), 180,
                       "the launcher's mold-refreshed line")
            refresh_s = round(time.monotonic() - edited, 1)
            found.append(dict(cpu_of_requests(stage, running, spec["requests"], warm), setup="mold", phase="after",
                              round=number, note=note, refresh_s=refresh_s))
        finally:
            running.stop()
    return {"runs": found}


# --------------------------------------------------------------------------
# The launcher alone.

def launcher_handoffs(stage):
    """Launcher RSS after a few and after many handoffs, with a worker
    (handoff_worker.c) that asks to be replaced the moment it is ready."""
    first, last = SPECS["launcher"]["handoffs"]
    worker = stage.work / "handoff_worker"
    try:
        run(["cc", "-O2", "-o", str(worker), str(ROOT / "bench" / "handoff_worker.c")])
    except (OSError, subprocess.CalledProcessError) as error:
        return {"not_run": "no C compiler: %s" % error}
    process = Process([PYTHON, str(ROOT / "launcher.py"), "--bind", "unix:%s" % (stage.work / "handoffs.sock"),
                       "--", str(worker)], stage.logs / "handoffs.log", stamped=True, start_new_session=True)
    after, started = [], time.monotonic()
    try:
        for target in (first, last):
            wait_until(lambda: count_handoffs(process) >= target, 600, "%d handoffs" % target)
            after.append({"handoffs": count_handoffs(process), "rss_kib": resident(process.pid) // KiB,
                          "cpu_s": cpu_seconds(process.pid), "s": round(time.monotonic() - started, 3)})
    finally:
        process.stop()
    return {"after": after}


def count_handoffs(process):
    return sum(1 for _, line in process.lines if " event=hup " in line)


class IdleLauncher:
    """The launcher with one idle worker; its CPU is read over idle_s while
    the rest of the run goes on (its own utime+stime is what counts)."""

    def __init__(self, stage):
        env = {"TRAC_FCGI_APP": "hello:app", "PYTHONPATH": str(ROOT / "tests" / "workers")}
        self.process = Process([PYTHON, str(ROOT / "launcher.py"), "--bind", "unix:%s" % (stage.work / "idle.sock"),
                                "--", PYTHON, str(ROOT / "tests" / "workers" / "hello.py")],
                               stage.logs / "idle-launcher.log", env=env, stamped=True, start_new_session=True)
        self.process.wait_for_line(r"event=all-ready")
        time.sleep(1)
        self.figures, self.start = {}, (cpu_seconds(self.process.pid), time.monotonic())
        self.timer = threading.Timer(SPECS["launcher"]["idle_s"], self.measure)
        self.timer.start()

    def measure(self):
        cpu, wall = cpu_seconds(self.process.pid) - self.start[0], time.monotonic() - self.start[1]
        self.figures = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 1), "tick_s": 1 / os.sysconf("SC_CLK_TCK")}

    def result(self):
        self.timer.join()
        return self.figures

    def stop(self):
        self.timer.cancel()
        self.process.stop()

