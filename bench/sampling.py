"""sampling.py: what the server's processes and the machine did during a measurement.

Memory of each worker over time, the CPU of every process under the server,
the machine's load, and the fault injector (one worker SIGKILLed on a beat).
All read from /proc through the test suite's helpers.
"""

import os
import signal
import threading
import time
from pathlib import Path

from support import cpu_seconds, family, memory, open_connections, resident

KiB = 1024


class Sampler(threading.Thread):
    """Each worker's RSS and PSS every EVERY seconds: [time, pid, rss KiB, pss KiB].

    PSS is read from smaps_rollup, which walks the page tables; RSS alone from
    statm is cheaper, so PSS is read every PSS_EVERY-th sample.
    """
    PSS_EVERY = 4

    def __init__(self, running, every):
        threading.Thread.__init__(self, daemon=True)
        self.running, self.every, self.samples, self.done = running, every, [], threading.Event()

    def run(self):
        tick = 0
        while not self.done.wait(self.every):
            now = time.time()
            for pid in self.running.workers():
                if tick % self.PSS_EVERY == 0:
                    m = memory(pid)
                    if m:
                        self.samples.append([round(now, 3), pid, m["rss"] // KiB, m["pss"] // KiB])
                else:
                    rss = resident(pid)
                    if rss:
                        self.samples.append([round(now, 3), pid, rss // KiB, None])
            tick += 1

    def stop(self):
        self.done.set()
        self.join()
        return self.samples


class Killer(threading.Thread):
    """Faults: SIGKILL one worker every EVERY seconds, half a period out of
    step with the start, so that no kill falls on the end of a round.

    The victim is stopped (SIGSTOP) first, so the connections it holds can be
    counted before it dies: those, and only those, may fail.
    """

    def __init__(self, running, every):
        threading.Thread.__init__(self, daemon=True)
        self.running, self.every, self.kills, self.done = running, every, [], threading.Event()

    def run(self):
        wait = self.every / 2
        while not self.done.wait(wait):
            wait = self.every
            pid = self.running.victim(len(self.kills))
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
                in_flight = open_connections(pid)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"t": round(time.time(), 3), "pid": pid, "in_flight": in_flight})

    def stop(self):
        self.done.set()
        self.join()
        return self.kills


def tree_cpu(root):
    """CPU seconds of ROOT and every process under it, those already reaped included.

    A reaped child's CPU is added to its parent's cutime/cstime, so the sum over
    the live tree of each process's own and reaped children's CPU only grows.
    Per process: {pid: [command, seconds]}.
    """
    return {pid: [command(pid), round(cpu_seconds(pid, children=True), 3)] for pid in family(root)}


def cpu_between(before, after):
    """Seconds of CPU the tree used between two tree_cpu() readings.

    A process gone by the second reading was reaped inside the tree, so all
    its CPU, what it had used by the first reading too, is in its parent's.
    """
    total = sum(seconds for _, seconds in after.values()) - sum(seconds for _, seconds in before.values())
    return round(total, 3)


def command(pid):
    try:
        argv = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [os.path.basename(word.decode(errors="replace")) for word in argv[:3] if word]
    return " ".join(words)


class Machine:
    """The machine's load over a measurement: 1-minute load average at both ends
    and the fraction of all cores busy in between (from /proc/stat)."""

    def __init__(self):
        self.load_start, self.busy_start = os.getloadavg()[0], busy_jiffies()

    def end(self):
        busy, total = busy_jiffies()
        return {"load_start": round(self.load_start, 2), "load_end": round(os.getloadavg()[0], 2),
                "busy": round((busy - self.busy_start[0]) / max(1, total - self.busy_start[1]), 3)}


def busy_jiffies():
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)
