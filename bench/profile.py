#!/usr/bin/env python3
"""profile.py: where ours spends what the ceiling does not, run by hand.

    .venv/bin/python -m pip install py-spy     # a bench-only tool, not a dependency
    .venv/bin/python bench/profile.py [SECONDS] [PYTHONPATH-for-trac_fcgi]
    .venv/bin/python bench/profile.py --threads 15,2,1
    .venv/bin/python bench/profile.py --setting TRAC_FCGI_TURN=0,0.05,0.1 [TURNS]

/wiki/WikiStart, 8 connections, closed loop: ours (spawn-fcgi → launcher →
worker behind examples/nginx.conf) and the ceiling (bench/ceiling.py, Trac
called in-process by 8 threads) take turns, three times each.  For each it
reads the CPU of every process that serves a request (the worker, the
launcher, nginx) per whole page, and py-spy samples the worker's thread that
holds the GIL (--gil: only Python work that keeps the other threads
waiting), 250 times a second.  Each sample goes to one bucket: Trac (any
frame under trac.web.main.dispatch_request), else the deepest frame of
trac_fcgi.py or of flup, else the leaf.  Prints a Markdown report to stdout.

A second argument puts a copy of trac_fcgi.py first on the worker's path:
how a change proposed for it is measured without touching the checkout.
"""

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

import analysis  # noqa: E402
import ceiling  # noqa: E402
import load  # noqa: E402
import rows  # noqa: E402
from servers import VENV, Running, Stage, find_program  # noqa: E402
from support import cpu_seconds, family, stat_fields  # noqa: E402

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


APP_FILES = re.compile(r"(/|^)(trac|tracopt|jinja2|markupsafe|genshi|pygments|babel)/|\.html$")


def bucket(stack):
    """(group, bucket) of one collapsed py-spy stack (root first, ';'-separated).

    The deepest frame that is Trac's (the application or its libraries),
    trac_fcgi.py's or flup's names it: Trac's write() runs flup's output
    stream and the socket under dispatch_request, and those count as theirs.
    A stack with none of them is named by its leaf.
    """
    frames = [FRAME.match(f.strip()) for f in stack.split(";")]
    frames = [(m["function"], m["file"]) for m in frames if m]
    for function, path in reversed(frames):
        if path.endswith("trac_fcgi.py"):
            return "trac_fcgi.py", "trac_fcgi.py " + function
        if "/flup/" in path:
            return "flup", "flup %s %s" % (Path(path).name, function)
        if function == "dispatch_request" or APP_FILES.search(path):
            return "Trac", "Trac and its libraries (Jinja2, MarkupSafe...)"
    return "other", "other: %s (%s)" % frames[-1] if frames else "other: no frame"


def counted(raw):
    """Counter of buckets in one py-spy raw file."""
    counts = collections.Counter()
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        counts[bucket(stack)] += int(count)
    return counts


def spy(pid, seconds, out):
    """py-spy on PID for SECONDS in the background: the Popen."""
    return subprocess.Popen([str(VENV / "py-spy"), "record", "--gil", "--nonblocking", "-r", "250", "-d",
                             str(seconds), "-f", "raw", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu(pids):
    return {pid: cpu_seconds(pid, children=True) for pid in pids}


def user_system(pid):
    """(user, system) CPU seconds of PID: the kernel's share is sockets, select and the GIL's futex."""
    fields = stat_fields(pid)
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def one(stage, row, seconds, number, scratch):
    """One turn of ROW: (pages/s, {process kind: CPU ms/page}, Counter of buckets)."""
    env = dict(row["env"], **({"PYTHONPATH": scratch} if scratch and row["server"] == "ours" else {}))
    running = Running.of_row(stage, row, "profile-%s-%d" % (row["name"], number), row["args"], env)
    nginx = stage.front("shipped")
    try:
        running.warm(nginx)
        worker = running.workers()[0]
        kinds = {"worker": [worker], "launcher": [running.root] if row["server"] == "ours" else [],
                 "nginx": family(nginx.process.pid) if row["server"] == "ours" else []}
        before, split_before = cpu(p for pids in kinds.values() for p in pids), user_system(worker)
        raw = stage.work / ("profile-%s-%d.txt" % (row["name"], number))
        spying = spy(worker, seconds + 1, raw)
        time.sleep(0.5)
        if row["server"] == "ceiling":
            figures = ceiling.run_cell(stage.socket, 8, seconds, rows.cycle(rows.WIKI))
        else:
            figures = load.wrk(stage.wrk, nginx.url("/"), "profile", 8, seconds, rows.cycle(rows.WIKI))
        after, split_after = cpu(p for pids in kinds.values() for p in pids), user_system(worker)
        spying.wait(timeout=60)
    finally:
        running.stop()
    pages = analysis.closed_round({"load": figures, "recycles": [], "samples": [], "cpu": {"total_s": None},
                                   "machine": {"load_end": None, "busy": None}, "kills": []})
    whole = pages["requests"] - pages["non2xx"] - pages["cut_off"]
    per_page = {kind: 1000 * sum(after[p] - before[p] for p in pids) / max(1, whole) for kind, pids in kinds.items()}
    per_page["worker system"] = 1000 * (split_after[1] - split_before[1]) / max(1, whole)
    return pages["rps"], per_page, counted(raw)


def setting(name, values, seconds=5, turns=3):
    """/wiki/WikiStart pages/s of ours at each of VALUES of the setting NAME, and of the ceiling with a
    thread per connection and with one, taking turns: --threads (TRAC_FCGI_MAX_THREADS), how much a
    worker loses to its own threads; TRAC_FCGI_TURN, how much its requests taking turns win back."""
    stage = Stage(Path(os.environ.get("BENCH_WORK") or BENCH / "work") / "profile")
    stage.wrk = find_program("wrk")
    base = {r["name"]: r for r in rows.ROWS}
    setups = [("ours, %s=%s" % (name, value), dict(base["ours"], env=dict(base["ours"]["env"], **{name: value})))
              for value in values] + [(base[row]["label"], base[row]) for row in ("ceiling", "ceiling-1")]
    found = collections.defaultdict(list)
    try:
        for number in range(turns):
            for label, row in setups if number % 2 == 0 else setups[::-1]:
                running = Running.of_row(stage, row, "setting-%d" % len(found[label]), row["args"], row["env"])
                try:
                    running.warm(stage.front("shipped"))
                    server = family(running.root)  # launcher, mold and worker; or the ceiling's one process
                    before = sum(cpu_seconds(pid) for pid in server)
                    if row["server"] == "ceiling":
                        figures = ceiling.run_cell(stage.socket, 8, seconds, rows.cycle(rows.WIKI))
                    else:
                        figures = load.wrk(stage.wrk, stage.front("shipped").url("/"), "setting", 8, seconds,
                                           rows.cycle(rows.WIKI))
                    used = sum(cpu_seconds(pid) for pid in server) - before
                finally:
                    running.stop()
                whole = figures["requests"] - figures["non2xx"] - figures["cut_off"]
                found[label].append((whole / (figures["duration_us"] / 1e6), 1000 * used / max(1, whole)))
    finally:
        stage.stop()
    print("/wiki/WikiStart, 8 connections, %d s a turn, %d turns; load average at the end %s.\n" % (
        seconds, turns, ", ".join("%.2f" % x for x in os.getloadavg())))
    print("| setup | pages/s per turn | median | server CPU ms/page, median |\n|---|---|---|---|")
    for label, values in found.items():
        rates, costs = sorted(v[0] for v in values), sorted(v[1] for v in values)
        print("| %s | %s | %.1f | %.1f |" % (label, ", ".join("%.1f" % v[0] for v in values),
                                             rates[len(rates) // 2], costs[len(costs) // 2]))


def main():
    if sys.argv[1:2] == ["--threads"]:
        return setting("TRAC_FCGI_MAX_THREADS", sys.argv[2].split(","))
    if sys.argv[1:2] == ["--setting"]:
        name, _, values = sys.argv[2].partition("=")
        return setting(name, values.split(","), turns=int(sys.argv[3]) if len(sys.argv) > 3 else 3)
    if sys.argv[1:2] == ["--buckets"]:
        # Saved samples again (SETUP=FILE,FILE...), without the turns' figures.
        for spec in sys.argv[2:]:
            name, _, files = spec.partition("=")
            print_buckets(name, [counted(Path(f)) for f in files.split(",")])
        return
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    scratch = sys.argv[2] if len(sys.argv) > 2 else None
    stage = Stage(Path(os.environ.get("BENCH_WORK") or BENCH / "work") / "profile")
    stage.wrk = find_program("wrk")
    chosen = [dict(r, run_args=r["args"]) for r in rows.ROWS if r["name"] in ("ours", "ceiling")]
    found = collections.defaultdict(list)
    try:
        for number in range(3):
            for row in chosen if number % 2 == 0 else chosen[::-1]:
                row = dict(row, args=row["run_args"])
                found[row["name"]].append(one(stage, row, seconds, number, scratch))
    finally:
        stage.stop()
    report(found, seconds, scratch)


def report(found, seconds, scratch):
    print("/wiki/WikiStart, 8 connections, %d s a turn, 3 turns each%s; load average at the end %s.\n" % (
        seconds, ", trac_fcgi.py from %s" % scratch if scratch else "", ", ".join("%.2f" % x for x in os.getloadavg())))
    print("| setup | pages/s per turn | worker CPU ms/page | of which in the kernel | launcher | nginx |")
    print("|---|---|---|---|---|---|")
    for name, turns in found.items():
        med = {k: sorted(t[1][k] for t in turns)[1] for k in turns[0][1]}
        print("| %s | %s | %.1f | %.1f | %.2f | %.1f |" % (name, ", ".join("%.1f" % t[0] for t in turns), med["worker"],
                                                           med["worker system"], med["launcher"], med["nginx"]))
    print()
    for name, turns in found.items():
        print_buckets(name, [t[2] for t in turns])


def print_buckets(name, counters):
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    everything = sum(total.values()) or 1
    print("%s, py-spy --gil samples of the worker, all turns (%d):\n" % (name, everything))
    groups = collections.Counter()
    for (group, _), count in total.items():
        groups[group] += count
    print("| group | share | | bucket | share |")
    print("|---|---|---|---|---|")
    ranked, named = list(total.most_common(12)), groups.most_common()
    for line in range(max(len(ranked), len(named))):
        left = ("%s | %.1f%%" % (named[line][0], 100 * named[line][1] / everything)) if line < len(named) else " | "
        right = ("%s | %.1f%%" % (ranked[line][0][1], 100 * ranked[line][1] / everything)
                 if line < len(ranked) else " | ")
        print("| %s | | %s |" % (left, right.replace("<", "&lt;")))
    print()


if __name__ == "__main__":
    main()
