#!/usr/bin/env python3
"""plot.py: bench/results/latest.png from the raw records (report.py calls draw()).

One column per recycling row, at 80% of capacity in the open loop: each
worker's RSS on top, below the p99 of the requests scheduled in each second
(latency from the scheduled time), a red line at each recycle, and the p99
of the same server without recycling, dotted.  A last column: a worker's RSS
over many requests with gc.freeze on and off.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analysis  # noqa: E402

LEVEL = 0.8
RECYCLE_COLOUR = "tab:red"


def draw(record, path):
    recycling = [row for row in record["rows"]
                 if row["baseline"] and analysis.rounds_of(record, row["name"], "open", LEVEL)]
    freeze = {k: v for k, v in record["experiments"].get("freeze_memory", {}).items() if "samples" in v}
    columns = len(recycling) + (1 if freeze else 0)
    if not columns:
        return
    figure, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 6.5), squeeze=False,
                                gridspec_kw={"height_ratios": [3, 2]})
    for column, row in enumerate(recycling):
        draw_row(record, row, axes[0][column], axes[1][column])
    if freeze:
        draw_freeze(freeze, axes[0][-1], axes[1][-1])
    m = record["machine"]
    figure.suptitle("Recycling under open-loop load at %d%% of capacity, through nginx; %d cores, %s"
                    % (LEVEL * 100, m["nproc"], record["date"]), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_row(record, row, memory, latency):
    offset = 0.0
    for number, r in enumerate(analysis.rounds_of(record, row["name"], "open", LEVEL)):
        if number:
            for axis in (memory, latency):
                axis.axvline(offset, color="black", linewidth=0.6)
        for pid in sorted({s[1] for s in r["samples"]}):
            points = [(s[0], s[2] / 1024) for s in r["samples"] if s[1] == pid]
            memory.plot([offset + t for t, _ in points], [mb for _, mb in points], linewidth=1.2)
        w = r["load"]
        per_second = {}
        for index, ms in enumerate(w["latency_ms"]):
            per_second.setdefault(int(index / w["rate"]), []).append(ms)
        seconds = sorted(per_second)
        latency.plot([offset + s + 0.5 for s in seconds], [analysis.percentile(per_second[s], 99) for s in seconds],
                     color="tab:blue", marker=".", label="p99 per scheduled second" if not number else None)
        for when in r["recycles"]:
            for axis in (memory, latency):
                axis.axvline(offset + when, color=RECYCLE_COLOUR, alpha=0.35, linewidth=0.8)
        offset += r["seconds"]
    baseline = analysis.cell(record, row["baseline"], "open", LEVEL)
    if baseline:
        latency.axhline(baseline["p99_ms"]["median"], color="grey", linestyle=":",
                        label="p99 of %s, no recycling" % row["baseline"])
    c = analysis.cell(record, row["name"], "open", LEVEL)
    memory.set_title("%s\n%d recycles, p99 %.0f ms" % (row["label"], c["total_recycles"], c["p99_ms"]["median"]),
                     fontsize=9)
    memory.set_ylim(bottom=0)
    memory.set_ylabel("worker RSS, MB (a line per process)")
    latency.set_ylim(bottom=0)
    latency.set_ylabel("latency, ms")
    latency.set_xlabel("seconds (red: a recycle; black: next round)")
    latency.legend(fontsize=7, loc="upper left")


def draw_freeze(freeze, memory, answers):
    for setting, raw in freeze.items():
        points = sorted((s[0], s[2] / 1024) for s in raw["samples"])
        memory.plot([t for t, _ in points], [mb for _, mb in points], ".", markersize=2,
                    label="TRAC_FCGI_GC_FREEZE=%s" % setting)
        done = raw["answered_at"]
        answers.plot(done, range(1, len(done) + 1), label="TRAC_FCGI_GC_FREEZE=%s" % setting)
    memory.set_title("gc.freeze: worker RSS over the page mix,\ndefault limits (recycles reset it)", fontsize=9)
    memory.set_ylim(bottom=0)
    memory.legend(fontsize=7, loc="lower right")
    answers.set_ylabel("requests answered")
    answers.set_xlabel("seconds")
    answers.legend(fontsize=7, loc="upper left")


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "latest.json"
    draw(json.loads(source.read_text()), source.with_suffix(".png"))
