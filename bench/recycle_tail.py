#!/usr/bin/env python3
"""recycle_tail.py: what makes open-loop p99 worse while recycling, run by hand.

    .venv/bin/python bench/recycle_tail.py [ROUNDS] [DIR...]
    .venv/bin/python bench/recycle_tail.py --record bench/results/latest.json

The bench's target cell, alone: ours (limits never hit) and ours recycling
every rows.RECYCLE_REQUESTS requests take turns, a fresh server each turn;
the first measures capacity (closed loop, steady mix, rows.SECONDS["steady"])
and takes open-loop load at 80% of it for 7 s; the second takes 80% of the
median of the first's capacities so far, the same load but for the drift.  Each DIR is a
variant: a directory put first on the worker's PYTHONPATH, holding a changed
copy of trac_fcgi.py (the checkout's own is the first variant), so a
proposed change is measured beside the code as it is, in one run.

Every slow request is put beside what the launcher and the workers logged
while it waited: a gc.freeze gate (a worker's event=freeze line, whose
waited_s says how long the gate held new requests), a handoff (event=hup
'replaced by', the new worker ready and the old one draining), the old
worker's exit, or nothing.  Prints Markdown.

--record reads a make bench record instead: for each open-loop round at 80%
of the recycling row and its baseline, the slow requests' scheduled times
against the handoffs of that round (the record keeps when each was logged).
"""

import collections
import os
import re
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

import analysis  # noqa: E402
import load  # noqa: E402
import rows  # noqa: E402
import sampling  # noqa: E402
from servers import Running, Stage, find_program  # noqa: E402

OPEN_S, FRACTION = 7, 0.8
EVENTS = {"freeze": re.compile(r"trac-fcgi\[\d+\] event=freeze .*waited_s=(?P<waited>[\d.]+)"),
          "handoff": re.compile(r"event=hup .*reason='replaced by"),
          "exit": re.compile(r"trac-fcgi-launcher\[\d+\] event=exit .*role=draining")}


def variant_row(name, recycling, path):
    env = dict(rows.NEVER_HIT, **({"TRAC_FCGI_MAX_REQUESTS": str(rows.RECYCLE_REQUESTS)} if recycling else {}))
    env.update({"PYTHONPATH": path} if path else {})
    return {"name": name, "server": "ours", "args": [], "env": env, "nginx": "shipped"}


def turn(stage, row, capacity, number):
    """(capacity measured or None, latencies, scheduled start, stamped lines) of one fresh server."""
    log_name = "tail-%s-%s-%d" % (re.sub(r"\W+", "_", row["name"]), "recycling" if "TRAC_FCGI_MAX_REQUESTS" in row["env"]
                                   and row["env"]["TRAC_FCGI_MAX_REQUESTS"] == str(rows.RECYCLE_REQUESTS) else "plain",
                                   number)
    running = Running.of_row(stage, row, log_name, [], row["env"])
    nginx = stage.front("shipped")
    try:
        running.warm(nginx)
        measured = None
        if capacity is None:
            figures = load.wrk(stage.wrk, nginx.url("/"), "tail", 8, rows.SECONDS["steady"], rows.cycle(rows.MIX))
            measured = analysis.closed_round({"load": figures, "recycles": [], "samples": [], "cpu": {"total_s": None},
                                              "machine": {"load_end": None, "busy": None}, "kills": []})["rps"]
        rate = FRACTION * (capacity or measured)
        cpu_before = sampling.tree_cpu(running.root)
        started = time.time() + 0.05    # open_loop schedules its first request 50 ms after it starts
        figures = load.open_loop(nginx.port, rows.cycle(rows.MIX), rate, OPEN_S)
        cpu_ms = 1000 * sampling.cpu_between(cpu_before, sampling.tree_cpu(running.root)) / len(figures["latency_ms"])
        return measured, rate, figures["latency_ms"], started, running.lines(), cpu_ms
    finally:
        running.stop()


def causes(latencies, rate, started, lines):
    """Counter of what each request at or above the round's p99 waited through."""
    p99 = analysis.percentile(latencies, 99)
    events = []
    for when, line in lines:
        for name, pattern in EVENTS.items():
            found = pattern.search(line)
            if found:
                # A freeze is logged once it is done: its gate held requests from waited_s before.
                held = float(found["waited"]) + 0.02 if name == "freeze" else 0.0
                events.append((name, when - held, when))
    found = collections.Counter()
    for index, latency in enumerate(latencies):
        if latency is None or latency < p99:
            continue
        begin = started + index / rate
        end = begin + latency / 1000
        overlapping = sorted({name for name, low, high in events if low <= end and high >= begin})
        found[" + ".join(overlapping) or "nothing logged"] += 1
    return found


def from_record(path):
    import json
    record = json.loads(Path(path).read_text())
    print("| row | round | p50 ms | p99 ms | recycles | each request at or above p99: latency ms, "
          "s after the last handoff |")
    print("|---|---|---|---|---|---|")
    for r in record["rounds"]:
        if r["scenario"] == "open" and r.get("fraction") == FRACTION and r["row"] in ("ours", "ours-requests"):
            latencies, rate = r["load"]["latency_ms"], r["load"]["rate"]
            p99 = analysis.percentile(latencies, 99)
            slow = []
            for index, latency in enumerate(latencies):
                if latency >= p99:
                    scheduled = 0.05 + index / rate   # seconds from the round's start, as its recycles are
                    before = [scheduled - when for when in r["recycles"] if when <= scheduled + 0.01]
                    slow.append("%.0f, %s" % (latency, "%.2f" % min(before) if before else "–"))
            print("| %s | %d | %.0f | %.0f | %d | %s |" % (r["row"], r["round"], analysis.percentile(latencies, 50),
                                                         p99, len(r["recycles"]), "; ".join(slow)))


def main():
    if sys.argv[1:2] == ["--record"]:
        return from_record(sys.argv[2])
    number_of_rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    variants = [None] + sys.argv[2:]
    stage = Stage(Path(os.environ.get("BENCH_WORK") or BENCH / "work") / "tail")
    stage.wrk = find_program("wrk")
    p99 = collections.defaultdict(list)
    tails = collections.defaultdict(collections.Counter)
    capacity, cpu = {}, collections.defaultdict(list)
    try:
        for number in range(number_of_rounds):
            for path in (variants if number % 2 == 0 else variants[::-1]):
                name = path or "checkout"
                for recycling in (False, True):
                    row = variant_row(name, recycling, path)
                    base = statistics.median(capacity[name]) if recycling else None
                    measured, rate, latencies, started, lines, cpu_ms = turn(stage, row, base, number)
                    cpu[(name, recycling)].append(cpu_ms)
                    if measured:
                        capacity.setdefault(name, []).append(measured)
                    p99[(name, recycling)].append(analysis.percentile([x for x in latencies if x is not None], 99))
                    tails[(name, recycling)].update(causes(latencies, rate, started, lines))
                    print("tail event=turn variant=%s recycling=%s round=%d rate=%.1f p99_ms=%s" % (
                        name, recycling, number, rate, p99[(name, recycling)][-1]), file=sys.stderr, flush=True)
    finally:
        stage.stop()
    print("Open loop at %d%% of capacity, %d s a turn, %d rounds; load average at the end %s.\n" % (
        100 * FRACTION, OPEN_S, number_of_rounds, ", ".join("%.2f" % x for x in os.getloadavg())))
    print("| trac_fcgi.py | p99 ms, not recycling | p99 ms, every %d | ratio (medians) | per round "
          "| CPU ms/request, not recycling | every %d |" % (rows.RECYCLE_REQUESTS, rows.RECYCLE_REQUESTS))
    print("|---|---|---|---|---|---|---|")
    for path in variants:
        name = path or "checkout"
        plain, recycled = p99[(name, False)], p99[(name, True)]
        print("| %s | %s | %s | %.2f | %s | %.1f | %.1f |" % (
            name, ", ".join("%.0f" % x for x in plain), ", ".join("%.0f" % x for x in recycled),
            statistics.median(recycled) / statistics.median(plain),
            ", ".join("%.2f" % (r / p) for p, r in zip(plain, recycled)),
            statistics.median(cpu[(name, False)]), statistics.median(cpu[(name, True)])))
    print("\nWhat the requests at or above each round's p99 waited through (all rounds):\n")
    print("| trac_fcgi.py | recycling | " + " | ".join(sorted({k for c in tails.values() for k in c})) + " |")
    keys = sorted({k for c in tails.values() for k in c})
    print("|---|---|" + "---|" * len(keys))
    for (name, recycling), counter in sorted(tails.items()):
        print("| %s | %s | %s |" % (name, "every %d" % rows.RECYCLE_REQUESTS if recycling else "no",
                                    " | ".join(str(counter.get(k, 0)) for k in keys)))


if __name__ == "__main__":
    main()
