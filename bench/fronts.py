#!/usr/bin/env python3
"""fronts.py: how nginx's connection settings in front of trac-fcgi trade speed against running a POST twice.

Each front is examples/nginx.conf with its upstream block and two
directives (fastcgi_keep_conn, fastcgi_next_upstream) set as the row says;
everything else is the example as written.  Behind each: spawn-fcgi and the
launcher with --workers 2, on a fresh Trac environment.

Each front gets three phases of 8 clients, each client creating a ticket
through Trac's form, then reading /wiki/WikiStart and /timeline, in turn:

    steady      FRONTS_SECONDS (default 30) of load; workers never recycle
    recycling   the same, on another stack whose workers recycle every 12
                requests (TRAC_FCGI_MAX_REQUESTS=12, jittered)
    kills       then the same load on it, and a serving worker SIGKILLed
                every 4 s (or once both slots serve again, if a cold start
                takes longer), FRONTS_KILLS times (default 6)

Each front runs FRONTS_ROUNDS rounds (default 2) on freshly started
servers, the fronts taking turns, every other round in reverse order.  Then
the database says what really happened to each ticket asked for: created
once, twice (a duplicate), or not at all.  Writes bench/results/fronts.md
(and .json); scratch files go to bench/work/fronts/.  Run it with
`.venv/bin/python bench/fronts.py`; FRONTS_ONLY=name,name runs some fronts only.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "tests"), str(BENCH.parent)]

from stack import (KEEPALIVE_FRONT, TicketLoad, serving_workers, ticket_summaries, trac_behind_nginx,  # noqa: E402
                   writable_trac_env)
from support import family, worker_script  # noqa: E402

WORK = BENCH / "work" / "fronts"
RESULTS = BENCH / "results"
SECONDS = float(os.environ.get("FRONTS_SECONDS", "30"))
KILLS = int(os.environ.get("FRONTS_KILLS", "6"))
ROUNDS = int(os.environ.get("FRONTS_ROUNDS", "2"))
COST_SECONDS, COST_ROUNDS = 5, 6
KILL_EVERY_S = 4.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CLIENTS = 8
PAGES = ["/wiki/WikiStart", "/timeline"]
ONLY = [name for name in os.environ.get("FRONTS_ONLY", "").split(",") if name]


def upstream(*lines):
    return "    upstream trac {\n%s    }\n" % "".join("        %s;\n" % line for line in lines)


# name: (what it is, upstream block, server directives)
FRONTS = {
    "default": (
        "nginx's defaults: a connection per request, POSTs never retried",
        upstream("server @{fastcgi_server}"),
        {"fastcgi_keep_conn": None, "fastcgi_next_upstream": None}),
    "twice": (
        "a connection per request; the socket listed twice (max_fails=0), so a failed GET is retried once",
        upstream("server @{fastcgi_server} max_fails=0", "server @{fastcgi_server} max_fails=0"),
        {"fastcgi_keep_conn": None, "fastcgi_next_upstream": None}),
    "keepalive": (
        "keepalive 8, fastcgi_keep_conn on; POSTs never retried",
        KEEPALIVE_FRONT["upstream"], KEEPALIVE_FRONT["directives"]),
    "keepalive+retry": (
        "keepalive 8, fastcgi_keep_conn on, fastcgi_next_upstream error timeout non_idempotent "
        "(the example's settings until this comparison)",
        KEEPALIVE_FRONT["upstream"],
        dict(KEEPALIVE_FRONT["directives"], fastcgi_next_upstream="error timeout non_idempotent")),
}


def run_phase(nginx, launcher, tag, kills):
    load = TicketLoad(nginx.port, CLIENTS, tag, pages=PAGES)
    killed = []

    def stop(seconds):
        if kills:
            # Every KILL_EVERY_S, or, where a cold start takes longer, once
            # both slots serve again: killing workers that have just come up
            # would measure a machine too slow for the schedule, not a front.
            victims = serving_workers(launcher)
            if len(killed) < kills and seconds >= (killed[-1][0] if killed else 0) + KILL_EVERY_S \
                    and len(victims) == 2:
                victim = random.choice(victims)
                os.kill(victim, signal.SIGKILL)
                killed.append((seconds, victim))
            return len(killed) >= kills and seconds >= killed[-1][0] + KILL_EVERY_S
        return seconds >= SECONDS

    logged_before = len(nginx.access_log())
    cpu_before = cpu_used(nginx, launcher)
    load.run(stop, max_seconds=max(SECONDS, KILL_EVERY_S * (kills + 2)) * 3)
    load.cpu_seconds = cpu_used(nginx, launcher) - cpu_before
    return load, killed, nginx.access_log()[logged_before:]


def cpu_used(nginx, launcher):
    """CPU seconds nginx, the launcher and every worker it ever had have used so far.

    What a request costs in CPU does not depend, as throughput does, on how
    busy others keep this machine.  Workers come and go: a reaped one is in
    the launcher's cutime and cstime, whole, and a live one in its own
    utime and stime; a difference of two samples counts each once.
    """
    total = 0.0
    for pid in family(nginx.process.pid) + family(launcher.pid):
        try:
            fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone between the walk and the read: the next sample has it in cutime
        total += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if pid == launcher.pid else 0)
    return total / CLOCK_TICKS


def figures(phases, trac_env, tag):
    """One phase's figures, summed over its rounds: PHASES is [(load, killed, access log), ...]."""
    in_db = ticket_summaries(trac_env)
    mine = {summary: n for summary, n in in_db.items() if summary.startswith(tag + " ")}
    answers = [a for load, _, _ in phases for a in load.answers]
    posts = [p for load, _, _ in phases for p in load.posts()]
    seconds = sum(load.seconds for load, _, _ in phases)
    whole = [a for a in answers if (a.status == 200 and a.complete and not a.error) or a.status == 303]
    latencies = sorted(a.latency for a in answers) or [0.0]
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    cpu = sum(load.cpu_seconds for load, _, _ in phases)
    return {
        "seconds": round(seconds, 1),
        "cpu_ms_per_answer": round(cpu * 1000 / max(len(whole), 1), 1),
        "answers": len(answers),
        "whole_per_s": round(len(whole) / max(seconds, 0.001), 1),
        "p50_ms": round(pick(0.5) * 1000), "p99_ms": round(pick(0.99) * 1000), "max_ms": round(latencies[-1] * 1000),
        "failed_gets": sum(1 for a in answers if a.request[1] == "GET" and a not in whole),
        "failed_posts": sum(1 for _, a in posts if a.status != 303),
        # $upstream_addr reads "a, b" when nginx tried again on b.
        "retried": sum(1 for _, _, access in phases for e in access if "," in e["upstream"]),
        "tickets_asked": len(posts),
        "answered_303": sum(1 for _, a in posts if a.status == 303),
        "duplicated": sum(n - 1 for n in mine.values() if n > 1),
        "303_not_once": sum(1 for summary, a in posts if a.status == 303 and mine.get(summary) != 1),
        "failed_but_created": sum(1 for summary, a in posts if a.status != 303 and mine.get(summary)),
        "kills": sum(len(killed) for _, killed, _ in phases),
    }


def recycled(launcher):
    return len([h for h in launcher.events("hup") if "replaced by" in h.get("reason", "")])


# Each phase: its stack's recycling setting, and how many workers it SIGKILLs.
PHASES = [("steady", {}, 0), ("recycling", {"TRAC_FCGI_MAX_REQUESTS": "12"}, 0),
          ("kills", {"TRAC_FCGI_MAX_REQUESTS": "12"}, KILLS)]


def measure_round(name, number, upstream_block, directives, trac_env):
    """One round of every phase, each stack fresh: {phase: (load, killed, access)}, and counts.

    The steady phase has a stack of its own, without recycling; the
    recycling and kills phases share one, kills after recycling.
    """
    result, counts = {}, {"backoffs": 0}
    for environ in ({}, {"TRAC_FCGI_MAX_REQUESTS": "12"}):
        directory = WORK / name / ("round%d-%s" % (number, "recycling" if environ else "steady"))
        directory.mkdir()
        started = []
        try:
            nginx, launcher = trac_behind_nginx(started, directory, trac_env, "--workers", "2", env=environ,
                                                upstream=upstream_block, directives=directives)
            for phase, phase_environ, kills in PHASES:
                if phase_environ != environ:
                    continue
                before = recycled(launcher)
                result[phase] = run_phase(nginx, launcher, "%s round %d" % (phase, number), kills)
                counts[phase + "_recycles"] = recycled(launcher) - before
                print(name, number, phase, result[phase][0].summary()[:160], flush=True)
            counts["backoffs"] += len(launcher.events("backoff"))
        finally:
            for thing in reversed(started):
                thing.stop()
    return result, counts


def table(rows):
    """The comparison, as README.md shows it too."""
    out = ["| front | steady: whole answers/s | CPU ms per answer | p99 ms | recycling: whole answers/s | p99 ms "
           "| failed | kills | failed GETs | failed POSTs (saved anyway) | retried by nginx | duplicate tickets |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, r, k = row["steady"], row["recycling"], row["kills"]
        out.append("| %s | %s | %s | %s | %s | %s | %d | %d | %d | %d (%d) | %d | %d |" % (
            row["front"], s["whole_per_s"], s["cpu_ms_per_answer"], s["p99_ms"], r["whole_per_s"], r["p99_ms"],
            r["failed_gets"] + r["failed_posts"], k["kills"], k["failed_gets"], k["failed_posts"],
            k["failed_but_created"], k["retried"], k["duplicated"]))
    return "\n".join(out)


def connection_cost():
    """What a FastCGI connection per request costs: a trivial app, default and keepalive fronts, side by side.

    With Trac every answer costs tens of milliseconds, which hides the
    difference; tests/workers/hello.py costs next to nothing, which shows it.
    wrk -c8 for COST_SECONDS per round, COST_ROUNDS rounds taking turns.
    """
    rows = {name: {"answers": 0, "seconds": 0.0, "cpu": 0.0} for name in ("default", "keepalive")}
    for number in range(COST_ROUNDS):
        for name in (list(rows) if number % 2 == 0 else list(rows)[::-1]):
            _, upstream_block, directives = FRONTS[name]
            directory = WORK / "cost" / ("%s-round%d" % (name, number))
            directory.mkdir(parents=True)
            started = []
            try:
                nginx, launcher = trac_behind_nginx(started, directory, directory, "--", *worker_script("hello.py"),
                                                    upstream=upstream_block, directives=directives)
                before = cpu_used(nginx, launcher)
                out = subprocess.run(["wrk", "-t2", "-c8", "-d%ds" % COST_SECONDS, nginx.url("/")],
                                     capture_output=True, text=True, check=True).stdout
                rows[name]["cpu"] += cpu_used(nginx, launcher) - before
                rows[name]["answers"] += int(re.search(r"(\d+) requests in", out)[1])
                rows[name]["seconds"] += COST_SECONDS
            finally:
                for thing in reversed(started):
                    thing.stop()
    lines = ["# nginx fronts: what a connection per request costs", "",
             "Measured %s UTC at commit %s by `bench/fronts.py cost`: tests/workers/hello.py (a trivial WSGI app) "
             "behind each front, launcher --workers 1, `wrk -t2 -c8` for %d s a round, %d rounds taking turns. "
             "Load average: %s." % (time.strftime("%Y-%m-%d %H:%M", time.gmtime()), commit(), COST_SECONDS,
                                    COST_ROUNDS, ", ".join("%.2f" % x for x in os.getloadavg())), "",
             "| front | answers/s | CPU µs per answer |", "|---|---|---|"]
    for name, row in rows.items():
        lines.append("| %s | %.0f | %.0f |" % (name, row["answers"] / row["seconds"],
                                               row["cpu"] * 1e6 / max(row["answers"], 1)))
    (RESULTS / "fronts-cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def commit():
    try:
        return subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    began = time.time()
    load_at_start = ", ".join("%.2f" % x for x in os.getloadavg())
    names = [name for name in FRONTS if not ONLY or name in ONLY]
    envs, rounds = {}, {name: [] for name in names}
    for name in names:
        shutil.rmtree(WORK / name, ignore_errors=True)
        (WORK / name).mkdir(parents=True)
        envs[name] = writable_trac_env(WORK / name / "env")
    # The fronts take turns, every other round in reverse order, so that
    # drift and others' load on this machine fall on every front alike.
    for number in range(ROUNDS):
        for name in (names if number % 2 == 0 else names[::-1]):
            _, upstream_block, directives = FRONTS[name]
            rounds[name].append(measure_round(name, number, upstream_block, directives, envs[name]))
    rows = []
    for name in names:
        row = {"front": name, "description": FRONTS[name][0]}
        for phase, _, _ in PHASES:
            row[phase] = figures([result[phase] for result, _ in rounds[name]], envs[name], phase)
            row[phase]["recycles"] = sum(counts[phase + "_recycles"] for _, counts in rounds[name])
        row["backoffs"] = sum(counts["backoffs"] for _, counts in rounds[name])
        rows.append(row)
    lines = ["# nginx fronts: speed against running a POST twice", "",
             "Measured %s UTC at commit %s by `bench/fronts.py` in %.0f s: %d clients, each creating a ticket through "
             "Trac's form and reading %s in turn; launcher --workers 2; per round, %.0f s steady, %.0f s "
             "of recycling every 12 requests, then a serving worker SIGKILLed every %.0f s, %d times; "
             "%d rounds on fresh servers, the fronts taking turns. Load average (others run tests on this "
             "machine too) at the start: %s; at the end: %s." % (
                 time.strftime("%Y-%m-%d %H:%M", time.gmtime(began)), commit(), time.time() - began, CLIENTS,
                 " and ".join(PAGES), SECONDS, SECONDS, KILL_EVERY_S, KILLS, ROUNDS, load_at_start,
                 ", ".join("%.2f" % x for x in os.getloadavg())),
             "",
             "*Steady*: workers never recycle. *CPU ms per answer*: what nginx, the launcher and its "
             "workers used, over whole answers. *Recycling*: a recycle every ~12 requests. From *kills* "
             "on: the kills phase. *Saved anyway*: POSTs whose client got a failure but whose "
             "ticket is in the database. *Retried by nginx*: requests nginx sent a second time "
             "($upstream_addr lists two). *Duplicate tickets*: tickets in the database beyond one per "
             "summary; each summary was asked for once.", "",
             table(rows), ""]
    lines += ["- **%s**: %s; %d recycles, then %d under kills; %d crash backoffs; p99 while killing %d ms." % (
        row["front"], row["description"], row["recycling"]["recycles"], row["kills"]["recycles"], row["backoffs"],
        row["kills"]["p99_ms"]) for row in rows]
    (RESULTS / "fronts.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "fronts.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    connection_cost() if sys.argv[1:] == ["cost"] else main()
