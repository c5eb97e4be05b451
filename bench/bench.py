#!/usr/bin/env python3
"""bench.py: every row of the benchmark, in one run, on one machine.

`bench/run` (or `make bench`) installs what this needs and calls it.  It
builds one stage and puts every setup on it in turn:

    wrk ──HTTP──> nginx ──FastCGI──> bench/work/fcgi.sock ──> the setup of the row
                    │
                    └── access log: $status, $body_bytes_sent and $request_time of
                        every request, tagged row/scenario/round by wrk (mix.lua)

Same Trac environment, same nginx, same load, same run: the ratios in the
table compare only figures measured side by side.  What it writes:

    bench/results/latest.json   every figure, and per-second timelines
    bench/results/latest.md     the tables, the targets (met or missed), the machine
    bench/results/latest.png    memory and p99 over time for the recycling rows (plot.py)

Every cell's seconds are split into ROUNDS rounds, each on a freshly started
server; the rows take turns, every other round in reverse order.

Settings (environment): BENCH_SECONDS, seconds of load per cell (default 16);
BENCH_QUICK=1, a smoke test of a few seconds per cell; BENCH_ONLY=row,row to
run some rows only (while developing; the targets then say what is missing).
"""

import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"
VENV = ROOT / ".venv" / "bin"
PYTHON = str(VENV / "python")
SOCKET = WORK / "fcgi.sock"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20

# --------------------------------------------------------------------------
# Settings: how long, how hard, what.

QUICK = os.environ.get("BENCH_QUICK") == "1"
SECONDS = float(os.environ.get("BENCH_SECONDS") or (4 if QUICK else 16))
# Each cell's seconds are split into rounds; see main() for their order.
ROUNDS = 2
ONLY = [name for name in os.environ.get("BENCH_ONLY", "").split(",") if name]

KILL_EVERY_S = 1.0 if QUICK else 5.0   # faults: one worker SIGKILLed this often
SAMPLE_EVERY_S = 0.1         # worker RSS, read from /proc
IDLE_CPU_SECONDS = 10 if QUICK else 60
HANDOFFS = (100, 1000 if QUICK else 10_000)
COLD_STARTS = 2 if QUICK else 5
WRK_THREADS = 2
# Long enough that overload queues show up as latency, not as wrk timeouts.
WRK_TIMEOUT = "60s"

TICKETS = 20
# The workload: one cycle of 20 requests, every wrk connection walking it from
# its own place.  Half are the wiki start page; the rest are heavier pages.
MIX = {"/wiki/WikiStart": 10, "/ticket/{ticket}": 6, "/timeline": 2, "/report/1": 2}

# Recycling on memory: the soft mark (where a worker asks for its replacement,
# or uWSGI's --reload-on-rss) sits this far above the warm size measured in
# this run, and our hard limit this far above the soft mark.
SOFT_RSS_ABOVE_WARM = 2 * MiB
MAX_RSS_ABOVE_SOFT = 4 * MiB
# Recycling on request count: about once a second at the 40-60 req/s that one
# Trac worker serves on this 2-core machine (the recycles column shows the rate).
RECYCLE_REQUESTS = 50

# Ours with every limit set, none of which this run reaches.
NEVER_HIT = {"TRAC_FCGI_MAX_RSS": "1G", "TRAC_FCGI_MAX_REQUESTS": "1000000000",
             "TRAC_FCGI_MAX_LIFETIME": "1000000"}


class Scenario:
    def __init__(self, name, clients, kill_every=None, label=""):
        self.name, self.clients, self.kill_every, self.label = name, clients, kill_every, label


SCENARIOS = [
    Scenario("steady", 8, label="steady, 8 connections"),
    Scenario("overload", 64, label="overload, 64 connections"),
    Scenario("faults", 8, KILL_EVERY_S, label="faults, 8 connections, one worker SIGKILLed every %g s" % KILL_EVERY_S),
]


class Row:
    """One setup.  args and env may name calibrated figures as {name}."""

    def __init__(self, name, label, server, args=(), env=None, recycling=False):
        self.name, self.label, self.server = name, label, server
        self.args, self.env, self.recycling = list(args), dict(env or {}), recycling

    def resolved(self, calibration):
        return ([arg.format(**calibration) for arg in self.args],
                {key: value.format(**calibration) for key, value in self.env.items()})


ROWS = [
    Row("stock", "stock trac.fcgi (Trac's bundled server)", "stock"),
    Row("flup", "stock trac.fcgi, TRAC_USE_FLUP=1", "stock", env={"TRAC_USE_FLUP": "1"}),
    Row("uwsgi", "uWSGI, 1 worker × 15 threads", "uwsgi"),
    # uWSGI ignores both limits for a worker younger than --min-worker-lifetime
    # (10 s by default); 1 s lets it recycle as often as the limits ask.
    Row("uwsgi-requests", "uWSGI --max-requests {recycle_requests}", "uwsgi",
        args=["--max-requests", "{recycle_requests}", "--min-worker-lifetime", "1"], recycling=True),
    Row("uwsgi-rss", "uWSGI --reload-on-rss {uwsgi_reload_mb}", "uwsgi",
        args=["--reload-on-rss", "{uwsgi_reload_mb}", "--min-worker-lifetime", "1"], recycling=True),
    Row("ours", "ours, limits set, never hit", "ours", env=NEVER_HIT),
    Row("ours-requests", "ours, TRAC_FCGI_MAX_REQUESTS={recycle_requests}", "ours",
        env=dict(NEVER_HIT, TRAC_FCGI_MAX_REQUESTS="{recycle_requests}"), recycling=True),
    # No jitter: ±10% of the soft mark is wider than its headroom above the
    # warm size, and would put some workers' mark below where they start.
    Row("ours-rss", "ours, TRAC_FCGI_MAX_RSS={max_rss_mb}M (soft {soft_rss_mb}M)", "ours",
        env=dict(NEVER_HIT, TRAC_FCGI_MAX_RSS="{max_rss}", TRAC_FCGI_SOFT_RSS="{soft_rss}",
                 TRAC_FCGI_JITTER="0"), recycling=True),
    Row("ours-2", "ours, --workers 2, limits never hit", "ours", args=["--workers", "2"], env=NEVER_HIT),
]


def request_cycle():
    """MIX as a list of paths, each kind spread evenly, the tickets taken in turn."""
    spread = sorted((index / count, path) for path, count in MIX.items() for index in range(count))
    cycle, ticket = [], 0
    # Repeat until every ticket has come up, so /ticket/N covers them all.
    while ticket < TICKETS:
        for _, path in spread:
            if "{ticket}" in path:
                ticket += 1
                path = path.format(ticket=(ticket - 1) % TICKETS + 1)
            cycle.append(path)
    return cycle


# --------------------------------------------------------------------------
# Processes: each one in its own session (so it and its children can be
# stopped by its id), its output read line by line with the time it arrived.

STARTED = []   # every Process this run started, for cleanup


class Process:
    """A child whose stdout and stderr are read by a thread, each line timestamped."""

    def __init__(self, argv, log_path, env=None, stdin=None, cwd=None):
        environ = dict(os.environ)
        environ.update(env or {})
        self.log_path = log_path
        self.log_file = open(log_path, "a")
        self.lines = []          # (time.time(), line)
        self.counts = {}         # event name -> lines seen
        self.popen = subprocess.Popen(argv, env=environ, cwd=cwd, stdin=stdin or subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True, text=True, errors="replace")
        self.pid = self.popen.pid
        STARTED.append(self)
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.popen.stdout:
            now = time.time()
            self.lines.append((now, line.rstrip("\n")))
            self.log_file.write("%.3f %s" % (now, line))
            event = re.search(r" event=(\S+)", line)
            if event:
                self.counts[event.group(1)] = self.counts.get(event.group(1), 0) + 1
        self.log_file.close()

    def wait_for_line(self, pattern, since=0.0, timeout=60.0):
        """The time of the first line after `since` that matches pattern."""
        deadline = time.monotonic() + timeout
        checked = 0
        while time.monotonic() < deadline:
            lines = self.lines
            for when, line in lines[checked:]:
                if when >= since and re.search(pattern, line):
                    return when
            checked = len(lines)
            time.sleep(0.002)
        raise RuntimeError("no line matching %r in %s within %ss" % (pattern, self.log_path, timeout))

    def alive(self):
        return self.popen.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL to its whole session if it is still there."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its session: workers it left behind
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()
        self.reader.join(5)


def stop_everything():
    for process in reversed(STARTED):
        process.stop(timeout=2)


def children(pid):
    """Live direct children of pid, from /proc.

    Only pids above the parent's are read: children get higher pids unless the
    counter wraps, and reading every process 10 times a second would itself
    load the machine under test.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) > pid:
            stat = proc_stat(int(entry))
            if stat and int(stat[1]) == pid and stat[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def proc_stat(pid):
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid):
    stat = proc_stat(pid)
    return (int(stat[11]) + int(stat[12])) / CLOCK_TICKS  # utime + stime


def resident(pid):
    try:
        with open("/proc/%d/statm" % pid) as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def open_connections(pid):
    """Connected sockets a process holds: every socket but the listening one on fd 0."""
    try:
        listener = os.readlink("/proc/%d/fd/0" % pid)
        links = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]
    except OSError:
        return 0
    return len({link for link in links if link.startswith("socket:") and link != listener})


# --------------------------------------------------------------------------
# The servers: how each kind starts on the bench socket, which of its
# processes are workers, which log lines are recycles, and whom faults kill.

class Stock:
    """Trac's own cgi-bin/trac.fcgi under spawn-fcgi.

    It has no master to restart it, so faults run it under a restart loop, as
    runit or systemd's Restart=always would (spawn-fcgi itself respawns
    nothing; such a loop restarts it within a fraction of a second).
    """
    restart_when_dead = True

    def command(self, stage, args):
        return [stage.spawn_fcgi, "-n", "-s", str(SOCKET), "--", str(stage.deploy / "cgi-bin" / "trac.fcgi")]

    def workers(self, root):
        return [root]

    def recycles(self, lines):
        return []

    def victim(self, root, kills):
        return root


class UWSGI:
    restart_when_dead = False
    RESPAWN = re.compile(r"Respawned uWSGI worker")
    KILLED = re.compile(r"killed by signal 9")

    def command(self, stage, args):
        return [str(VENV / "uwsgi"), "--fastcgi-socket", str(SOCKET),
                "--wsgi-file", str(stage.deploy / "cgi-bin" / "trac.wsgi"),
                "--master", "--processes", "1", "--threads", "15",
                "--disable-logging", "--die-on-term", "--need-app"] + args

    def workers(self, root):
        return children(root)

    def recycles(self, lines):
        # Every respawn but those that followed our SIGKILLs.
        respawns = [when for when, line in lines if self.RESPAWN.search(line)]
        kills = sum(1 for when, line in lines if self.KILLED.search(line))
        return respawns[kills:] if kills else respawns

    def victim(self, root, kills):
        workers = children(root)
        return workers[0] if workers else None


class Ours:
    """spawn-fcgi -> launcher.py -> trac-fcgi, as README deploys it."""
    restart_when_dead = False
    HANDOFF = re.compile(r"event=hup .*reason='replaced by")

    def command(self, stage, args):
        return [stage.spawn_fcgi, "-n", "-s", str(SOCKET), "--", PYTHON, str(ROOT / "launcher.py"),
                "--stop-timeout", "10"] + args + ["--", str(VENV / "trac-fcgi")]

    def workers(self, root):
        return children(root)

    def recycles(self, lines):
        return [when for when, line in lines if self.HANDOFF.search(line)]

    def victim(self, root, kills):
        workers = children(root)
        return workers[kills % len(workers)] if workers else None


SERVERS = {"stock": Stock(), "uwsgi": UWSGI(), "ours": Ours()}


class Running:
    """One server on the bench socket, restarted when it dies if its kind needs that."""

    def __init__(self, stage, row, calibration, name):
        self.kind = SERVERS[row.server]
        args, env = row.resolved(calibration)
        self.argv = self.kind.command(stage, args)
        self.env = dict(env, TRAC_ENV=str(stage.env), PYTHONWARNINGS="ignore")
        self.log_path = WORK / "logs" / (name + ".log")
        self.processes = []
        self.stopping = False
        self.start()
        if self.kind.restart_when_dead:
            threading.Thread(target=self.restart_loop, daemon=True).start()

    def start(self):
        if SOCKET.exists():
            SOCKET.unlink()
        self.processes.append(Process(self.argv, self.log_path, env=self.env))

    def restart_loop(self):
        while not self.stopping:
            if not self.processes[-1].alive() and not self.stopping:
                self.start()
            time.sleep(0.05)

    @property
    def root(self):
        return self.processes[-1].pid

    def workers(self):
        return self.kind.workers(self.root) if self.processes[-1].alive() else []

    def lines(self):
        return [entry for process in self.processes for entry in process.lines]

    def stop(self):
        self.stopping = True
        for process in self.processes:
            process.stop()


# --------------------------------------------------------------------------
# The stage: one Trac environment, its deploy directory, one nginx.

class Stage:
    def __init__(self):
        self.spawn_fcgi = find_program("spawn-fcgi")
        self.nginx = find_program("nginx")
        self.wrk = find_program("wrk")
        for name in ("logs", "nginx"):
            (WORK / name).mkdir(parents=True, exist_ok=True)
        for old in (WORK / "logs").iterdir():
            old.unlink()
        self.env = WORK / "trac-env"
        self.deploy = WORK / "trac-deploy"
        if not (self.env / "VERSION").exists():
            make_trac_env(self.env)
        if not (self.deploy / "cgi-bin" / "trac.fcgi").exists():
            run([str(VENV / "trac-admin"), str(self.env), "deploy", str(self.deploy)])
        self.port = free_port()
        self.access_log = WORK / "nginx" / "access.log"
        if self.access_log.exists():
            self.access_log.unlink()
        self.start_nginx()

    def start_nginx(self):
        conf = WORK / "nginx" / "nginx.conf"
        conf.write_text(NGINX_CONF % {"work": WORK, "port": self.port, "socket": SOCKET,
                                      "access_log": self.access_log})
        self.nginx_process = Process([self.nginx, "-p", str(WORK / "nginx"), "-c", str(conf),
                                      "-g", "daemon off;"], WORK / "logs" / "nginx.log")
        wait_until(lambda: port_open(self.port), 10, "nginx listening on port %d" % self.port)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def access_log_lines(self, tag):
        """nginx's record of the tagged requests: (end time, seconds, status, bytes sent)."""
        found = []
        with open(self.access_log) as log:
            for line in log:
                fields = line.split()
                if fields and fields[0] == tag:
                    found.append((float(fields[1]), float(fields[2]), int(fields[3]), int(fields[4])))
        return found


NGINX_CONF = """\
# One nginx for every row.  Workers run as the user who ran the benchmark, so
# they can reach the socket whatever its mode.
user root;
worker_processes 1;
error_log %(work)s/nginx/error.log;
pid %(work)s/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    log_format bench '$http_x_bench_cell $msec $request_time $status $body_bytes_sent $request_uri';
    access_log %(access_log)s bench;
    client_body_temp_path %(work)s/nginx/client_body;
    fastcgi_temp_path %(work)s/nginx/fastcgi;
    fastcgi_buffers 32 16k;
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SCRIPT_NAME "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param SERVER_NAME $server_name;
            fastcgi_param SERVER_PORT $server_port;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_pass unix:%(socket)s;
        }
    }
}
"""


def make_trac_env(path):
    """trac-admin initenv on SQLite, then tickets with a comment each, so /report/1,
    /ticket/N and /timeline have something to show."""
    run([str(VENV / "trac-admin"), str(path), "initenv", "Bench Project", "sqlite:db/trac.db"])
    run([PYTHON, "-W", "ignore", "-c", """
import sys
from trac.env import Environment
from trac.ticket.model import Ticket
env = Environment(sys.argv[1])
for n in range(1, int(sys.argv[2]) + 1):
    ticket = Ticket(env)
    ticket.populate({"summary": "Bench ticket %d: pages render slowly" % n, "reporter": "bench",
                     "type": "defect", "status": "new", "priority": "major", "component": "component1",
                     "description": "Steps:\\n 1. Open WikiStart\\n 1. Wait\\n\\n{{{\\nTraceback (most recent call last)\\n}}}\\n''Seen on'' [wiki:WikiStart]."})
    ticket.insert()
    ticket["status"] = "accepted" if n % 3 == 0 else "new"
    ticket.save_changes("bench", "Comment %d: still happens with '''Trac 1.6'''." % n)
""", str(path), str(TICKETS)])


# --------------------------------------------------------------------------
# One cell: one row under one scenario.

class Sampler(threading.Thread):
    """Every worker's RSS every SAMPLE_EVERY_S: (time, pid, bytes)."""

    def __init__(self, running):
        threading.Thread.__init__(self, daemon=True)
        self.running, self.samples, self.done = running, [], threading.Event()

    def run(self):
        while not self.done.wait(SAMPLE_EVERY_S):
            now = time.time()
            for pid in self.running.workers():
                rss = resident(pid)
                if rss:
                    self.samples.append((now, pid, rss))


class Killer(threading.Thread):
    """Faults: SIGKILL one worker every `every` seconds, half a period out of
    step with the start, so that no kill falls on the end of a round.

    The victim is stopped (SIGSTOP) first, so the connections it holds can be
    counted before it dies: those, and only those, may fail.
    """

    def __init__(self, running, every):
        threading.Thread.__init__(self, daemon=True)
        self.running, self.every, self.kills, self.done = running, every, [], threading.Event()

    def run(self):
        wait = self.every / 2
        while not self.done.wait(wait):
            wait = self.every
            pid = self.running.kind.victim(self.running.root, len(self.kills))
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
                in_flight = open_connections(pid)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"t": time.time(), "pid": pid, "in_flight": in_flight})


def run_round(stage, row, scenario, calibration, number, seconds):
    """Start the row's server, warm it, load it for `seconds`, stop it: raw figures."""
    tag = "%s/%s/%d" % (row.name, scenario.name, number)
    running = Running(stage, row, calibration, tag.replace("/", "-"))
    try:
        warm_up(stage)
        sampler = Sampler(running)
        killer = Killer(running, scenario.kill_every) if scenario.kill_every else None
        sampler.start()
        started = time.time()
        if killer:
            killer.start()
        figures = wrk(stage, tag, scenario.clients, seconds)
        ended = time.time()
        for thread in (sampler, killer):
            if thread:
                thread.done.set()
                thread.join()
    finally:
        running.stop()
    return {"figures": figures, "started": started, "ended": ended, "load_average": os.getloadavg()[0],
            # 499: wrk closed its connections at the end of the round, mid-request.
            "requests": [r for r in stage.access_log_lines(tag) if r[2] != 499],
            "samples": sampler.samples, "kills": killer.kills if killer else [],
            "recycles": [when for when in running.kind.recycles(running.lines()) if started <= when <= ended]}


def cell_figures(row, scenario, calibration, rounds):
    """One row of a table, from all its rounds.

    Counts and durations add up; latencies are nginx's $request_time of every
    request of every round (wrk's percentiles cannot be merged across runs).
    """
    total = {key: sum(r["figures"][key] for r in rounds) for key in rounds[0]["figures"]}
    seconds = total["duration_us"] / 1e6
    latencies = sorted(ms for r in rounds for ms in (request[1] * 1000 for request in r["requests"]))
    errors = {kind: total[kind] for kind in ("connect", "read", "write", "timeout")}
    cell = {
        "row": row.name, "scenario": scenario.name, "label": row.label.format(**calibration),
        "rounds": len(rounds), "seconds": seconds, "requests": total["requests"],
        # Only whole 2xx pages count: stock flup's fast 502s under overload are no throughput.
        "rps": (total["requests"] - total["non2xx"] - total["cut_off"]) / seconds,
        "rps_all_answers": total["requests"] / seconds,
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else 0.0,
        "wrk_p99_ms_by_round": [r["figures"]["p99_us"] / 1e3 for r in rounds],
        "non2xx": total["non2xx"], "cut_off": total["cut_off"],
        "connection_errors": sum(errors.values()), "wrk_errors": errors,
        "recycles": sum(len(r["recycles"]) for r in rounds),
        "peak_rss": max((rss for r in rounds for _, _, rss in r["samples"]), default=0),
        "load_average": max(r["load_average"] for r in rounds),
        "kills": [kill for r in rounds for kill in r["kills"]],
        "timelines": [timeline(r) for r in rounds],
    }
    log("cell", cell="%s/%s" % (row.name, scenario.name), rps="%.1f" % cell["rps"],
        p99_ms="%.0f" % cell["p99_ms"], non2xx=cell["non2xx"], errors=cell["connection_errors"],
        cut_off=cell["cut_off"], recycles=cell["recycles"], peak_rss_mb="%.1f" % (cell["peak_rss"] / MiB))
    return cell


def warm_up(stage):
    """Wait until the setup answers, then fetch every page once (untagged, so
    not counted): the first request of each kind compiles its templates."""
    wait_until(lambda: http_get(stage.url("/wiki/WikiStart")) == 200, 60, "a 200 from the server")
    for path in sorted(set(request_cycle())):
        http_get(stage.url(path))


def wrk(stage, cell, clients, seconds):
    out = subprocess.run([stage.wrk, "-t%d" % min(WRK_THREADS, clients), "-c%d" % clients,
                          "-d%ds" % max(1, round(seconds)), "--timeout", WRK_TIMEOUT,
                          "-s", str(BENCH / "mix.lua"), stage.url("/"), "--", cell] + request_cycle(),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timeline(round_):
    """Per-second p99 (nginx's $request_time) and answers, RSS per worker, recycle
    and kill marks; times in seconds since the round's load started."""
    started = round_["started"]
    by_second = {}
    for ended, seconds, *_ in round_["requests"]:
        by_second.setdefault(int(ended - started), []).append(seconds * 1000)
    rss = {}
    for when, pid, size in round_["samples"]:
        rss.setdefault(str(pid), []).append([round(when - started, 2), round(size / MiB, 2)])
    return {
        "seconds": round(round_["ended"] - started, 2),
        "p99_ms": [[second, round(percentile(values, 99), 1)] for second, values in sorted(by_second.items())
                   if second >= 0],
        "answers": [[second, len(values)] for second, values in sorted(by_second.items()) if second >= 0],
        "rss_mb": rss,
        "recycles": [round(when - started, 2) for when in round_["recycles"]],
        "kills": [round(kill["t"] - started, 2) for kill in round_["kills"]],
    }


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else 0.0


# --------------------------------------------------------------------------
# Calibration: the figures the recycling rows are set from, measured in this run.

def calibrate(stage):
    """The warm size of a worker, ours and uWSGI's: its RSS once every page of
    the workload has been served once."""
    warm = {}
    for name in ("ours", "uwsgi"):
        running = Running(stage, row_named(name), {}, "calibrate-" + name)
        try:
            warm_up(stage)
            warm[name] = max(resident(pid) for pid in running.workers())
        finally:
            running.stop()
    soft = int(warm["ours"] + SOFT_RSS_ABOVE_WARM)
    calibration = {
        "ours_warm_rss_mb": round(warm["ours"] / MiB, 1),
        "uwsgi_warm_rss_mb": round(warm["uwsgi"] / MiB, 1),
        "recycle_requests": RECYCLE_REQUESTS,
        "soft_rss": soft, "soft_rss_mb": round(soft / MiB, 1),
        "max_rss": soft + MAX_RSS_ABOVE_SOFT, "max_rss_mb": round((soft + MAX_RSS_ABOVE_SOFT) / MiB, 1),
        "uwsgi_reload_mb": round((warm["uwsgi"] + SOFT_RSS_ABOVE_WARM) / MiB),
    }
    log("calibrated", **calibration)
    return calibration


def row_named(name):
    return next(row for row in ROWS if row.name == name)


# --------------------------------------------------------------------------
# The launcher alone.

class IdleLauncher:
    """The launcher with one idle worker; its CPU is read over IDLE_CPU_SECONDS.

    It idles while the table runs: the load it would disturb is someone
    else's, and what is measured is its own utime+stime, which the others'
    load does not add to.
    """

    def __init__(self):
        self.figures = {}
        sock = WORK / "idle.sock"
        env = {"TRAC_FCGI_APP": "hello:app", "PYTHONPATH": str(ROOT / "tests" / "workers")}
        self.process = Process([PYTHON, str(ROOT / "launcher.py"), "--bind", "unix:%s" % sock, "--",
                                PYTHON, str(ROOT / "tests" / "workers" / "hello.py")],
                               WORK / "logs" / "idle-launcher.log", env=env)
        self.process.wait_for_line(r"event=all-ready")
        time.sleep(1)
        self.start_cpu, self.start = cpu_seconds(self.process.pid), time.monotonic()
        self.timer = threading.Timer(IDLE_CPU_SECONDS, self.measure)
        self.timer.start()

    def measure(self):
        cpu, wall = cpu_seconds(self.process.pid) - self.start_cpu, time.monotonic() - self.start
        self.figures = {"cpu_s": cpu, "wall_s": wall, "percent": 100 * cpu / wall, "tick_s": 1 / CLOCK_TICKS}
        self.process.stop()

    def result(self):
        self.timer.join()
        return self.figures


def handoff_memory():
    """Launcher RSS after HANDOFFS[0] and after HANDOFFS[1] handoffs, with a
    worker (handoff_worker.c) that asks to be replaced the moment it is ready."""
    worker = WORK / "handoff_worker"
    run(["cc", "-O2", "-o", str(worker), str(BENCH / "handoff_worker.c")])
    process = Process([PYTHON, str(ROOT / "launcher.py"), "--bind", "unix:%s" % (WORK / "handoff.sock"),
                       "--", str(worker)], WORK / "logs" / "handoffs.log")
    figures, started = {}, time.monotonic()
    for target in HANDOFFS:
        wait_until(lambda: process.counts.get("hup", 0) >= target, 600, "%d handoffs" % target)
        figures[target] = {"handoffs": process.counts["hup"], "rss": resident(process.pid),
                           "cpu_s": cpu_seconds(process.pid), "s": time.monotonic() - started}
    process.stop()
    first, last = figures[HANDOFFS[0]], figures[HANDOFFS[1]]
    return {"after": [first, last], "growth": last["rss"] - first["rss"],
            "handoffs_per_s": (last["handoffs"] - first["handoffs"]) / (last["s"] - first["s"]),
            "cpu_ms_per_handoff": 1000 * (last["cpu_s"] - first["cpu_s"]) / (last["handoffs"] - first["handoffs"])}


def replacement_ready_times(stage):
    """From SIGUSR1 to the launcher's event=ready for the replacement (Trac, warm-up included)."""
    env = dict(NEVER_HIT, TRAC_ENV=str(stage.env), PYTHONWARNINGS="ignore")
    process = Process([PYTHON, str(ROOT / "launcher.py"), "--bind", "unix:%s" % (WORK / "usr1.sock"),
                       "--", str(VENV / "trac-fcgi")], WORK / "logs" / "sigusr1.log", env=env)
    times = []
    try:
        process.wait_for_line(r"event=all-ready")
        for _ in range(COLD_STARTS):
            time.sleep(0.5)
            sent = time.time()
            os.kill(process.pid, signal.SIGUSR1)
            times.append(process.wait_for_line(r"event=ready ", since=sent) - sent)
            process.wait_for_line(r"event=exit ", since=sent)
    finally:
        process.stop()
    return times


def stock_cold_starts(stage):
    """Stock trac.fcgi from exec to the end of its first response: import plus first request.

    The socket is made here and given as fd 0, as spawn-fcgi does, so the
    request waits in the backlog from the start instead of polling for it.
    """
    times = []
    env = dict(os.environ, TRAC_ENV=str(stage.env), PYTHONWARNINGS="ignore")
    for _ in range(COLD_STARTS):
        if SOCKET.exists():
            SOCKET.unlink()
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(SOCKET))
        listener.listen(64)
        started = time.time()
        process = Process([str(stage.deploy / "cgi-bin" / "trac.fcgi")], WORK / "logs" / "cold-start.log",
                          env=env, stdin=listener.fileno())
        status = http_get(stage.url("/wiki/WikiStart"), timeout=60)
        times.append(time.time() - started)
        process.stop()
        listener.close()
        assert status == 200, "stock trac.fcgi answered its first request with %s" % status
    return times


HELLO = ROOT / "tests" / "workers"
# A trivial app (tests/workers/hello.py) under three servers: what each costs
# per request when the app costs next to nothing.
TRIVIAL_SETUPS = {
    "ours, memory check on": (["--", PYTHON, str(ROOT / "launcher.py"), "--", str(VENV / "trac-fcgi")],
                              {"TRAC_FCGI_MAX_RSS": "1G"}),
    "ours, TRAC_FCGI_MAX_RSS=0": (["--", PYTHON, str(ROOT / "launcher.py"), "--", str(VENV / "trac-fcgi")],
                                  {"TRAC_FCGI_MAX_RSS": "0"}),
    "stock flup, 15 threads": (["--", PYTHON, "-c", "from hello import app; from flup.server.fcgi import "
                                "WSGIServer; WSGIServer(app, maxThreads=15).run()"], {}),
}
TRIVIAL_SECONDS = 2 if QUICK else 4


def trivial_app_rates(stage):
    """req/s of each TRIVIAL_SETUPS entry through nginx, wrk -c8, in alternating rounds."""
    rates = {name: [] for name in TRIVIAL_SETUPS}
    for number in range(ROUNDS):
        for name in (list(TRIVIAL_SETUPS) if number % 2 == 0 else list(TRIVIAL_SETUPS)[::-1]):
            argv, env = TRIVIAL_SETUPS[name]
            if SOCKET.exists():
                SOCKET.unlink()
            process = Process([stage.spawn_fcgi, "-n", "-s", str(SOCKET)] + argv, WORK / "logs" / "trivial.log",
                              env=dict(env, TRAC_FCGI_APP="hello:app", PYTHONPATH=str(HELLO)))
            try:
                wait_until(lambda: http_get(stage.url("/")) == 200, 30, "the trivial app")
                out = run([stage.wrk, "-t2", "-c8", "-d%ds" % TRIVIAL_SECONDS, stage.url("/")])
                rates[name].append(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
            finally:
                process.stop()
    return {name: sum(values) / len(values) for name, values in rates.items()}


def rss_check_cost():
    """What trac_fcgi's per-request memory check costs: one call, in ns."""
    out = run([PYTHON, "-c", """
import timeit, trac_fcgi
check = trac_fcgi.ResidentMemory()
n = 200000
print(min(timeit.repeat(check, number=n, repeat=5)) / n * 1e9)
"""], cwd=str(ROOT))
    return float(out)


# --------------------------------------------------------------------------
# Targets: the project's goals, each checked against this run's figures.

def targets(cells, launcher):
    """Each target: met or missed, the figure, and for a miss, the likely cause."""
    def cell(row, scenario):
        return next((c for c in cells if c["row"] == row and c["scenario"] == scenario), None)

    found = []

    def target(text, figures, check, why):
        """check(*figures) -> (met, figure); why(*figures) -> the likely cause of a miss."""
        if any(figure is None for figure in figures):
            found.append({"target": text, "met": None, "figure": "not measured in this run"})
            return
        met, figure = check(*figures)
        found.append({"target": text, "met": bool(met), "figure": figure, "why": None if met else why(*figures)})

    def logs(*cs):
        return "a bug: see %s and bench/work/nginx/error.log" % ", ".join(
            "bench/work/logs/%s-%s-*.log" % (c["row"], c["scenario"]) for c in cs)

    usr1 = launcher.get("sigusr1_to_ready_s")
    warm_s = statistics.median(usr1) if usr1 else None
    ours_rows = [row.name for row in ROWS if row.server == "ours"]
    for scenario in ("steady", "overload"):
        target("ours, %s: zero non-2xx, zero connection errors, zero cut-off bodies" % scenario,
               [cell(row, scenario) for row in ours_rows],
               lambda *cs: (all(failed(c) == 0 for c in cs),
                            "; ".join("%s %d/%d/%d" % (c["row"], c["non2xx"], c["connection_errors"], c["cut_off"])
                                      for c in cs) + " (non-2xx/errors/cut off)"),
               lambda *cs: logs(*[c for c in cs if failed(c)]))
    target("ours, faults: only requests in flight on the killed worker fail",
           [cell(row, "faults") for row in ours_rows],
           lambda *cs: (all(failed(c) <= in_flight(c) for c in cs),
                        "; ".join("%s %d failed, %d in flight at %d kills" % (
                            c["row"], failed(c), in_flight(c), len(c["kills"])) for c in cs)),
           lambda *cs: logs(*[c for c in cs if failed(c) > in_flight(c)]))
    for scenario in ("steady", "overload"):
        target("p99 recycling about once a second ≤ 1.25× our p99 without recycling (%s)" % scenario,
               [cell("ours-requests", scenario), cell("ours", scenario)],
               lambda recycling, plain: (
                   recycling["p99_ms"] <= 1.25 * plain["p99_ms"],
                   "%.0f ms vs %.0f ms: %.2f× (%d recycles in %.0f s)" % (
                       recycling["p99_ms"], plain["p99_ms"], recycling["p99_ms"] / plain["p99_ms"],
                       recycling["recycles"], recycling["seconds"])),
               lambda recycling, plain: (
                   "every handoff warms a replacement beside the serving worker (import and warm-up "
                   "request, %.2f s median from SIGUSR1 to READY=1), %.1f times a second here: about %.0f%% "
                   "of a core, on 2 cores that also run nginx and wrk (load average %.1f, others' tests "
                   "included). The serving worker's requests wait for the CPU that warm-ups take"
                   % (warm_s or 0, recycling["recycles"] / recycling["seconds"],
                      100 * (warm_s or 0) * recycling["recycles"] / recycling["seconds"],
                      recycling["load_average"])))
    for scenario in ("steady", "overload"):
        target("throughput with limits set, not hit ≥ max(stock trac.fcgi, uWSGI 15 threads) (%s)" % scenario,
               [cell("ours", scenario), cell("stock", scenario), cell("uwsgi", scenario), cell("flup", scenario)],
               lambda ours, stock, uwsgi, flup: (
                   ours["rps"] >= max(stock["rps"], uwsgi["rps"]),
                   "%.1f vs stock %.1f, uWSGI %.1f req/s: %.2f×" % (
                       ours["rps"], stock["rps"], uwsgi["rps"], ours["rps"] / max(stock["rps"], uwsgi["rps"]))),
               lambda ours, stock, uwsgi, flup: throughput_why(ours, flup, stock, launcher))
    for scenario in ("steady", "overload"):
        target("--workers 2 ≥ 1.8× --workers 1 (%s)" % scenario,
               [cell("ours-2", scenario), cell("ours", scenario)],
               lambda two, one: (two["rps"] >= 1.8 * one["rps"],
                                 "%.1f vs %.1f req/s: %.2f×" % (two["rps"], one["rps"], two["rps"] / one["rps"])),
               lambda two, one: (
                   "two workers need both cores, which nginx and wrk share on this 2-core machine, and so "
                   "did others' tests (load average %.1f as the --workers 2 cell ended, %.1f for --workers 1)"
                   % (two["load_average"], one["load_average"])))
    handoffs = launcher.get("handoffs")
    target("launcher RSS after %d handoffs within 256 KiB of its RSS after %d" % HANDOFFS[::-1], [handoffs],
           lambda h: (h["growth"] <= 256 * 1024,
                      "%+d KiB (%d KiB after %d, %d KiB after %d)" % (
                          h["growth"] // 1024, h["after"][0]["rss"] // 1024, h["after"][0]["handoffs"],
                          h["after"][1]["rss"] // 1024, h["after"][1]["handoffs"])),
           lambda h: "the launcher keeps something per handoff: a leak; see bench/work/logs/handoffs.log")
    target("launcher idle CPU over %d s under 0.1%%" % IDLE_CPU_SECONDS, [launcher.get("idle_cpu")],
           lambda idle: (idle["percent"] < 0.1, "%.3f%% (%.2f s CPU in %.0f s; clock tick %.0f ms)" % (
               idle["percent"], idle["cpu_s"], idle["wall_s"], idle["tick_s"] * 1000)),
           lambda idle: "the launcher wakes more often than it should: see bench/work/logs/idle-launcher.log")
    target("SIGUSR1 to READY=1 ≤ 1.2× a cold start of stock trac.fcgi (import + first request)",
           [usr1, launcher.get("stock_cold_start_s")],
           lambda ours, stock: (statistics.median(ours) <= 1.2 * statistics.median(stock),
                                "median %.2f s vs %.2f s: %.2f× (%d each)" % (
                                    statistics.median(ours), statistics.median(stock),
                                    statistics.median(ours) / statistics.median(stock), len(ours))),
           lambda ours, stock: "the replacement does the same work (import, one request); the rest is "
                               "the launcher's and trac-fcgi's own start-up: see bench/work/logs/sigusr1.log")
    return found


def throughput_why(ours, flup, stock, launcher):
    why = ("trac-fcgi serves through flup's FastCGI code, and stock flup (TRAC_USE_FLUP=1) answered "
           "%.1f whole pages a second here, %.2f× Trac's bundled server" % (flup["rps"], flup["rps"] / stock["rps"]))
    trivial = launcher.get("trivial_app_rps")
    if trivial:
        ours_rps, flup_rps = trivial["ours, memory check on"], trivial["stock flup, 15 threads"]
        why += ("; with a trivial app, trac-fcgi answered %.0f req/s against stock flup's %.0f: %.2f ms more "
                "per request, %.0f%% of a Trac request at %.1f req/s" % (
                    ours_rps, flup_rps, 1000 / ours_rps - 1000 / flup_rps,
                    100 * (1 / ours_rps - 1 / flup_rps) * ours["rps"], ours["rps"]))
    return why + ". Identical runs differ by up to 12% on this machine"


def in_flight(cell):
    return sum(kill["in_flight"] for kill in cell["kills"])


def failed(cell):
    return cell["non2xx"] + cell["connection_errors"] + cell["cut_off"]


# --------------------------------------------------------------------------
# The report.

def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / (1 << 30), 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {
            "nginx": version([find_program("nginx"), "-v"]),
            "wrk": version([find_program("wrk"), "-v"]),
            "uwsgi": version([str(VENV / "uwsgi"), "--version"]),
            "trac": version([PYTHON, "-W", "ignore", "-c", "import trac; print(trac.__version__)"]),
        },
    }


def code_version():
    """The commit measured, and whether the two programs differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=str(ROOT), capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed": git("status", "--porcelain", "--", "launcher.py", "trac_fcgi.py").split("\n") != [""]}


def write_report(report):
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "latest.md").write_text(markdown(report))
    embed_in_readme((RESULTS / "latest.md").read_text())


README_MARKS = ("<!-- benchmark: written by bench/bench.py from bench/results/latest.md -->",
                "<!-- end of benchmark -->")


def readme_section(latest_md):
    """latest.md as the README's "Benchmark" section: one heading level down, paths from the top."""
    body = latest_md.split("\n", 1)[1].replace("## ", "### ").replace("](latest.png)", "](bench/results/latest.png)")
    return "%s\n## Benchmark\n\nReproduce it with `make bench`.\n%s\n%s" % (README_MARKS[0], body, README_MARKS[1])


def embed_in_readme(latest_md):
    """Replace the README's benchmark section, so the two never disagree (tests/test_docs.py checks)."""
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(README_MARKS[0]), readme.index(README_MARKS[1]) + len(README_MARKS[1])
    (ROOT / "README.md").write_text(readme[:start] + readme_section(latest_md) + readme[end:])


def markdown(report):
    out = ["# Benchmark: trac-fcgi-launcher against stock trac.fcgi and uWSGI", ""]
    m = report["machine"]
    code, settings, versions = report["code"], report["settings"], m["versions"]
    out += ["Measured %s at commit %s%s in one run of `%s` (%.0f s including installs): %g s of load "
            "per cell, in %d rounds; %d cores (%s), %.0f GiB, kernel %s, Python %s, nginx %s, wrk %s, "
            "uWSGI %s, Trac %s. Load average at start: %s."
            % (report["date"], code["commit"], " (launcher.py or trac_fcgi.py changed since)" if code["changed"] else "",
               report["command"], report["total_s"], settings["seconds"], settings["rounds"],
               m["nproc"], m["cpu"], m["memory_gib"], m["kernel"], m["python"], versions["nginx"], versions["wrk"],
               versions["uwsgi"], versions["trac"], ", ".join("%.2f" % x for x in m["load_average_at_start"])), ""]
    out += ["Workload: wrk (%d threads) through nginx to a FastCGI unix socket; a cycle of %s; one "
            "Trac 1.6 environment on SQLite with %d tickets; nginx opens a FastCGI connection per request "
            "(its default, for every row). Each cell is %d rounds on a fresh server, "
            "the rows taking turns, every other round in reverse order, so that drift and others' load "
            "fall on every row alike. *2xx req/s* counts whole 2xx pages only; *× stock* divides it by "
            "stock trac.fcgi's in the same scenario of this run. Latencies are nginx's `$request_time` "
            "over every answer of every round. *Non-2xx* and *cut off* (a 2xx page without `</html>`, "
            "checked by wrk) count answers; *errors* are wrk's socket errors (connect, read, write, "
            "timeout). *Recycles* are planned replacements seen in the servers' logs; *peak RSS* is the "
            "largest worker process, sampled every %d ms. *Load* is the machine's 1-minute load average "
            "as the cell's rounds ended (the higher one): others run tests on this machine too."
            % (WRK_THREADS, ", ".join("%d× %s" % (n, p.replace("{ticket}", "N")) for p, n in MIX.items()),
               TICKETS, ROUNDS, SAMPLE_EVERY_S * 1000), ""]
    c = report["calibration"]
    if c:
        out += ["Memory limits, from the warm size measured in this run (a worker's RSS once it has "
                "served every page once: ours %.1f MB, uWSGI's %.1f MB): ours asks for its replacement "
                "at %s MB and stops accepting at %s MB; uWSGI reloads at %d MB. Request-count rows "
                "recycle every %d requests, about once a second here. MB are MiB."
                % (c["ours_warm_rss_mb"], c["uwsgi_warm_rss_mb"], c["soft_rss_mb"], c["max_rss_mb"],
                   c["uwsgi_reload_mb"], c["recycle_requests"]), ""]
    for scenario in SCENARIOS:
        cells = [cell for cell in report["cells"] if cell["scenario"] == scenario.name]
        if not cells:
            continue
        stock = next((cell for cell in cells if cell["row"] == "stock"), None)
        faults = scenario.kill_every is not None
        out += ["## %s" % scenario.label[0].upper() + scenario.label[1:], ""]
        head = ["setup", "2xx req/s", "× stock", "p50 ms", "p99 ms", "max ms", "non-2xx", "errors", "cut off",
                "recycles", "peak RSS MB", "load"] + (["kills: in flight"] if faults else [])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell in cells:
            row = [cell["label"], "%.1f" % cell["rps"],
                   "%.2f" % (cell["rps"] / stock["rps"]) if stock else "–",
                   "%.0f" % cell["p50_ms"], "%.0f" % cell["p99_ms"], "%.0f" % cell["max_ms"],
                   "%d" % cell["non2xx"], "%d" % cell["connection_errors"], "%d" % cell["cut_off"],
                   "%d" % cell["recycles"], "%.1f" % (cell["peak_rss"] / MiB), "%.1f" % cell["load_average"]]
            if faults:
                row.append("%d: %d" % (len(cell["kills"]), sum(k["in_flight"] for k in cell["kills"])))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    out += ["## Targets", ""]
    for t in report["targets"]:
        mark = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        out.append("- %s — %s: %s%s" % (mark, t["target"], t["figure"],
                                        ". Likely why: %s." % t["why"] if t.get("why") else ""))
    out.append("")
    launcher = report["launcher"]
    out += ["## The launcher alone", ""]
    if "handoffs" in launcher:
        h = launcher["handoffs"]
        out.append("- Handoffs with a worker that asks to be replaced as soon as it is ready "
                   "(`bench/handoff_worker.c`): %.0f per second, %.2f ms of launcher CPU each; RSS %d KiB "
                   "after %d, %d KiB after %d." % (h["handoffs_per_s"], h["cpu_ms_per_handoff"],
                                                  h["after"][0]["rss"] // 1024, h["after"][0]["handoffs"],
                                                  h["after"][1]["rss"] // 1024, h["after"][1]["handoffs"]))
    if "idle_cpu" in launcher:
        i = launcher["idle_cpu"]
        out.append("- Idle, with one idle worker: %.2f s of CPU (utime+stime) in %.0f s, %.3f%%. It idled "
                   "while the table ran; its own CPU time is what counts." % (i["cpu_s"], i["wall_s"], i["percent"]))
    if "sigusr1_to_ready_s" in launcher:
        out.append("- SIGUSR1 to the replacement's READY=1 (Trac import and warm-up request included): %s s; "
                   "stock trac.fcgi from exec to the end of its first response: %s s."
                   % (", ".join("%.2f" % s for s in launcher["sigusr1_to_ready_s"]),
                      ", ".join("%.2f" % s for s in launcher["stock_cold_start_s"])))
    if "rss_check_ns" in launcher:
        ours = next((cell for cell in report["cells"] if cell["row"] == "ours" and cell["scenario"] == "steady"), None)
        share = (" — %.4f%% of a request at our steady %.1f req/s"
                 % (100 * launcher["rss_check_ns"] * 1e-9 * ours["rps"], ours["rps"])) if ours else ""
        out.append("- The per-request memory check (one pread of /proc/self/statm): %.0f ns%s."
                   % (launcher["rss_check_ns"], share))
    if "trivial_app_rps" in launcher:
        out.append("- A trivial app (`tests/workers/hello.py`) through nginx, wrk -c8, %d rounds of %d s: %s req/s."
                   % (ROUNDS, TRIVIAL_SECONDS, "; ".join("%s %.0f" % item for item in launcher["trivial_app_rps"].items())))
    out += ["", "![memory and p99 latency over time while recycling](latest.png)", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Small helpers.

def log(event, **facts):
    sys.stderr.write("bench event=%s %s\n" % (event, " ".join("%s=%s" % kv for kv in facts.items())))
    sys.stderr.flush()


def run(argv, cwd=None):
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout


def version(argv):
    """The first version number a program prints about itself."""
    done = subprocess.run(argv, capture_output=True, text=True)
    found = re.search(r"\d+\.\d+(\.\d+)?", done.stdout + done.stderr)
    return found.group(0) if found else "?"


def find_program(name):
    for directory in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("bench: %s is not installed; bench/run installs it" % name)


def http_get(url, timeout=30):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def port_open(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(0.05)


# --------------------------------------------------------------------------

def main():
    began = float(os.environ.get("BENCH_STARTED") or time.time())
    WORK.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "command": os.environ.get("BENCH_COMMAND", "bench/run"),
              "settings": {"seconds": SECONDS, "rounds": ROUNDS, "quick": QUICK, "only": ONLY, "mix": MIX, "tickets": TICKETS,
                           "kill_every_s": KILL_EVERY_S, "clients": {s.name: s.clients for s in SCENARIOS}},
              "machine": machine(), "code": code_version(), "calibration": {}, "cells": [], "launcher": {}}
    try:
        stage = Stage()
        idle = IdleLauncher()
        rows = [row for row in ROWS if not ONLY or row.name in ONLY]
        report["calibration"] = calibration = calibrate(stage)
        # Scenario by scenario, in rounds, the rows in turn and every other
        # round in reverse: a spell of someone else's load on the machine, or a
        # drift, falls on all the rows of a table alike (identical runs have
        # differed by 12% on a shared machine).
        for scenario in SCENARIOS:
            rounds = {row.name: [] for row in rows}
            for number in range(ROUNDS):
                for row in (rows if number % 2 == 0 else rows[::-1]):
                    rounds[row.name].append(run_round(stage, row, scenario, calibration, number, SECONDS / ROUNDS))
            report["cells"] += [cell_figures(row, scenario, calibration, rounds[row.name]) for row in rows]
        launcher = report["launcher"]
        launcher["sigusr1_to_ready_s"] = replacement_ready_times(stage)
        launcher["stock_cold_start_s"] = stock_cold_starts(stage)
        launcher["rss_check_ns"] = rss_check_cost()
        launcher["trivial_app_rps"] = trivial_app_rates(stage)
        launcher["handoffs"] = handoff_memory()
        launcher["idle_cpu"] = idle.result()
    finally:
        stop_everything()
    report["targets"] = targets(report["cells"], report["launcher"])
    sys.path.insert(0, str(BENCH))
    import plot
    plot.draw(report, RESULTS / "latest.png")
    report["total_s"] = time.time() - began
    write_report(report)
    for t in report["targets"]:
        log("target", met=t["met"], target=repr(t["target"]), figure=repr(t["figure"]))
    log("done", total_s="%.0f" % report["total_s"], results=RESULTS)


if __name__ == "__main__":
    main()
