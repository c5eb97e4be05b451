"""The headroom check reads the launcher's memory cgroup, with a real cgroup the test makes.

Under systemd's MemoryMax= or in a container, the kernel enforces the
cgroup's limit, not the host's MemAvailable: a make-before-break handoff that
fits the host could still meet the cgroup's OOM killer.  Here the launcher
runs in a memory cgroup of its own whose limit fits its two workers and not
a third, and every handoff must stop the old worker before starting the new
one, with nothing OOM-killed and no request failed.
"""
import os
import shutil
import signal
import subprocess
import time

import pytest

from support import LAUNCHER, PYTHON, Process, fcgi_get, resident, wait_until, worker_script
from test_launcher import Poller

BALLAST = 40 << 20  # each worker's own memory, beside what the interpreter takes


def our_memory_cgroup():
    """The directory of the memory cgroup we are in, and the names of its limit and its OOM counter."""
    with open("/proc/self/cgroup") as lines:
        memberships = [line.rstrip("\n").split(":", 2) for line in lines]
    for _, controllers, path in memberships:
        if "memory" in controllers.split(","):
            return "/sys/fs/cgroup/memory" + path, "memory.limit_in_bytes", "memory.oom_control"
    for hierarchy, controllers, path in memberships:
        if hierarchy == "0" and not controllers:
            return "/sys/fs/cgroup" + path, "memory.max", "memory.events"
    return None, None, None


@pytest.fixture
def cgroup(tmp_path):
    parent, limit_name, oom_name = our_memory_cgroup()
    directory = parent and os.path.join(parent, "trac-fcgi-test-%d" % os.getpid())
    try:
        os.mkdir(directory)
        if not os.path.exists(os.path.join(directory, limit_name)):
            raise OSError("no %s in a new cgroup: the memory controller is not enabled for it" % limit_name)
    except (OSError, TypeError) as error:
        if directory and os.path.isdir(directory):
            os.rmdir(directory)
        pytest.skip("cannot make a memory cgroup under %s: %s" % (parent, error))
    yield directory, limit_name, oom_name
    deadline = time.monotonic() + 30
    while True:
        with open(os.path.join(directory, "cgroup.procs")) as procs:
            left = [int(pid) for pid in procs.read().split()]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(directory)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read(path):
    with open(path) as source:
        return source.read()


def working_set(directory):
    """What the launcher compares with the limit: usage less the inactive file cache."""
    usage = int(read(os.path.join(directory, "memory.usage_in_bytes" if os.path.exists(
        os.path.join(directory, "memory.usage_in_bytes")) else "memory.current")))
    stat = dict(line.split() for line in read(os.path.join(directory, "memory.stat")).splitlines())
    return usage - int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))


def oom_kills(directory, oom_name):
    fields = dict(line.split() for line in read(os.path.join(directory, oom_name)).splitlines())
    return int(fields.get("oom_kill", 0))


def test_in_a_cgroup_that_fits_two_workers_not_three_handoffs_stop_then_start_and_nothing_is_oom_killed(
        cgroup, tmp_path):
    directory, limit_name, oom_name = cgroup
    sock = str(tmp_path / "launcher.sock")
    command = [PYTHON, LAUNCHER, "--bind", "unix:" + sock, "--workers", "2", "--mold", "off",
               "--memory-reserve", "1M", "--metrics-file", str(tmp_path / "trac.prom"), "--", *worker_script("hello.py")]
    # Into the cgroup before the exec, so that every worker is born in it.
    shell = 'echo $$ > "$0"/cgroup.procs && exec "$@"'
    launcher = Process(["sh", "-c", shell, directory, *command], tmp_path / "launcher.log",
                       env={"HELLO_BALLAST": str(BALLAST), "TRAC_FCGI_MAX_REQUESTS": "10", "TRAC_FCGI_JITTER": "0"})
    launcher.socket = sock
    try:
        launcher.wait_for("all-ready", timeout=60)
        workers = [int(e["pid"]) for e in launcher.events("ready")]
        size = max(resident(pid) for pid in workers)
        assert size > BALLAST
        # Room for what runs now and half a worker more: a third would not fit.
        limit = working_set(directory) + size // 2
        with open(os.path.join(directory, limit_name), "w") as out:
            out.write(str(limit))
        limit = int(read(os.path.join(directory, limit_name)))  # as the kernel took it: whole pages
        poller = Poller(sock)
        poller.start()
        try:
            launcher.wait_for("stop-then-start", count=4, timeout=120)
        finally:
            poller.stop()
        handoffs = launcher.events("stop-then-start")
        assert {e["limit"] for e in handoffs} == {"cgroup"}
        assert all(int(e["cgroup_limit"]) == limit for e in handoffs)
        assert not poller.failures, poller.failures[:3]
        assert {status for _, status, _ in poller.answers} == {200} and len(poller.answers) > 40
        assert oom_kills(directory, oom_name) == 0
        assert not [e for e in launcher.events("exit") if "signal" in e], "a worker was killed"
        assert not launcher.events("crash") and not launcher.events("backoff")
        # The handoffs can all land inside one coalescing window of the metrics
        # writes; the file reports the limit by its next write, at most ten seconds on.
        reported = "trac_fcgi_cgroup_memory_limit_bytes %d\n" % limit
        wait_until(lambda: reported in read(tmp_path / "trac.prom"), timeout=60,
                   what="the metrics file reports the cgroup's limit")
    finally:
        launcher.stop(timeout=30)
