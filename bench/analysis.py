"""analysis.py: figures from the raw records, offline.

Every figure of the report comes from here, computed from the JSON that
driver.py wrote: one value per round, then the median of the rounds and
their spread (min–max).  A target is met only if it holds on the medians;
`crosses` says whether the spread reaches across its limit.
"""

import math
import statistics

import rows

MiB = 1024  # samples are in KiB


def percentile(values, p):
    """Nearest rank: the smallest value with at least P% of VALUES at or below it."""
    values = sorted(values)
    if not values:
        return None
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


def spread(values):
    """{median, min, max, n} of the rounds' values (None values are left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --------------------------------------------------------------------------
# The table: closed-loop and open-loop cells.

def rounds_of(record, row, scenario, fraction=None):
    return [r for r in record["rounds"] if r["row"] == row and r["scenario"] == scenario
            and (fraction is None or r.get("fraction") == fraction)]


def closed_round(r):
    w = r["load"]
    seconds = w["duration_us"] / 1e6
    failures = w["non2xx"] + w["cut_off"] + w["connect"] + w["read"] + w["write"] + w["timeout"]
    return {
        # Only whole 2xx pages count: a fast 502 is no throughput.
        "rps": (w["requests"] - w["non2xx"] - w["cut_off"]) / seconds,
        "p50_ms": w["p50_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3, "max_ms": w["max_us"] / 1e3,
        "non2xx": w["non2xx"], "cut_off": w["cut_off"],
        "errors": w["connect"] + w["read"] + w["write"] + w["timeout"], "failures": failures,
        "recycles": len(r["recycles"]), "seconds": seconds, "requests": w["requests"],
        "peak_rss_mb": max((s[2] for s in r["samples"]), default=0) / MiB,
        "cpu_ms_per_request": (1000 * r["cpu"]["total_s"] / max(1, w["requests"])
                               if r["cpu"]["total_s"] is not None else None),
        "load": r["machine"]["load_end"], "busy": r["machine"]["busy"],
        "kills": len(r["kills"]), "in_flight": sum(k["in_flight"] for k in r["kills"]),
    }


def open_round(r):
    w = r["load"]
    latencies = w["latency_ms"]
    return {
        "rate": w["rate"], "sent": len(latencies),
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "p999_ms": percentile(latencies, 99.9), "max_ms": max(latencies),
        "failures": len(w["failed"]), "recycles": len(r["recycles"]),
        "peak_rss_mb": max((s[2] for s in r["samples"]), default=0) / MiB,
        "load": r["machine"]["load_end"], "busy": r["machine"]["busy"],
    }


SUMMED = ("non2xx", "cut_off", "errors", "failures", "recycles", "kills", "in_flight", "requests", "sent")


def cell(record, row, scenario, fraction=None):
    """One cell: every per-round figure as a spread, counts also summed over the rounds."""
    found = rounds_of(record, row, scenario, fraction)
    if not found:
        return None
    per_round = [open_round(r) if scenario == "open" else closed_round(r) for r in found]
    out = {key: spread([f[key] for f in per_round]) for key in per_round[0]}
    out.update({"total_" + key: sum(f[key] for f in per_round) for key in SUMMED if key in per_round[0]})
    out["rounds"] = len(per_round)
    return out


def capacities(record):
    """{row: median whole 2xx pages a second in the steady scenario}."""
    found = {}
    for row in record["rows"]:
        c = cell(record, row["name"], "steady")
        if c:
            found[row["name"]] = c["rps"]["median"]
    return found


def table(record, scenario, fraction=None):
    """[(row, cell)] of every row that ran SCENARIO, in rows.py's order."""
    return [(row, c) for row in record["rows"] if (c := cell(record, row["name"], scenario, fraction))]


# --------------------------------------------------------------------------
# The experiments.

def freeze_memory(record):
    """Per setting: requests, seconds, RSS at the start and end of the load, peak, recycles."""
    found = {}
    for setting, raw in record["experiments"].get("freeze_memory", {}).items():
        if not isinstance(raw, dict) or "samples" not in raw:
            found[setting] = raw
            continue
        rss = [s[2] / MiB for s in raw["samples"]]
        first = [s[2] / MiB for s in raw["samples"] if s[0] <= raw["samples"][0][0] + 1]
        found[setting] = {"requests": raw["requests"], "failed": raw["failed"], "seconds": raw["seconds"],
                          "rps": raw["requests"] / raw["seconds"], "recycles": len(raw["recycles"]),
                          "rss_first_mb": max(first) if first else None, "rss_peak_mb": max(rss) if rss else None,
                          "rss_last_mb": rss[-1] if rss else None, "note": raw.get("note")}
    return found


def mold_memory(record):
    """Per (setup, workers): per worker RSS/PSS/private (median), totals, and PSS share."""
    found = {}
    for config in record["experiments"].get("mold_memory", {}).get("configurations", []):
        key = (config["setup"], config["workers"])
        if "not_run" in config:
            found[key] = {"not_run": config["not_run"]}
            continue
        workers = [p for p in config["processes"] if p["role"] == "worker" and p.get("rss")]
        others = [p for p in config["processes"] if p["role"] not in ("worker", "launcher", "front") and p.get("rss")]
        counted = workers + others  # every process under the launcher; uWSGI's master holds its app
        if not workers:
            found[key] = {"not_run": "no worker was found after the load"}
            continue
        one_rss = statistics.median(p["rss"] for p in workers)
        total_pss = sum(p["pss"] for p in counted)
        found[key] = {
            "worker_rss_mb": one_rss / 2**20, "worker_pss_mb": statistics.median(p["pss"] for p in workers) / 2**20,
            "worker_private_mb": statistics.median(p["private"] for p in workers) / 2**20,
            "others": [(p["role"], p["rss"] / 2**20, p["pss"] / 2**20, p["private"] / 2**20) for p in others],
            "total_rss_mb": sum(p["rss"] for p in counted) / 2**20, "total_pss_mb": total_pss / 2**20,
            "total_private_mb": sum(p["private"] for p in counted) / 2**20,
            "pss_share": total_pss / (config["workers"] * one_rss), "workers": len(workers),
            "note": config.get("note")}
    return found


def recycle_cpu(record):
    """{(setup, 'every'|'never'): CPU ms per request over the rounds}: cpu_runs()."""
    return cpu_runs(record, "recycle_cpu", "recycling")


def config_set_cpu(record):
    """{('mold', 'before'|'after'): CPU ms per request over the rounds, and how long refreshes took}."""
    return cpu_runs(record, "config_set_cpu", "phase")


def cpu_runs(record, experiment, by):
    """{(setup, run[BY]): spread of CPU ms per request over the rounds, with their totals}."""
    runs = record["experiments"].get(experiment, {}).get("runs", [])
    found = {}
    for run in runs:
        key = (run["setup"], run[by])
        if "not_run" in run:
            found.setdefault(key, {"not_run": run["not_run"]})
            continue
        entry = found.setdefault(key, {"values": [], "recycles": 0, "requests": 0, "failed": 0, "refresh_s": []})
        entry["values"].append(1000 * run["cpu_s"] / run["requests"])
        for k in ("recycles", "requests", "failed"):
            entry[k] += run[k]
        if "refresh_s" in run:
            entry["refresh_s"].append(run["refresh_s"])
    for entry in found.values():
        if "values" in entry:
            entry["cpu_ms_per_request"] = spread(entry["values"])
    return found


CPU_EXPERIMENTS = {"recycle_cpu": recycle_cpu, "config_set_cpu": config_set_cpu}


def launcher(record):
    raw = record["experiments"].get("launcher", {})
    out = {}
    if raw.get("after"):
        first, last = raw["after"]
        out.update(handoffs=(first["handoffs"], last["handoffs"]), rss_kib=(first["rss_kib"], last["rss_kib"]),
                   growth_kib=last["rss_kib"] - first["rss_kib"],
                   handoffs_per_s=(last["handoffs"] - first["handoffs"]) / max(1e-9, last["s"] - first["s"]),
                   cpu_ms_per_handoff=1000 * (last["cpu_s"] - first["cpu_s"]) / max(1, last["handoffs"]
                                                                                      - first["handoffs"]))
    elif raw.get("not_run"):
        out["not_run"] = raw["not_run"]
    idle = raw.get("idle")
    if idle and idle.get("wall_s"):
        out.update(idle_cpu_s=idle["cpu_s"], idle_wall_s=idle["wall_s"],
                   idle_cpu_percent=100 * idle["cpu_s"] / idle["wall_s"], tick_ms=1000 * idle["tick_s"])
    return out


# --------------------------------------------------------------------------
# Targets (rows.TARGETS).

def figure(record, ref):
    """A spread for a target's figure reference (kind, subject, which, measure), or None."""
    kind, subject, which, measure = ref
    if kind in ("closed", "open"):
        c = cell(record, subject, "open" if kind == "open" else which, which if kind == "open" else None)
        return c and c.get(measure)
    if kind in CPU_EXPERIMENTS:
        return CPU_EXPERIMENTS[kind](record).get((subject, which), {}).get(measure)
    if kind == "mold_memory":
        value = mold_memory(record).get((subject, which), {}).get(measure)
        return spread([value]) if value is not None else None
    if kind in ("handoff", "only_worker_killed"):
        return spread(record["experiments"].get(kind, {}).get(subject, {}).get(measure, []))
    if kind == "launcher":
        value = launcher(record).get(measure)
        return spread([value]) if value is not None else None
    raise ValueError("unknown figure kind %r" % kind)


def our_rows(record):
    return [row["name"] for row in record["rows"] if row["server"] == "ours" and row["run"]]


def targets(record):
    return [dict(check_target(record, t), text=t["text"]) for t in rows.TARGETS]


def check_target(record, t):
    check = t["check"]
    if check in ("no_failures", "failures_within_in_flight"):
        cells = [(name, s, cell(record, name, s)) for name in our_rows(record) for s in t["scenarios"]]
        cells = [(name, s, c) for name, s, c in cells if c]
        if not cells:
            return {"met": None, "figure": "not measured in this run"}
        if check == "no_failures":
            bad = [(name, s, c["total_failures"]) for name, s, c in cells if c["total_failures"]]
            return {"met": not bad, "figure": "%d cells, %s" % (len(cells), "; ".join(
                "%s %s: %d failed" % b for b in bad) or "none failed")}
        bad = [(name, c["total_failures"], c["total_in_flight"]) for name, s, c in cells
               if c["total_failures"] > c["total_in_flight"]]
        return {"met": not bad, "figure": "; ".join("%s %d failed, %d in flight at %d kills" % (
            name, c["total_failures"], c["total_in_flight"], c["total_kills"]) for name, s, c in cells)}
    value = figure(record, t["figure"])
    if check == "at_most":
        if value is None:
            return {"met": None, "figure": missing(record, t["figure"])}
        return {"met": value["median"] <= t["limit"], "figure": describe(value),
                "crosses": value["min"] <= t["limit"] < value["max"]}
    against = ([figure(record, ref) for ref in t["against_max"]] if "against_max" in t
               else [figure(record, t["against"])])
    refs = [t["figure"]] + (t["against_max"] if "against_max" in t else [t["against"]])
    if value is None or any(a is None for a in against):
        return {"met": None, "figure": "; ".join(sorted({missing(record, ref) for ref, v in zip(refs, [value] + against)
                                                         if v is None}))}
    base = max(against, key=lambda a: a["median"])
    if t.get("every_round"):
        return every_round(record, t)
    ratio = value["median"] / base["median"]
    low, high = value["min"] / base["max"], value["max"] / base["min"]
    met = ratio <= t["limit"] if check == "ratio_at_most" else ratio >= t["limit"]
    return {"met": met, "figure": "%s vs %s: %.2f× (rounds' spread %.2f–%.2f×)" % (
        describe(value), describe(base), ratio, low, high), "crosses": low <= t["limit"] <= high}


def every_round(record, t):
    """A closed-loop ratio held on each round, the two rows' rounds of the same number paired."""
    (_, subject, scenario, measure), (_, base, _, _) = t["figure"], t["against"]
    def per_round(row):
        return {r["round"]: closed_round(r)[measure] for r in rounds_of(record, row, scenario)}
    mine, theirs = per_round(subject), per_round(base)
    ratios = [mine[n] / theirs[n] for n in sorted(set(mine) & set(theirs)) if theirs[n]]
    if not ratios:
        return {"met": None, "figure": "not measured in this run"}
    return {"met": min(ratios) >= t["limit"], "figure": "per round %s×" % ", ".join("%.2f" % x for x in ratios),
            "crosses": min(ratios) < t["limit"] <= max(ratios)}


def missing(record, ref):
    """Why a target's figure is not in the record."""
    kind, subject, which, _ = ref
    reason = None
    if kind in ("closed", "open"):
        row = next((r for r in record["rows"] if r["name"] == subject), None)
        reason = "%s is not in this run's rows" % subject if row is None else row["note"] if not row["run"] else None
    elif kind in CPU_EXPERIMENTS:
        reason = CPU_EXPERIMENTS[kind](record).get((subject, which), {}).get("not_run")
    elif kind == "mold_memory":
        reason = mold_memory(record).get((subject, which), {}).get("not_run")
    elif kind in ("handoff", "only_worker_killed"):
        reason = record["experiments"].get(kind, {}).get(subject, {}).get("not_run")
    elif kind == "launcher":
        reason = launcher(record).get("not_run")
    return reason or "not measured in this run"


def number(x):
    """Three significant figures, without an exponent."""
    return "%.0f" % x if abs(x) >= 100 else "%.1f" % x if abs(x) >= 10 else "%.3g" % x


def describe(value):
    if value["n"] == 1:
        return number(value["median"])
    return "%s [%s–%s]" % (number(value["median"]), number(value["min"]), number(value["max"]))
