"""rows.py: what the benchmark measures, as data.

The rows (a server and its settings), the scenarios each row runs, the
experiments beside the table, how long each takes, and the targets the
figures are held to.  The driver (driver.py, experiments.py) reads this to
know what to run; analysis.py and report.py read it to know what to compute
and say.  Adding a row or a target means adding a line here.
"""

import os

QUICK = os.environ.get("BENCH_QUICK") == "1"

# --------------------------------------------------------------------------
# Timing.  A full `make bench` must finish in about 30 minutes on a 2-core
# machine: every figure below is budgeted against that (see bench/run).

ROUNDS = 1 if QUICK else 3
SECONDS = {                      # seconds of load per round of each kind of cell
    "wiki": 0 if QUICK else 4,   # closed loop, /wiki/WikiStart only
    "steady": 1.5 if QUICK else 5,
    "overload": 1.5 if QUICK else 4,
    "faults": 2 if QUICK else 6,
}
# Open-loop load, as fractions of the measured capacity, and seconds at each.
OPEN_LOOP = [(0.8, 2.5)] if QUICK else [(0.5, 2.5), (0.8, 7), (0.95, 2.5)]
KILL_EVERY_S = 1.0 if QUICK else 3.0   # faults: one worker SIGKILLed this often
SAMPLE_EVERY_S = 0.25                  # RSS and PSS of every server process
WRK_THREADS = 2
WRK_TIMEOUT = "60s"    # long enough that overload queues show as latency, not timeouts
OPEN_LOOP_MAX_CONNECTIONS = 256
OPEN_LOOP_GRACE_S = 15  # after the schedule, how long answers are still waited for

# --------------------------------------------------------------------------
# The workload: one cycle of requests that every client walks from its own
# place.  Half are the wiki start page; the rest are heavier pages.

TICKETS = 20
MIX = {"/wiki/WikiStart": 10, "/ticket/{ticket}": 6, "/timeline": 2, "/report/1": 2}
WIKI = {"/wiki/WikiStart": 1}
# A wider mix, for what a worker's memory does over many pages.
PAGE_MIX = {"/wiki/WikiStart": 4, "/wiki/TracGuide": 1, "/ticket/{ticket}": 4, "/timeline": 1,
            "/report/1": 1, "/query?status=new&status=accepted": 1, "/search?q=slowly": 1, "/roadmap": 1,
            "/attachment/wiki/WikiStart/notes.txt": 1, "/attachment/ticket/1/notes.txt": 1}


def cycle(mix):
    """MIX as a list of paths, each kind spread evenly, the tickets taken in turn."""
    spread = sorted((index / count, path) for path, count in mix.items() for index in range(count))
    paths, ticket = [], 0
    while True:
        for _, path in spread:
            if "{ticket}" in path:
                ticket += 1
                path = path.format(ticket=(ticket - 1) % TICKETS + 1)
            paths.append(path)
        # Round again until every ticket has come up.
        if ticket >= TICKETS or not any("{ticket}" in path for path in mix):
            return paths


# --------------------------------------------------------------------------
# Scenarios: closed-loop load (wrk) through nginx.  Capacity is the steady
# scenario's whole 2xx pages a second; open-loop rates are fractions of it.

SCENARIOS = {
    "wiki": {"clients": 8, "mix": WIKI, "label": "/wiki/WikiStart only, 8 connections"},
    "steady": {"clients": 8, "mix": MIX, "label": "steady, 8 connections"},
    "overload": {"clients": 64, "mix": MIX, "label": "overload, 64 connections"},
    "faults": {"clients": 8, "mix": MIX, "kill_every": KILL_EVERY_S,
               "label": "faults, 8 connections, one worker SIGKILLed every {kill_every_s:g} s"},
}
ALL = ("steady", "open", "overload", "faults")

# --------------------------------------------------------------------------
# Settings a row may ask for that the code under test may not know yet.  A
# row asking for what the code does anyway (the value here) runs and says
# so; a row asking for anything else is listed as not run, never faked.

WHEN_UNKNOWN = {"--mold": "off", "TRAC_FCGI_GC_FREEZE": "off"}

# Ours with every limit set, none of which a round reaches.
NEVER_HIT = {"TRAC_FCGI_MAX_RSS": "1G", "TRAC_FCGI_MAX_REQUESTS": "1000000000", "TRAC_FCGI_MAX_LIFETIME": "1000000"}
# Recycling on request count: about once a second at the 40-60 pages a second
# that one Trac worker serves on a 2-core machine.
RECYCLE_REQUESTS = 50


def row(name, label, server, args=(), env=None, scenarios=ALL, baseline=None, nginx="shipped"):
    """One setup.  BASELINE: the row without recycling whose capacity sets
    this row's open-loop rates, so both are compared at the same offered load."""
    return {"name": name, "label": label, "server": server, "args": list(args), "env": dict(env or {}),
            "scenarios": list(scenarios), "baseline": baseline, "nginx": nginx}


ROWS = [
    row("stock", "stock trac.fcgi (Trac's bundled server)", "stock", scenarios=("wiki",) + ALL),
    row("flup", "stock trac.fcgi, TRAC_USE_FLUP=1", "stock", env={"TRAC_USE_FLUP": "1"}, scenarios=("wiki",) + ALL),
    row("uwsgi", "uWSGI, 1 worker × 15 threads", "uwsgi", scenarios=("wiki",) + ALL),
    # uWSGI ignores --max-requests for a worker younger than
    # --min-worker-lifetime (10 s by default); 1 s lets it recycle as asked.
    row("uwsgi-requests", "uWSGI --max-requests %d" % RECYCLE_REQUESTS, "uwsgi",
        args=["--max-requests", str(RECYCLE_REQUESTS), "--min-worker-lifetime", "1"], baseline="uwsgi"),
    # What Trac's docs tell an admin to pick: Apache and mod_wsgi in daemon
    # mode, Apache itself in front (bench/peers.py).
    row("mod_wsgi", "mod_wsgi daemon mode, 1 process × 15 threads", "mod_wsgi", nginx="apache",
        scenarios=("wiki",) + ALL),
    row("mod_wsgi-requests", "mod_wsgi daemon mode, maximum-requests=%d" % RECYCLE_REQUESTS, "mod_wsgi",
        args=["--maximum-requests", str(RECYCLE_REQUESTS)], nginx="apache", baseline="mod_wsgi",
        scenarios=("steady", "open", "overload")),
    # The most one process can do on these pages: Trac's WSGI application
    # called in a loop by as many threads as the cell has clients, frozen as a
    # worker freezes, nothing in front (bench/ceiling.py).
    row("ceiling", "ceiling: Trac's WSGI app called in-process, a thread per connection", "ceiling", nginx=None,
        scenarios=("wiki", "steady")),
    row("ceiling-1", "ceiling, one thread: one request at a time", "ceiling", args=["--threads", "1"], nginx=None,
        scenarios=("wiki", "steady")),
    row("ours", "ours, defaults, limits never hit", "ours", env=NEVER_HIT, scenarios=("wiki",) + ALL),
    row("ours-nofreeze", "ours, TRAC_FCGI_GC_FREEZE=off", "ours", env=dict(NEVER_HIT, TRAC_FCGI_GC_FREEZE="off"),
        scenarios=("wiki", "steady", "open")),
    row("ours-cold", "ours, --mold off", "ours", args=["--mold", "off"], env=NEVER_HIT),
    row("ours-requests", "ours, TRAC_FCGI_MAX_REQUESTS=%d" % RECYCLE_REQUESTS, "ours",
        env=dict(NEVER_HIT, TRAC_FCGI_MAX_REQUESTS=str(RECYCLE_REQUESTS)), baseline="ours"),
    row("ours-requests-cold", "ours, TRAC_FCGI_MAX_REQUESTS=%d, --mold off" % RECYCLE_REQUESTS, "ours",
        args=["--mold", "off"], env=dict(NEVER_HIT, TRAC_FCGI_MAX_REQUESTS=str(RECYCLE_REQUESTS)),
        baseline="ours-cold"),
    row("ours-2", "ours, --workers 2, limits never hit", "ours", args=["--workers", "2"], env=NEVER_HIT,
        scenarios=("steady", "open", "overload")),
    # nginx's other connection choice, the one examples/nginx.conf does not
    # make (read at run time): kept-alive FastCGI connections, or one a request.
    row("ours-other-front", "ours, nginx {other_front}", "ours", env=NEVER_HIT, nginx="other",
        scenarios=("steady", "open")),
    row("ours-requests-other-front", "ours, TRAC_FCGI_MAX_REQUESTS=%d, nginx {other_front}" % RECYCLE_REQUESTS,
        "ours", env=dict(NEVER_HIT, TRAC_FCGI_MAX_REQUESTS=str(RECYCLE_REQUESTS)), nginx="other",
        scenarios=("steady", "open"), baseline="ours-other-front"),
]

# BENCH_ROWS picks a row set; BENCH_ONLY=row,row picks rows (while developing).
ROW_SETS = {
    "shipped": [r["name"] for r in ROWS if r["nginx"] != "other"],
    "other-front": [r["name"] for r in ROWS if r["nginx"] == "other"],
    "all": [r["name"] for r in ROWS],
    "quick": ["ours", "ours-requests"],
}
DEFAULT_ROW_SET = "quick" if QUICK else "shipped"

# --------------------------------------------------------------------------
# Experiments beside the table.  A setup is how ours makes its workers:
# forked from a warm mold, or exec'd cold (--mold off).

SETUPS = ["mold"] if QUICK else ["mold", "cold"]

EXPERIMENTS = {
    # Memory over many requests, with gc.freeze on and off, under the default
    # memory limits (128M, soft mark 90%): how often they would recycle.
    "freeze_memory": {"requests": 30 if QUICK else 3000, "clients": 8, "mix": PAGE_MIX,
                      "settings": {"on": {"TRAC_FCGI_GC_FREEZE": "on"}, "off": {"TRAC_FCGI_GC_FREEZE": "off"}}},
    # RSS, PSS and private memory of every process under the server after load.
    "mold_memory": {"workers": [1] if QUICK else [1, 2, 4], "requests_per_worker": 10 if QUICK else 60,
                    "setups": SETUPS if QUICK else SETUPS + ["uwsgi", "mod_wsgi"]},
    # SIGUSR1 to the replacement's READY=1, mold on and off.
    "handoff": {"times": 1 if QUICK else 20, "setups": SETUPS},
    # The only worker SIGKILLed: how soon a 200 comes back.
    "only_worker_killed": {"times": 1 if QUICK else 5, "setups": SETUPS},
    # CPU of every process under the launcher per request, recycling every 20 requests or never.
    "recycle_cpu": {"requests": 25 if QUICK else 200, "every": 20, "rounds": 1 if QUICK else 2, "setups": SETUPS},
    # The same with the mold, before and after `trac-admin config set` rewrites trac.ini (as Trac's
    # web admin does), no signal sent: what a stale mold would cost every new worker.
    "config_set_cpu": {"requests": 25 if QUICK else 200, "every": 20, "rounds": 1 if QUICK else 2},
    # The launcher alone: memory over many handoffs, idle CPU.
    "launcher": {"handoffs": (100, 300 if QUICK else 10000), "idle_s": 3 if QUICK else 60},
}

# --------------------------------------------------------------------------
# Targets.  Each names its figures; analysis.py computes them from the
# records and holds the median to the limit.  A figure is
# (kind, row or setup, scenario or level, measure).

TARGETS = [
    {"text": "ours, every row, steady and overload: no non-2xx, no connection error, no cut-off body",
     "check": "no_failures", "rows": "ours*", "scenarios": ["steady", "overload", "open"]},
    {"text": "ours, faults: only requests in flight on a killed worker fail",
     "check": "failures_within_in_flight", "rows": "ours*", "scenarios": ["faults"]},
    {"text": "open-loop p99 at 80%% of capacity, recycling every %d requests ≤ 1.25× without" % RECYCLE_REQUESTS,
     "check": "ratio_at_most", "limit": 1.25,
     "figure": ("open", "ours-requests", 0.8, "p99_ms"), "against": ("open", "ours", 0.8, "p99_ms")},
    {"text": "throughput, limits set but not hit, steady ≥ max(stock trac.fcgi, uWSGI)",
     "check": "ratio_at_least", "limit": 1.0,
     "figure": ("closed", "ours", "steady", "rps"), "against_max": [("closed", "stock", "steady", "rps"),
                                                                    ("closed", "uwsgi", "steady", "rps")]},
    {"text": "throughput, limits set but not hit, overload ≥ max(stock trac.fcgi, uWSGI)",
     "check": "ratio_at_least", "limit": 1.0,
     "figure": ("closed", "ours", "overload", "rps"), "against_max": [("closed", "stock", "overload", "rps"),
                                                                      ("closed", "uwsgi", "overload", "rps")]},
    {"text": "--workers 2 ≥ 1.8× --workers 1, overload", "check": "ratio_at_least", "limit": 1.8,
     "figure": ("closed", "ours-2", "overload", "rps"), "against": ("closed", "ours", "overload", "rps")},
    {"text": "/wiki/WikiStart, 8 clients: ours ≥ 2.5× stock trac.fcgi on every round", "check": "ratio_at_least",
     "limit": 2.5, "every_round": True,
     "figure": ("closed", "ours", "wiki", "rps"), "against": ("closed", "stock", "wiki", "rps")},
    {"text": "/wiki/WikiStart, 8 clients: ours ≥ 0.90× the ceiling (Trac called in-process)",
     "check": "ratio_at_least", "limit": 0.90,
     "figure": ("closed", "ours", "wiki", "rps"), "against": ("closed", "ceiling", "wiki", "rps")},
    {"text": "CPU per request, recycling every 20 requests ≤ 1.10× never (every process under the launcher)",
     "check": "ratio_at_most", "limit": 1.10,
     "figure": ("recycle_cpu", "mold", "every", "cpu_ms_per_request"),
     "against": ("recycle_cpu", "mold", "never", "cpu_ms_per_request")},
    {"text": "CPU per request, recycling every 20 requests, after `trac-admin config set` ≤ 1.15× before, "
             "no signal sent",
     "check": "ratio_at_most", "limit": 1.15,
     "figure": ("config_set_cpu", "mold", "after", "cpu_ms_per_request"),
     "against": ("config_set_cpu", "mold", "before", "cpu_ms_per_request")},
    {"text": "4 workers after load: total PSS under the launcher ≤ 0.60 × 4 × one worker's RSS",
     "check": "at_most", "limit": 0.60, "figure": ("mold_memory", "mold", 4, "pss_share")},
    {"text": "the only worker SIGKILLed: a 200 within 0.3 s (median)",
     "check": "at_most", "limit": 0.3, "figure": ("only_worker_killed", "mold", None, "first_200_s")},
    {"text": "SIGUSR1 to READY=1 with the mold ≤ 0.1× without (a cold start)",
     "check": "ratio_at_most", "limit": 0.1,
     "figure": ("handoff", "mold", None, "ready_s"), "against": ("handoff", "cold", None, "ready_s")},
    {"text": "launcher RSS after many handoffs within 256 KiB of its RSS after a few",
     "check": "at_most", "limit": 256, "figure": ("launcher", None, None, "growth_kib")},
    {"text": "launcher idle CPU under 0.1%", "check": "at_most", "limit": 0.1,
     "figure": ("launcher", None, None, "idle_cpu_percent")},
]
