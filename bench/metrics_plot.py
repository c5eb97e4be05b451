#!/usr/bin/env python3
"""bench/metrics_plot.py: a recycling run seen through --metrics-file, drawn as bench/results/metrics.png.

nginx -> spawn-fcgi -> launcher (2 workers, a recycle every TRAC_FCGI_MAX_REQUESTS)
-> trac-fcgi, under wrk.  The metrics file is read twice a second, as a
Prometheus scraping node_exporter would read it.  Then the load stops and the
launcher's CPU time is measured over an idle spell: the cost of rewriting the
file every 10 s.  Last, one write (read /proc for both workers, render, write,
rename) is timed in-process.

    .venv/bin/python bench/metrics_plot.py
    METRICS_LOAD_S=30 METRICS_IDLE_S=30 METRICS_MAX_REQUESTS=100 .venv/bin/python bench/metrics_plot.py

Writes bench/results/metrics.png and bench/results/metrics.md; scratch files
go to bench/work/metrics/.  Needs matplotlib (bench/run installs it).
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import launcher  # noqa: E402
from stack import Nginx, start_trac  # noqa: E402
from support import make_trac_env  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "metrics"
LOAD_S = int(os.environ.get("METRICS_LOAD_S", "60"))
IDLE_S = int(os.environ.get("METRICS_IDLE_S", "60"))
MAX_REQUESTS = os.environ.get("METRICS_MAX_REQUESTS", "100")
CLIENTS = 8
PAGE = "/wiki/WikiStart"
TICKS = os.sysconf("SC_CLK_TCK")


def sample(path, started):
    """One read of the file: its figures, per worker and in total."""
    try:
        metrics = launcher.read_metrics(Path(path).read_text())
    except (OSError, ValueError):
        return None
    workers = {}
    for name, column in (("trac_fcgi_worker_resident_bytes", "rss"), ("trac_fcgi_worker_pss_bytes", "pss"),
                         ("trac_fcgi_worker_private_bytes", "private")):
        for pairs, value in metrics.get(name, {}).items():
            labels = dict(pairs)
            workers.setdefault(int(labels["pid"]), {"slot": int(labels["slot"])})[column] = value
    total = lambda name: sum(metrics.get(name, {}).values())
    return {"t": time.monotonic() - started, "workers": workers,
            "requests": total("trac_fcgi_requests_total"), "recycles": total("trac_fcgi_recycles_total"),
            "backlog": total("trac_fcgi_listen_backlog")}


def cpu_ticks(pid):
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def one_write_ms(process, path, repeat=200):
    """In-process: read /proc for the live workers, render, write and rename, REPEAT times."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                           text=True).stdout.split()]
    workers = [(slot, pid, "serving", 1.0, 0) for slot, pid in enumerate(pids)]
    tally = launcher.Tally()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(WORK / "probe.sock"))
    listener.listen(8)
    # CPU time, ours and the kernel's on our behalf (the page-table walk of
    # smaps_rollup): on a shared machine, wall time mostly measures the others.
    started = time.process_time()
    for _ in range(repeat):
        launcher.write_atomically(path, launcher.render_metrics(
            launcher.metrics_values(tally, 2, 2, workers, listener)))
    listener.close()
    return (time.process_time() - started) / repeat * 1000, len(pids)


def draw(samples, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, rate, backlog) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 1.5, 1]})
    colours = {0: "tab:blue", 1: "tab:orange"}
    series = {}
    for s in samples:
        for pid, w in s["workers"].items():
            series.setdefault(pid, {"slot": w["slot"], "t": [], "rss": [], "pss": []})
            if "rss" in w and "pss" in w:
                series[pid]["t"].append(s["t"])
                series[pid]["rss"].append(w["rss"] / 2 ** 20)
                series[pid]["pss"].append(w["pss"] / 2 ** 20)
    for pid, line in series.items():
        colour = colours.get(line["slot"], "grey")
        memory.plot(line["t"], line["rss"], color=colour, linewidth=1.2)
        memory.plot(line["t"], line["pss"], color=colour, linewidth=1.2, linestyle="--")
    memory.plot([], [], color="black", label="trac_fcgi_worker_resident_bytes")
    memory.plot([], [], color="black", linestyle="--", label="trac_fcgi_worker_pss_bytes")
    for slot, colour in colours.items():
        memory.plot([], [], color=colour, linewidth=4, label="slot %d" % slot)
    recycled = [b["t"] for a, b in zip(samples, samples[1:]) if b["recycles"] > a["recycles"]]
    for axis in (memory, rate, backlog):
        for t in recycled:
            axis.axvline(t, color="red", alpha=0.25, linewidth=1)
    memory.set_ylabel("MiB per worker")
    memory.legend(loc="lower right", fontsize=8, ncol=2)
    memory.set_title("2 workers, TRAC_FCGI_MAX_REQUESTS=%s, wrk -c%d %s; red: a recycle "
                     "(trac_fcgi_recycles_total)" % (MAX_REQUESTS, CLIENTS, PAGE), fontsize=9)
    pairs = [(b["t"], (b["requests"] - a["requests"]) / (b["t"] - a["t"]))
             for a, b in zip(samples, samples[1:]) if b["t"] > a["t"]]
    # Workers report once a second: a 2 s window smooths the steps.
    window = [(t, sum(r for t2, r in pairs if t - 2 < t2 <= t) / max(1, len([1 for t2, _ in pairs if t - 2 < t2 <= t])))
              for t, _ in pairs]
    rate.plot([t for t, _ in window], [r for _, r in window], color="black", linewidth=1)
    rate.set_ylabel("requests/s\n(rate of requests_total)", fontsize=8)
    backlog.step([s["t"] for s in samples], [s["backlog"] for s in samples], color="black", where="post",
                 linewidth=1)
    backlog.set_ylabel("listen_backlog", fontsize=8)
    backlog.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(png, dpi=90)


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    RESULTS.mkdir(exist_ok=True)
    trac_env = make_trac_env(WORK / "env")
    path = str(WORK / "trac.prom")
    started_things = []
    try:
        process = start_trac(WORK, trac_env, "--workers", "2", "--metrics-file", path,
                             env={"TRAC_FCGI_MAX_REQUESTS": MAX_REQUESTS}, cleanup=started_things)
        nginx = Nginx(WORK / "nginx", "unix:" + process.socket)
        started_things.append(nginx)
        started = time.monotonic()
        wrk = subprocess.Popen(["wrk", "-t2", "-c%d" % CLIENTS, "-d%ds" % LOAD_S, "--timeout", "30s",
                                nginx.url(PAGE)], stdout=subprocess.PIPE, text=True)
        samples = []
        while wrk.poll() is None:
            s = sample(path, started)
            if s:
                samples.append(s)
            time.sleep(0.5)
        wrk_out = wrk.stdout.read()
        # Let the last workers report, then sample the quiet site for a few seconds more.
        settle_until = time.monotonic() + 5
        while time.monotonic() < settle_until:
            samples.append(sample(path, started))
            time.sleep(0.5)
        samples = [s for s in samples if s]
        answered = len([1 for line in nginx.access_log_path.read_text().splitlines() if '" 200 ' in line])
        counted = samples[-1]["requests"]

        # Idle: the launcher's CPU time, and how often it rewrote the file.
        ticks, mtimes = cpu_ticks(process.pid), set()
        idle_until = time.monotonic() + IDLE_S
        while time.monotonic() < idle_until:
            mtimes.add(os.stat(path).st_mtime_ns)
            time.sleep(0.5)
        idle_cpu_s = (cpu_ticks(process.pid) - ticks) / TICKS
        write_ms, workers = one_write_ms(process, str(WORK / "probe.prom"))
        status = subprocess.run([sys.executable, str(ROOT / "launcher.py"), "status", path],
                                capture_output=True, text=True).stdout
    finally:
        for thing in reversed(started_things):
            thing.stop()

    draw(samples, RESULTS / "metrics.png")
    rps = re.search(r"Requests/sec:\s*([\d.]+)", wrk_out)
    report = """\
Measured by `.venv/bin/python bench/metrics_plot.py` (%d s of `wrk -c%d` on `%s`,
2 workers, `TRAC_FCGI_MAX_REQUESTS=%s`, then %d s idle):

- nginx answered %d requests with 200; `trac_fcgi_requests_total` counted %d (%+.1f%%);
  wrk saw %s requests/s; %d recycles.
- Idle, the launcher rewrote the file %d times in %d s and used %.2f s of CPU
  (%d ticks of %d Hz).
- One write (read `/proc` for %d workers and the backlog, render, write, rename),
  timed in-process: %.2f ms of CPU.
- The machine's load average (1, 5, 15 min) at the end: %s, on %d CPUs.

`trac-fcgi-launcher status` at the end of the run:

```
%s```
""" % (LOAD_S, CLIENTS, PAGE, MAX_REQUESTS, IDLE_S, answered, counted,
       100.0 * (counted - answered) / max(answered, 1), rps.group(1) if rps else "?",
       samples[-1]["recycles"], len(mtimes), IDLE_S, idle_cpu_s, round(idle_cpu_s * TICKS), TICKS,
       workers, write_ms, " ".join(open("/proc/loadavg").read().split()[:3]), os.cpu_count(), status)
    (RESULTS / "metrics.md").write_text(report)
    sys.stdout.write(report)


if __name__ == "__main__":
    main()
