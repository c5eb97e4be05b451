#!/usr/bin/env python3
"""driver.py: run every row and experiment of rows.py, and write the raw records.

`bench/run` (or `make bench`) installs what this needs, calls it, then
report.py.  What it writes is raw: one JSON record per round of each cell
(every open-loop latency, wrk's figures, status counts, RSS and PSS samples,
the CPU of each server process, the machine's load), and the experiments'
raw figures.  Every table and plot is computed from it afterwards, by
analysis.py and report.py, and can be computed again from the file alone.

Order: round after round, each row on a freshly started server runs its
cells (see ORDER), the rows taking turns, every other round in reverse order,
so that drift and others' load fall on every row alike; then the experiments.

Environment: BENCH_QUICK=1 (one short round, a few rows: the pipeline, not
the figures); BENCH_ROWS=shipped|other-front|all (a row set);
BENCH_ONLY=row,row (some rows only; BENCH_ONLY=none for no table) and
BENCH_EXPERIMENTS=name,name (some experiments only), while developing;
BENCH_OUT (where results go, default bench/results); BENCH_WORK (scratch,
default bench/work).
"""

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# The test suite's process helpers (tests/support.py, tests/stack.py) are ours too.
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

import analysis  # noqa: E402
import ceiling  # noqa: E402
import experiments  # noqa: E402
import load  # noqa: E402
import rows  # noqa: E402
import sampling  # noqa: E402
from peers import MOD_WSGI  # noqa: E402
from servers import (PYTHON, ROOT, VENV, Running, Stage, find_program, http_get, resolve,  # noqa: E402
                     other_front, shipped_keepalive)


def log(event, **facts):
    sys.stderr.write("bench event=%s %s\n" % (event, " ".join("%s=%s" % kv for kv in facts.items())))
    sys.stderr.flush()


def chosen_rows():
    names = rows.ROW_SETS[os.environ.get("BENCH_ROWS") or rows.DEFAULT_ROW_SET]
    only = [name for name in os.environ.get("BENCH_ONLY", "").split(",") if name]
    return [row for row in rows.ROWS if row["name"] in names and (not only or row["name"] in only)]


def measure(running, tag, scenario, number, work):
    """Sample the server while WORK() loads it; one raw record."""
    sampler = sampling.Sampler(running, rows.SAMPLE_EVERY_S)
    machine, cpu_before = sampling.Machine(), sampling.tree_cpu(running.root)
    sampler.start()
    started = time.time()
    figures, kills = work()
    ended = time.time()
    samples = sampler.stop()
    cpu_after = sampling.tree_cpu(running.root)
    # A server restarted mid-way (stock trac.fcgi under faults) took its CPU figures with it.
    total = sampling.cpu_between(cpu_before, cpu_after) if set(cpu_before) & set(cpu_after) else None
    return {"row": tag, "scenario": scenario, "round": number, "started": round(started, 3),
            "seconds": round(ended - started, 3), "load": figures, "kills": kills,
            "samples": [[round(t - started, 2)] + rest for t, *rest in samples],
            "cpu": {"total_s": total, "processes": cpu_after},
            "machine": machine.end(),
            "recycles": [round(t - started, 2) for t in running.recycles(started, ended)]}


def closed(stage, running, row, scenario, number):
    spec = rows.SCENARIOS[scenario]
    nginx = stage.front(row["nginx"])
    tag = "%s/%s/%d" % (row["name"], scenario, number)

    def work():
        killer = sampling.Killer(running, spec["kill_every"]) if spec.get("kill_every") else None
        if killer:
            killer.start()
        if row["server"] == "ceiling":
            figures = ceiling.run_cell(stage.socket, spec["clients"], rows.SECONDS[scenario], rows.cycle(spec["mix"]))
        else:
            figures = load.wrk(stage.wrk, nginx.url("/"), tag, spec["clients"], rows.SECONDS[scenario],
                               rows.cycle(spec["mix"]))
        return dict(figures, kind="closed", clients=spec["clients"]), killer.stop() if killer else []
    return measure(running, row["name"], scenario, number, work)


def open_level(stage, running, row, fraction, seconds, capacity, number):
    nginx = stage.front(row["nginx"])

    def work():
        figures = load.open_loop(nginx.port, rows.cycle(rows.MIX), fraction * capacity, seconds)
        return dict(figures, kind="open", fraction=fraction, capacity=round(capacity, 2)), []
    record = measure(running, row["name"], "open", number, work)
    record["fraction"] = fraction
    return record


# A round of a row: one server start, its cells in this order.  Open loop
# comes after steady, whose capacity it needs, and before overload and
# faults, which leave a backlog and dead workers behind them.
ORDER = ("wiki", "steady", "open", "overload", "faults")


def table(stage, record, runnable):
    """Every row, round after round, the rows taking turns, every other round in reverse."""
    for number in range(rows.ROUNDS):
        for row in (runnable if number % 2 == 0 else runnable[::-1]):
            wanted = [s for s in ORDER if s in row["scenarios"] and rows.SECONDS.get(s) != 0]
            running = Running.of_row(stage, row, "%s-%d" % (row["name"], number), row["run_args"], row["run_env"])
            try:
                running.warm(stage.front(row["nginx"]))
                for scenario in wanted:
                    record["rounds"].extend(run_cell(stage, running, row, scenario, number, record))
                    record["capacity"] = analysis.capacities(record)
            finally:
                running.stop()
            log("round", row=row["name"], round=number)
            save(record)


def run_cell(stage, running, row, scenario, number, record):
    """The cell's records.  Open loop runs at fractions of the capacity measured
    so far in this run (the median of the steady rounds of the row, or of its
    baseline for a recycling row); each record keeps the rate it ran at."""
    if scenario != "open":
        found = [closed(stage, running, row, scenario, number)]
        # wrk leaves its last requests queued (64 of them after overload): the
        # next cell starts once one more request has waited its turn behind them.
        if stage.front(row["nginx"]):
            http_get(stage.front(row["nginx"]).url("/wiki/WikiStart"), timeout=120)
        return found
    capacity = record["capacity"].get(row["baseline"] or row["name"])
    if not capacity:
        return []
    return [open_level(stage, running, row, fraction, seconds, capacity, number)
            for fraction, seconds in rows.OPEN_LOOP]


# --------------------------------------------------------------------------
# About the run: the machine, the code, the settings.

def version(argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    found = re.search(r"\d+\.\d+(\.\d+)?", done.stdout + done.stderr)
    return found.group(0) if found else "?"


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    uwsgi = VENV / "uwsgi"
    return {
        "nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30), 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "versions": {"nginx": version([find_program("nginx"), "-v"]), "wrk": version([find_program("wrk"), "-v"]),
                     "uwsgi": version([str(uwsgi), "--version"]) if uwsgi.exists() else None,
                     "apache": version([find_program("apache2"), "-v"]),
                     "mod_wsgi": version(["dpkg-query", "-W", "-f", "${Version}", "libapache2-mod-wsgi-py3"])
                     if MOD_WSGI.exists() else None,
                     "trac": version([PYTHON, "-W", "ignore", "-c", "import trac; print(trac.__version__)"])},
    }


def code_version():
    """The commit measured, and whether the two programs differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=str(ROOT), capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed": git("status", "--porcelain", "--", "launcher.py", "trac_fcgi.py") != ""}


OUT = Path(os.environ.get("BENCH_OUT") or BENCH / "results")
WORK = Path(os.environ.get("BENCH_WORK") or BENCH / "work")


def save(record, final=False):
    """The records so far, in the scratch directory; at the end, in results."""
    path = OUT / "latest.json" if final else WORK / "partial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def main():
    began = float(os.environ.get("BENCH_STARTED") or time.time())
    # SIGTERM (or Ctrl-C) stops the servers it started too: the finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: stopped by SIGTERM"))
    stage = Stage(WORK)
    stage.wrk = find_program("wrk")
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": os.environ.get("BENCH_COMMAND", "bench/run"),
        "quick": rows.QUICK, "row_set": os.environ.get("BENCH_ROWS") or rows.DEFAULT_ROW_SET,
        "settings": {"rounds": rows.ROUNDS, "seconds": rows.SECONDS, "open_loop": rows.OPEN_LOOP,
                     "kill_every_s": rows.KILL_EVERY_S, "sample_every_s": rows.SAMPLE_EVERY_S,
                     "wrk_threads": rows.WRK_THREADS, "mix": rows.MIX, "page_mix": rows.PAGE_MIX,
                     "tickets": rows.TICKETS, "clients": {k: v["clients"] for k, v in rows.SCENARIOS.items()},
                     "shipped_keepalive": shipped_keepalive(), "experiments": rows.EXPERIMENTS},
        "machine": machine(), "code": code_version(), "known_settings": stage.known,
        "rows": [], "capacity": {}, "rounds": [], "experiments": {}, "experiment_seconds": {},
    }
    idle = experiments.IdleLauncher(stage)
    try:
        for row in chosen_rows():
            args, env, note = resolve(row, stage.known)
            row = dict(row, label=row["label"].format(other_front=other_front()[0]))
            if row["server"] == "uwsgi" and not (VENV / "uwsgi").exists():
                args, env, note = None, None, "not run: uWSGI is not installed (bench/run installs it)"
            if row["server"] == "mod_wsgi" and not MOD_WSGI.exists():
                args, env, note = None, None, "not run: mod_wsgi is not installed (make debs installs it)"
            record["rows"].append(dict(row, run_args=args, run_env=env, note=note, run=args is not None))
        table(stage, record, [row for row in record["rows"] if row["run"]])
        experiments.run_all(stage, record, save)
        record["experiments"]["launcher"]["idle"] = idle.result()
    finally:
        idle.stop()
        stage.stop()
    record["total_s"] = round(time.time() - began, 1)
    log("done", total_s=record["total_s"], results=save(record, final=True))


if __name__ == "__main__":
    main()
