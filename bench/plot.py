#!/usr/bin/env python3
"""plot.py: draw bench/results/latest.png from bench/results/latest.json.

One column per recycling row (steady scenario): worker RSS per process on top,
p99 latency per second below, a mark at each recycle.  The latency axes are
shared, so uWSGI's gap at every recycle and our flat line are drawn to one scale.

bench.py calls draw() at the end of a run; run this file alone to redraw.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIO = "steady"
# Each recycling row, and the row without recycling whose p99 it is held against.
BASELINE = {"uwsgi-requests": "uwsgi", "uwsgi-rss": "uwsgi", "ours-requests": "ours", "ours-rss": "ours"}
RECYCLE_COLOUR, BASELINE_COLOUR = "tab:red", "grey"


def draw(report, path):
    cells = {cell["row"]: cell for cell in report["cells"] if cell["scenario"] == SCENARIO}
    rows = [row for row in BASELINE if row in cells]
    if not rows:
        return
    figure, axes = plt.subplots(2, len(rows), figsize=(4.2 * len(rows), 6.5), sharex=True,
                                sharey="row", squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    calibration = report.get("calibration", {})
    limits = {"ours-rss": [(calibration.get("soft_rss_mb"), "soft mark"), (calibration.get("max_rss_mb"), "limit")],
              "uwsgi-rss": [(calibration.get("uwsgi_reload_mb"), "--reload-on-rss")]}
    for column, row in enumerate(rows):
        cell, memory, latency = cells[row], axes[0][column], axes[1][column]
        # The rounds one after the other, each on a fresh server.
        offset = 0.0
        for number, timeline in enumerate(cell["timelines"]):
            if number:
                for axis in (memory, latency):
                    axis.axvline(offset, color="black", linewidth=0.6)
            for points in timeline["rss_mb"].values():
                memory.plot([offset + t for t, _ in points], [mb for _, mb in points], linewidth=1.2)
            latency.plot([offset + second + 0.5 for second, _ in timeline["p99_ms"]],
                         [ms for _, ms in timeline["p99_ms"]], color="tab:blue", marker=".",
                         label="p99 per second" if not number else None)
            # A second in which not one answer came: the gap a recycle can leave.
            answered = {second for second, _ in timeline["answers"]}
            silent = [offset + second + 0.5 for second in range(int(timeline["seconds"])) if second not in answered]
            latency.plot(silent, [0] * len(silent), linestyle="none", marker="x", color=RECYCLE_COLOUR,
                         label="a second with no answer" if silent and not number else None)
            for when in timeline["recycles"]:
                for axis in (memory, latency):
                    axis.axvline(offset + when, color=RECYCLE_COLOUR, alpha=0.35, linewidth=0.8)
            offset += timeline["seconds"]
        for value, name in limits.get(row, []):
            if value:
                memory.axhline(value, color="black", linestyle="--", linewidth=0.8)
                memory.annotate("%s %s MB" % (name, value), (0, value), xytext=(2, 2),
                                textcoords="offset points", fontsize=7)
        baseline = cells.get(BASELINE[row])
        if baseline:
            latency.axhline(baseline["p99_ms"], color=BASELINE_COLOUR, linestyle=":",
                            label="p99 of %s, no recycling" % BASELINE[row])
        memory.set_title("%s\n%d recycles in %.0f s, p99 %.0f ms" % (
            cell["label"], cell["recycles"], cell["seconds"], cell["p99_ms"]), fontsize=9)
        latency.set_xlabel("seconds of load (red: a recycle; black: next round)")
        latency.legend(fontsize=7, loc="upper left")
    # Shared axes: set the limits once every column is drawn.
    axes[0][0].set_ylim(bottom=0)
    axes[1][0].set_ylim(bottom=-50, top=max(ms for cell in cells.values() for timeline in cell.get("timelines", [])
                                            for _, ms in timeline["p99_ms"]) * 1.05)
    axes[0][0].set_ylabel("worker RSS, MB (one line per process)")
    axes[1][0].set_ylabel("p99 latency per second, ms")
    m = report["machine"]
    figure.suptitle("Recycling under steady load (wrk -c8 through nginx), %d cores, %s" % (m["nproc"], report["date"]),
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "latest.json"
    draw(json.loads(source.read_text()), source.with_suffix(".png"))
