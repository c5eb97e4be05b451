#!/usr/bin/env python3
"""report.py: the report, from the raw records alone.

    bench/report.py bench/results/latest.json

writes latest.md and latest.png beside the JSON.  For the committed results
(bench/results/latest.json) it also writes bench/README.md (the whole report)
and the short summary between the benchmark marks of the top README.
tests/test_bench.py checks that what it makes from the committed JSON is
what is committed.
"""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import analysis  # noqa: E402
import rows  # noqa: E402
from summary import README_MARKS, ratio, readme_section  # noqa: E402

ROOT = BENCH.parent
COMMITTED = BENCH / "results" / "latest.json"



def fmt(value, digits=0):
    """A spread as 'median [min–max]'; one value alone; '–' for nothing."""
    if value is None:
        return "–"
    form = "%%.%df" % digits
    if value["n"] == 1 or value["min"] == value["max"]:
        return form % value["median"]
    return (form + " [" + form + "–" + form + "]") % (value["median"], value["min"], value["max"])


def table(head, body):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body] + [""]


def label(row):
    return row["label"] + (" ¹" if row.get("note") else "")


# --------------------------------------------------------------------------

def intro(record):
    m, code, s = record["machine"], record["code"], record["settings"]
    v = m["versions"]
    out = ["Measured %s at commit %s%s in one run of `%s` (%.0f s including installs); %d cores (%s), %.0f GiB, "
           "kernel %s, Python %s, nginx %s, wrk %s, uWSGI %s, %sTrac %s; load average at start %s.%s"
           % (record["date"], code["commit"], " (launcher.py or trac_fcgi.py changed since)" if code["changed"] else "",
              record["command"], record.get("total_s", 0), m["nproc"], m["cpu"], m["memory_gib"], m["kernel"],
              m["python"], v["nginx"], v["wrk"], v["uwsgi"] or "–",
              "Apache %s with mod_wsgi %s (Debian's, on Debian's Python 3.11), " % (v["apache"], v["mod_wsgi"])
              if v.get("mod_wsgi") else "", v["trac"],
              ", ".join("%.2f" % x for x in m["load_average_at_start"]),
              " **Quick mode: one short round per cell; these figures test the pipeline, not the code.**"
              if record["quick"] else ""), ""]
    keepalive = s["shipped_keepalive"]
    out += ["Setup: load → nginx → FastCGI unix socket → the row's server, one Trac 1.6 environment on SQLite "
            "with %d tickets. nginx is `examples/nginx.conf` as shipped (%s)%s. Mix: a cycle of %s. "
            "Each cell is %d round%s. A round starts the row's server afresh and runs its cells in turn "
            "(/wiki/WikiStart, steady, open loop, overload, faults); the rows take turns, every other round in "
            "reverse order. A figure is the median of the rounds, [min–max] across them; a target is met only "
            "on the median. MB are MiB."
            % (s["tickets"], "FastCGI keepalive %d" % keepalive if keepalive else "a FastCGI connection per request",
               ", except the rows that say which nginx they had" if any(r["nginx"] == "other"
                                                                        for r in record["rows"]) else "",
               ", ".join("%d× %s" % (n, p.replace("{ticket}", "N")) for p, n in s["mix"].items()),
               s["rounds"], "" if s["rounds"] == 1 else "s"), ""]
    kinds = {r["server"] for r in record["rows"] if r["run"]}
    if "mod_wsgi" in kinds:
        out += ["The mod_wsgi rows have Apache in front instead of nginx: load → Apache → mod_wsgi's daemon "
                "socket → its daemon process (`bench/peers.py`). %s" % MOD_WSGI_FACTS, ""]
    if "ceiling" in kinds:
        out += ["The ceiling rows have nothing in front: the driver hands the cell to `bench/ceiling.py`, which "
                "calls Trac's WSGI application in a loop from a thread per connection (or one), frozen after its "
                "warm-up and before each cell as a worker freezes. Its 2xx/s is the most one process does on "
                "these pages.", ""]
    notes = [r for r in record["rows"] if r.get("note")]
    if notes:
        out += ["¹ " + "; ".join("%s: %s" % (r["name"], r["note"]) for r in notes) + ".", ""]
    return out


MOD_WSGI_FACTS = (
    "With maximum-requests, a daemon process that reaches the count keeps serving while it waits for a "
    "moment with no request in flight, up to its graceful-timeout; then it shuts down, and Apache starts the "
    "next (which loads Trac again, cold) at its next once-a-second check, while connections wait in the "
    "daemon socket's backlog.")


def capacity_section(record):
    out = ["## Capacity (closed loop)", "",
           "wrk, %d threads, N connections each sending its next request when the last is answered. *2xx/s*: "
           "whole 2xx pages a second (a page without `</html>` is *cut off*); *failed*: non-2xx, cut off and "
           "socket errors; *CPU/req*: CPU of every process of the server per request; *load*: the machine's "
           "1-minute load average at the end of the rounds (others run tests on it too). wrk's latencies are "
           "left out: a closed loop hides waiting (see open loop)." % record["settings"]["wrk_threads"], ""]
    for scenario in ("wiki", "steady", "overload", "faults"):
        cells = analysis.table(record, scenario)
        if not cells:
            continue
        stock = dict((r["name"], c) for r, c in cells).get("stock")
        faults = scenario == "faults"
        heading = rows.SCENARIOS[scenario]["label"].format(**record["settings"])
        out += ["### " + heading[0].upper() + heading[1:], ""]
        head = ["setup", "2xx/s", "× stock", "failed", "recycles", "peak RSS MB", "CPU/req ms", "load"]
        body = [[label(r), fmt(c["rps"], 1), ratio(c, stock), "%d" % c["total_failures"], "%d" % c["total_recycles"],
                 fmt(c["peak_rss_mb"], 1), fmt(c["cpu_ms_per_request"]), fmt(c["load"], 1)]
                + (["%d: %d" % (c["total_kills"], c["total_in_flight"])] if faults else []) for r, c in cells]
        out += table(head + (["kills: in flight"] if faults else []), body)
    return out


def open_loop_section(record):
    out = ["## Latency (open loop)", "",
           "Requests on a fixed schedule at a fraction of the row's capacity (the median of its steady rounds "
           "so far in this run; a recycling row takes its non-recycling row's, so both face the same offered "
           "load), each on its own "
           "connection; latency from each request's scheduled time, as wrk2 measures it, so a stall counts "
           "for every request it delays. Per round p50, p99, p99.9 and max over every request (nearest rank: "
           "with under 1,000 requests a round, p99.9 is the round's slowest); then the median of the rounds "
           "[min–max]. *Failed* counts, over all rounds, answers that were not a whole 2xx page.", ""]
    for fraction, seconds in record["settings"]["open_loop"]:
        cells = analysis.table(record, "open", fraction)
        if not cells:
            continue
        out += ["### %d%% of capacity (%g s a round)" % (round(fraction * 100), seconds), ""]
        head = ["setup", "req/s offered", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "failed", "recycles"]
        out += table(head, [[label(r), fmt(c["rate"], 1), fmt(c["p50_ms"]), fmt(c["p99_ms"]), fmt(c["p999_ms"]),
                             fmt(c["max_ms"]), "%d of %d" % (c["total_failures"], c["total_sent"]),
                             "%d" % c["total_recycles"]] for r, c in cells])
    return out


def experiments_section(record):
    out = []
    spec = record["settings"]["experiments"]
    freeze = analysis.freeze_memory(record)
    if freeze:
        out += ["## Memory with gc.freeze on and off", "",
                "%d requests over a wider mix (%s), %d connections, one worker with the default memory limits "
                "(TRAC_FCGI_MAX_RSS 128M, soft mark at 90%%): the worker's RSS, and how often those limits "
                "recycled it." % (spec["freeze_memory"]["requests"], ", ".join(
                    p.split("?")[0].replace("{ticket}", "N") for p in spec["freeze_memory"]["mix"]),
                    spec["freeze_memory"]["clients"]), ""]
        body = []
        for setting, f in freeze.items():
            if "not_run" in f:
                body.append(["TRAC_FCGI_GC_FREEZE=" + setting, f["not_run"], "", "", "", "", "", ""])
                continue
            body.append(["TRAC_FCGI_GC_FREEZE=%s%s" % (setting, " ¹" if f["note"] else ""), "%d" % f["requests"],
                         "%.1f" % f["rps"], "%.1f" % f["rss_first_mb"], "%.1f" % f["rss_last_mb"],
                         "%.1f" % f["rss_peak_mb"], "%d" % f["recycles"], "%d" % f["failed"]])
        out += table(["setting", "requests", "req/s", "RSS first s MB", "RSS last MB", "peak MB", "recycles",
                      "failed"], body)
        out += ["¹ %s" % f["note"] for f in freeze.values() if f.get("note")] + [""] if any(
            f.get("note") for f in freeze.values()) else []
    memory = analysis.mold_memory(record)
    if memory:
        out += ["## Memory per worker: cold exec, mold, uWSGI preload, mod_wsgi daemon processes", "",
                "After load (closed loop, %d requests per worker): RSS counts shared pages in full, PSS divides "
                "them among their sharers, private is what an exit frees. *Total* is every process under the "
                "launcher (workers and the mold), uWSGI's master and workers, or mod_wsgi's daemon processes (Apache's "
                "own, its front, are left out as nginx is); *PSS ÷ N×RSS* is that total PSS "
                "over N times one worker's RSS." % spec["mold_memory"]["requests_per_worker"], ""]
        body = []
        for (setup, n), f in sorted(memory.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if "not_run" in f:
                body.append([setup, "%d" % n, f["not_run"]] + [""] * 6)
                continue
            body.append([setup, "%d" % n, "%.1f" % f["worker_rss_mb"], "%.1f" % f["worker_pss_mb"],
                         "%.1f" % f["worker_private_mb"], "%.1f" % f["total_rss_mb"], "%.1f" % f["total_pss_mb"],
                         "%.1f" % f["total_private_mb"], "%.2f" % f["pss_share"]])
        out += table(["setup", "N", "worker RSS", "worker PSS", "worker private", "total RSS", "total PSS",
                      "total private", "PSS ÷ N×RSS"], body)
    out += handoff_section(record)
    return out


def handoff_section(record):
    out = []
    handoff = record["experiments"].get("handoff", {})
    killed = record["experiments"].get("only_worker_killed", {})
    if handoff or killed:
        out += ["## Handoff and recovery", ""]
        for setup in [setup for setup in ("mold", "cold") if setup in handoff or setup in killed]:
            h, k = handoff.get(setup, {}), killed.get(setup, {})
            name = {"mold": "--mold on", "cold": "--mold off (cold exec)"}[setup]
            if "not_run" in h:
                out.append("- %s: %s." % (name, h["not_run"]))
                continue
            line = "- %s: SIGUSR1 to the replacement's READY=1, %s s (median [min–max] of %d)" % (
                name, fmt(analysis.spread(h.get("ready_s", [])), 3), len(h.get("ready_s", [])))
            if k.get("first_200_s"):
                line += "; the only worker SIGKILLed: a 200 after %s s (of %d)" % (
                    fmt(analysis.spread(k["first_200_s"]), 3), len(k["first_200_s"]))
            out.append(line + ("; " + h["note"] if h.get("note") else "") + ".")
        out.append("")
    cpu = analysis.recycle_cpu(record)
    if cpu:
        every = record["settings"]["experiments"]["recycle_cpu"]["every"]
        out += ["## CPU per request while recycling", "",
                "%d requests through nginx (closed loop, 8 connections), recycling every %d requests or never; "
                "the CPU of every process under the launcher, reaped ones included, per request."
                % (record["settings"]["experiments"]["recycle_cpu"]["requests"], every), ""]
        body = []
        for (setup, name), f in sorted(cpu.items()):
            if "not_run" in f:
                body.append([setup, name, f["not_run"], "", ""])
                continue
            body.append([setup, "every %d" % every if name == "every" else "never", fmt(f["cpu_ms_per_request"], 1),
                         "%d" % f["recycles"], "%d" % f["failed"]])
        out += table(["setup", "recycling", "CPU ms/request", "recycles", "failed"], body)
    edited = analysis.config_set_cpu(record)
    if edited:
        spec = record["settings"]["experiments"]["config_set_cpu"]
        out += ["## CPU per request after a trac.ini edit", "",
                "The same measure with the mold, recycling every %d requests: %d requests before `trac-admin ENV "
                "config set project descr ...` rewrites trac.ini as Trac's web admin does, and %d after, once the "
                "launcher has logged the new mold ready; each phase after %d requests not counted.  No signal is "
                "sent." % (spec["every"], spec["requests"], spec["requests"], 2 * spec["every"]), ""]
        body = []
        for (setup, phase), f in sorted(edited.items(), key=lambda item: item[0][1] != "before"):
            if "not_run" in f:
                body.append([phase, f["not_run"], "", "", ""])
                continue
            body.append([phase, fmt(f["cpu_ms_per_request"], 1), "%d" % f["recycles"], "%d" % f["failed"],
                         fmt(analysis.spread(f["refresh_s"]), 1) if f["refresh_s"] else "–"])
        out += table(["trac.ini", "CPU ms/request", "recycles", "failed", "edit to new mold ready, s"], body)
    launcher = analysis.launcher(record)
    if launcher:
        out += ["## The launcher alone", ""]
        if "growth_kib" in launcher:
            out.append("- Handoffs with a worker that asks to be replaced once ready (`bench/handoff_worker.c`): "
                       "%.0f a second, %.2f ms of launcher CPU each; RSS %d KiB after %d, %d KiB after %d."
                       % (launcher["handoffs_per_s"], launcher["cpu_ms_per_handoff"], launcher["rss_kib"][0],
                          launcher["handoffs"][0], launcher["rss_kib"][1], launcher["handoffs"][1]))
        elif "not_run" in launcher:
            out.append("- Handoffs: not run, %s." % launcher["not_run"])
        if "idle_cpu_s" in launcher:
            out.append("- Idle with one idle worker, while the rest ran: %.2f s of CPU in %.0f s, %.3f%% "
                       "(clock tick %.0f ms)." % (launcher["idle_cpu_s"], launcher["idle_wall_s"],
                                                  launcher["idle_cpu_percent"], launcher["tick_ms"]))
        out.append("")
    return out


def targets_section(found):
    out = ["## Targets", ""]
    for t in found:
        mark = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        out.append("- %s — %s: %s%s" % (mark, t["text"], t["figure"],
                                        " — the rounds' spread crosses the limit" if t.get("crosses") else ""))
    return out + [""]


def markdown(record):
    out = ["# Benchmark: trac-fcgi-launcher against stock trac.fcgi, uWSGI, mod_wsgi and the ceiling", ""]
    out += intro(record) + capacity_section(record) + open_loop_section(record) + experiments_section(record)
    out += targets_section(analysis.targets(record))
    out += ["![memory and open-loop latency over time while recycling](latest.png)", ""]
    return "\n".join(out)


BENCH_README_HEAD = """\
<!-- written by bench/report.py from bench/results/latest.json; edit report.py, not this file -->
Run it with `make bench` (40 minutes on 2 cores beside other test runs, with the mod_wsgi and ceiling rows; 20 on a quiet machine before them). `BENCH_ROWS=other-front make bench` runs the
second row set: nginx with the FastCGI connection choice `examples/nginx.conf` does not make (kept-alive
connections, or one a request). `BENCH_QUICK=1 bench/run` is a smoke test, and
`make test` runs it. `bench/report.py bench/results/latest.json` rebuilds this page, `results/latest.md`,
the plot and the top README's summary from the raw records alone.

| file | what |
| --- | --- |
| `rows.py` | rows, scenarios, experiments, durations and targets, as data |
| `servers.py` | the stage (Trac environment, nginx) and how each server starts |
| `peers.py`, `ceiling.py` | mod_wsgi daemon mode under Apache; the ceiling, Trac called in-process |
| `load.py`, `mix.lua` | closed-loop (wrk) and open-loop load |
| `sampling.py` | memory, CPU and machine load while a cell runs; the fault injector |
| `driver.py`, `experiments.py` | run everything, write `results/latest.json` |
| `analysis.py`, `report.py`, `plot.py` | figures, this report and the plot, from the JSON |
| `fronts.py`, `metrics_plot.py` | studies run by hand: nginx's connection settings and POSTs run twice (`results/fronts.md`); a recycling run seen through `--metrics-file` (`results/metrics.md`) |
| `profile.py`, `recycle_tail.py` | studies run by hand: where ours spends what the ceiling does not (`results/ceiling.md`; py-spy, which it needs, goes into the venv by hand: `.venv/bin/python -m pip install py-spy`, a bench-only tool); a setting's values side by side, `profile.py --setting TRAC_FCGI_TURN=0,0.05,0.1` (`results/turns.md`); what makes open-loop p99 worse while recycling, and a proposed change measured beside the checkout (`results/recycle-tail.md`) |

"""


def publish(json_path):
    record = json.loads(Path(json_path).read_text())
    out = Path(json_path).parent
    text = markdown(record)
    (out / "latest.md").write_text(text)
    try:
        import plot
        plot.draw(record, out / "latest.png")
    except ImportError as error:
        print("report: no plot (%s); bench/run installs matplotlib" % error, file=sys.stderr)
    if Path(json_path).resolve() == COMMITTED:
        (BENCH / "README.md").write_text(bench_readme(text))
        readme = (ROOT / "README.md").read_text()
        start, end = readme.index(README_MARKS[0]), readme.index(README_MARKS[1]) + len(README_MARKS[1])
        (ROOT / "README.md").write_text(readme[:start] + readme_section(record) + readme[end:])


def bench_readme(latest_md):
    """The whole report, with how to run it under its title, and paths from bench/."""
    title, rest = latest_md.split("\n", 1)
    return title + "\n\n" + BENCH_README_HEAD + rest.lstrip("\n").replace("](latest.png)", "](results/latest.png)")


if __name__ == "__main__":
    publish(sys.argv[1] if len(sys.argv) > 1 else COMMITTED)
