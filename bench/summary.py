"""summary.py: the top README's benchmark summary, a few lines from the raw records.

report.py writes it between README_MARKS in the top README; tests/test_bench.py
checks that what is there is what this makes from the committed records.
"""

import analysis
import rows

README_MARKS = ("<!-- benchmark: written by bench/report.py from bench/results/latest.json -->",
                "<!-- end of benchmark -->")


def ratio(c, base, key="rps"):
    if not c or not base or not base[key]["median"]:
        return "–"
    return "%.2f" % (c[key]["median"] / base[key]["median"])


def headline(record):
    """The few figures the top README gives, one line each."""
    def c(row, scenario, fraction=None):
        return analysis.cell(record, row, scenario, fraction)
    found = []
    for scenario, what in (("wiki", "/wiki/WikiStart"), ("steady", "The page mix")):
        ours, stock = c("ours", scenario), c("stock", scenario)
        if ours and stock:
            others = [(name, c(name, scenario)) for name in ("flup", "uwsgi", "mod_wsgi", "ours-nofreeze")]
            found.append("%s, 8 connections: ours %.1f pages/s, %s× stock trac.fcgi%s." % (
                what, ours["rps"]["median"], ratio(ours, stock), "".join(
                    ", %s× %s" % (ratio(ours, other), {"flup": "stock flup", "uwsgi": "uWSGI",
                                                       "mod_wsgi": "mod_wsgi daemon mode",
                                                       "ours-nofreeze": "ours without gc.freeze"}[name])
                    for name, other in others if other)))
    found += ceiling_lines(record) + mod_wsgi_lines(record)
    plain, recycling = c("ours", "open", 0.8), c("ours-requests", "open", 0.8)
    if plain and recycling:
        found.append("Open loop at 80%% of capacity: p99 %.0f ms recycling every %d requests, %.0f ms without." % (
            recycling["p99_ms"]["median"], rows.RECYCLE_REQUESTS, plain["p99_ms"]["median"]))
    freeze = {k: v for k, v in analysis.freeze_memory(record).items() if "requests" in v}
    if freeze:
        verdict = ""
        if {"on", "off"} <= set(freeze):
            verdict = ": gc.freeze %s" % ("made them recycle more often" if freeze["on"]["recycles"] >
                                         freeze["off"]["recycles"] else "did not make them recycle more often")
        found.append("Default memory limits over %s requests of a wide page mix: %s%s." % (
            "/".join("%d" % f["requests"] for f in freeze.values()), ", ".join(
                "%d recycles with gc.freeze %s (peak RSS %.0f MB)" % (f["recycles"], k, f["rss_peak_mb"])
                for k, f in freeze.items()), verdict))
    memory, handoff = analysis.mold_memory(record), record["experiments"].get("handoff", {})
    shares = [(setup, memory[(setup, 4)]["pss_share"]) for setup in ("cold", "mold", "uwsgi", "mod_wsgi")
              if "pss_share" in memory.get((setup, 4), {})]
    if shares:
        found.append("4 workers: total PSS ÷ 4×RSS %s." % ", ".join("%.2f %s" % (v, k) for k, v in shares))
    times = {k: analysis.spread(v.get("ready_s", [])) for k, v in handoff.items()}
    if all(times.get(k) for k in ("mold", "cold")):
        found.append("SIGUSR1 to READY=1: %.3f s with the mold, %.3f s cold." % (
            times["mold"]["median"], times["cold"]["median"]))
    killed = {k: analysis.spread(v.get("first_200_s", []))
              for k, v in record["experiments"].get("only_worker_killed", {}).items()}
    if all(killed.get(k) for k in ("mold", "cold")):
        found.append("The only worker SIGKILLed: a 200 again after %.3f s with the mold, %.3f s cold." % (
            killed["mold"]["median"], killed["cold"]["median"]))
    cpu = analysis.recycle_cpu(record)
    every, never = cpu.get(("mold", "every"), {}), cpu.get(("mold", "never"), {})
    if every.get("cpu_ms_per_request") and never.get("cpu_ms_per_request"):
        found.append("CPU per request with the mold: %.1f ms recycling every %d requests, %.1f ms never." % (
            every["cpu_ms_per_request"]["median"], rows.EXPERIMENTS["recycle_cpu"]["every"],
            never["cpu_ms_per_request"]["median"]))
    edited = analysis.config_set_cpu(record)
    before, after = edited.get(("mold", "before"), {}), edited.get(("mold", "after"), {})
    if before.get("cpu_ms_per_request") and after.get("cpu_ms_per_request"):
        found.append("After `trac-admin config set`, no signal sent: %.1f ms of CPU a request, against %.1f ms "
                     "before (recycling every %d)." % (after["cpu_ms_per_request"]["median"],
                                                        before["cpu_ms_per_request"]["median"],
                                                        rows.EXPERIMENTS["config_set_cpu"]["every"]))
    results = analysis.targets(record)
    missed = [t for t in results if t["met"] is False]
    found.append("Targets: %d met, %d missed, %d not measured%s." % (tuple(
        sum(1 for t in results if t["met"] is v) for v in (True, False, None)) + (
        "; missed: " + "; ".join("%s (%s)" % (t["text"], t["figure"]) for t in missed) if missed else "",)))
    return found


def ceiling_lines(record):
    """Ours against the most one process does on these pages (bench/ceiling.py)."""
    parts = []
    for scenario, what in (("wiki", "/wiki/WikiStart"), ("steady", "the page mix")):
        ours, top, one = (analysis.cell(record, name, scenario) for name in ("ours", "ceiling", "ceiling-1"))
        if ours and top:
            parts.append("%s %.1f pages/s, ours ÷ ceiling %s%s" % (
                what, top["rps"]["median"], ratio(ours, top),
                " (one thread: %.1f pages/s, ours ÷ that %s)" % (one["rps"]["median"], ratio(ours, one))
                if one else ""))
    if not parts:
        return []
    return ["The ceiling, Trac's WSGI application called in-process by a thread per connection, nothing in "
            "front: %s." % "; ".join(parts)]


def mod_wsgi_lines(record):
    """mod_wsgi daemon mode beside ours, and every figure where it does better."""
    def c(row, scenario, fraction=None):
        return analysis.cell(record, row, scenario, fraction)
    steady, ours = c("mod_wsgi", "steady"), c("ours", "steady")
    if not steady or not ours:
        return []
    facts, better = ["the page mix %.1f pages/s (ours %s×)" % (steady["rps"]["median"], ratio(ours, steady))], []
    if steady["rps"]["median"] > ours["rps"]["median"]:
        better.append("throughput on the page mix")
    pairs = [("without recycling", "mod_wsgi", "ours"), ("maximum-requests=%d" % rows.RECYCLE_REQUESTS,
                                                        "mod_wsgi-requests", "ours-requests")]
    for what, theirs_row, ours_row in pairs:
        theirs, mine = c(theirs_row, "open", 0.8), c(ours_row, "open", 0.8)
        if theirs and mine:
            facts.append("open-loop p99 at 80%% of its own capacity %s %.0f ms (ours at 80%% of ours %.0f)" % (
                what, theirs["p99_ms"]["median"], mine["p99_ms"]["median"]))
            if theirs["p99_ms"]["median"] < mine["p99_ms"]["median"]:
                better.append("p99 " + what)
    recycling = [c("mod_wsgi-requests", s) for s in ("steady", "overload")] + [c("mod_wsgi-requests", "open", 0.8)]
    if all(recycling):
        facts.append("%d failed requests across its %d restarts" % (
            sum(x["total_failures"] for x in recycling), sum(x["total_recycles"] for x in recycling)))
    memory = analysis.mold_memory(record)
    theirs, mine = memory.get(("mod_wsgi", 4), {}), memory.get(("mold", 4), {})
    if "total_pss_mb" in theirs and "total_pss_mb" in mine:
        facts.append("4 processes: total PSS %.0f MB (ours with the mold %.0f MB)" % (
            theirs["total_pss_mb"], mine["total_pss_mb"]))
        if theirs["total_pss_mb"] < mine["total_pss_mb"]:
            better.append("memory")
    return ["mod_wsgi daemon mode (Apache, 1 process × 15 threads): %s. %s" % (
        "; ".join(facts), "It beats ours on: %s." % ", ".join(better) if better
        else "It beats ours on none of these.")]


def load_range(record):
    """The machine's load average over the table's cells, lowest to highest: others' work shares the cores."""
    loads = [r["machine"][k] for r in record["rounds"] for k in ("load_start", "load_end") if r["machine"].get(k)]
    loads += record["machine"]["load_average_at_start"][:1]
    return "%.1f–%.1f on %d cores" % (min(loads), max(loads), record["machine"]["nproc"])


def readme_section(record):
    return "\n".join([README_MARKS[0], "## Benchmark", "",
                       "Measured %s at %s with `%s`%s, the machine's 1-minute load average %s during the run; "
                       "every table, the method and the targets are in [bench/README.md](bench/README.md)." % (
                           record["date"], record["code"]["commit"], record["command"],
                           " (quick mode: the figures test the pipeline, not the code)" if record["quick"] else "",
                           load_range(record)),
                       ""] + ["- " + line for line in headline(record)] + [
                      "", "Studies beside the table, run by hand: where ours spends what the ceiling does not "
                      "([bench/results/ceiling.md](bench/results/ceiling.md)); requests taking turns against all "
                      "at once ([bench/results/turns.md](bench/results/turns.md)); what makes open-loop p99 worse while "
                      "recycling, and a change to trac_fcgi.py measured beside the checkout "
                      "([bench/results/recycle-tail.md](bench/results/recycle-tail.md))."] + [
                      "", "![memory and open-loop latency over time while recycling](bench/results/latest.png)", "",
                      README_MARKS[1]])
