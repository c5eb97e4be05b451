"""Process faults, injected for real: each test says what it breaks and what must still hold.

The Trac tests run the whole stack (nginx -> spawn-fcgi -> launcher ->
trac_fcgi -> Trac) under load from tests/stack.py; the rest use the small
hello worker, where a fault needs an app that misbehaves on purpose.
"""
import os
import signal
import socket
import threading
import time

import pytest

from stack import Load, drains, http_get, recycles, stop_all, trac_behind_nginx
from support import (LAUNCHER, PYTHON, TRAC_FCGI, Process, ask_in_background, children, cpu_seconds, family,
                     fcgi_get, molds_of, start_launcher, wait_until, worker_script)

HELLO = worker_script("hello.py")
PAGES = ["/wiki/WikiStart", "/timeline", "/wiki/TracGuide"]


@pytest.fixture
def site(tmp_path, trac_env):
    """nginx in front of spawn-fcgi -> launcher -> trac_fcgi; stopped after the test, nginx first."""
    started = []
    yield lambda *launcher_flags, env=None: trac_behind_nginx(started, tmp_path, trac_env, *launcher_flags, env=env)
    stop_all(*reversed(started))


def in_background(load, stop, max_seconds):
    thread = threading.Thread(target=load.run, args=(stop, max_seconds))
    thread.start()
    return thread


# --------------------------------------------------------------------------

def test_killing_a_worker_mid_load_fails_only_its_requests_in_flight_and_its_slot_serves_again(site):
    # Injects: SIGKILL to one of two Trac workers while 8 clients keep asking.
    # Holds: at most MAX_THREADS (15) requests fail, the launcher respawns the
    # slot at once, and the slot is ready again after one cold start.
    nginx, launcher = site("--workers", "2")
    killed = {}
    load = Load(nginx.port, PAGES, clients=8)
    # A worker that was ready is respawned at once, however young it is.
    runner = in_background(
        load, lambda seconds: killed and seconds > killed["at"] + 4 and len(load.answers) > killed["answers"] + 16, 120)
    wait_until(lambda: len(load.answers) >= 16, 60, "the load to be under way")
    victim = int(launcher.events("ready", slot=0)[-1]["pid"])
    killed.update(at=load.seconds, answers=len(load.answers))
    started = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    ready = wait_until(lambda: [e for e in launcher.events("ready", slot=0) if e["pid"] != str(victim)], 30)
    back_after = time.monotonic() - started
    runner.join(90)

    assert len(load.failures()) <= 15, load.summary()
    assert not launcher.events("backoff")
    # The launcher's share of the outage is what is left after the new
    # worker's own cold start (its ready_s): a respawn at once, well under
    # the shortest backoff (1 s), even on a slow, loaded machine.
    assert back_after - float(ready[0]["ready_s"]) < 1.0
    assert load.answers[-1].ok, load.summary()


def test_the_only_worker_killed_six_times_three_seconds_apart_is_back_each_time_after_one_cold_start(site):
    # Injects: SIGKILL to the only Trac worker, six times, 3 s apart (the OOM
    # killer, a crashing plugin).  Holds: each time the slot is refilled at
    # once, never after a crash backoff, and Trac answers again.
    nginx, launcher = site()
    launcher.wait_for("all-ready")
    for kill in range(1, 7):
        victim = int(launcher.events("ready", slot=0)[-1]["pid"])
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        launcher.wait_for("ready", count=kill + 1, timeout=60)
        back_after = time.monotonic() - killed_at
        ready_s = float(launcher.events("ready")[-1]["ready_s"])
        # What the launcher adds to the new worker's own cold start.
        assert back_after - ready_s < 1.0, (kill, back_after, ready_s)
        assert http_get(nginx.port, "/wiki/WikiStart").status == 200
        time.sleep(max(0.0, 3 - (time.monotonic() - killed_at)))
    assert not launcher.events("backoff"), launcher.log()


def test_a_crash_loop_backs_off_to_one_spawn_a_minute_costs_no_cpu_and_obeys_sigterm(tmp_path):
    # Injects: a worker that cannot start (TRAC_ENV names no environment).
    # Holds: spawn delays double from 1 s to the 60 s cap (so at most one spawn
    # a minute after the first minute), the launcher uses under 2% CPU, and
    # SIGTERM during a backoff is answered within 1 s.
    launcher = Process([PYTHON, LAUNCHER, "--bind", "unix:%s/s.sock" % tmp_path, "--", PYTHON, TRAC_FCGI],
                       tmp_path / "launcher.log", env={"TRAC_ENV": str(tmp_path / "no-such-env")})
    try:
        launcher.wait_for("spawn")
        cpu_before, started = cpu_seconds(launcher.pid), time.monotonic()
        launcher.wait_for("backoff", count=7, timeout=90)
        cpu = (cpu_seconds(launcher.pid) - cpu_before) / (time.monotonic() - started)
    finally:
        launcher.signal(signal.SIGTERM)
        asked = time.monotonic()
        assert launcher.wait(5) == 0
        answered = time.monotonic() - asked
    delays = [float(e["delay_s"]) for e in launcher.events("backoff")]
    assert delays[:7] == [1, 2, 4, 8, 16, 32, 60]
    assert len(launcher.events("spawn")) == 7
    assert "is not a Trac environment" in launcher.log()
    assert cpu < 0.02
    assert answered < 1


def test_a_signal_storm_keeps_every_request_answered_and_at_most_two_processes_a_slot(site):
    # Injects: 1,000 SIGUSR1 a second for 5 s at a launcher with 2 Trac workers under load.
    # Holds: never more than 2N+1 processes (the launcher and its workers),
    # every request answered whole,
    # and N ready workers at the end.
    nginx, launcher = site("--workers", "2")
    # The mold, and the children it forks workers through, fill no slot.
    slots_family = lambda: family(launcher.pid, without=molds_of(launcher.pid))
    most = [0]
    storm_over = threading.Event()
    load = Load(nginx.port, PAGES, clients=8)
    runner = in_background(load, lambda seconds: storm_over.is_set(), 120)

    def storm():
        for _ in range(5000):
            os.kill(launcher.pid, signal.SIGUSR1)
            most[0] = max(most[0], len(slots_family())) if _ % 20 == 0 else most[0]
            time.sleep(0.001)

    storm_thread = threading.Thread(target=storm)
    storm_thread.start()
    while storm_thread.is_alive():
        most[0] = max(most[0], len(slots_family()))
        time.sleep(0.005)
    launcher.wait_for("rolling-restart-done", count=len(launcher.events("rolling-restart")), timeout=60)
    storm_over.set()
    runner.join(90)

    assert most[0] <= 2 * 2 + 1
    assert load.failures() == [], load.summary()
    assert [d["abandoned"] for d in drains(launcher)] == ["0"] * len(drains(launcher))
    assert len(recycles(launcher)) >= 2
    wait_until(lambda: len(slots_family()) == 1 + 2, 30, "the launcher and two workers")
    assert nginx.get("/wiki/WikiStart").ok


def test_killing_the_launcher_takes_every_worker_with_it_and_frees_the_socket(tmp_path):
    # Injects: SIGKILL to the launcher, with a request in flight.
    # Holds: every worker exits (the one busy finishes first) within the drain
    # timeout plus 2 s, each is reaped (no zombie), and a new launcher binds
    # the same unix path at once.
    sock = str(tmp_path / "site.sock")
    reaper = Process([PYTHON, str(worker_script("subreaper.py")[1]), PYTHON, LAUNCHER,
                      "--bind", "unix:" + sock, "--workers", "2", "--", *HELLO],
                     tmp_path / "site.log", env={"TRAC_FCGI_DRAIN_TIMEOUT": "3"})
    reaper.wait_for("all-ready")
    launcher_pid = int(reaper.log().split("started pid=")[1].split()[0])
    workers = children(launcher_pid)
    threads, results = ask_in_background(sock, "delay=1")
    time.sleep(0.3)
    os.kill(launcher_pid, signal.SIGKILL)
    killed = time.monotonic()
    assert reaper.wait(3 + 2 + 5) == 0
    gone_after = time.monotonic() - killed
    threads[0].join(10)

    reaped = {int(line.split("pid=")[1].split()[0]) for line in reaper.log().splitlines()
              if line.startswith("reaped")}
    assert set(workers) <= reaped
    assert gone_after < 3 + 2
    assert results[0].status == 200, "the request in flight was finished before the worker left"
    again = Process([PYTHON, LAUNCHER, "--bind", "unix:" + sock, "--", *HELLO], tmp_path / "again.log")
    try:
        again.wait_for("all-ready")
        assert fcgi_get(sock).status == 200
    finally:
        again.stop()


@pytest.mark.parametrize("path", ["/report/hung", "/hold-log-lock"])
def test_a_hung_request_is_abandoned_at_the_drain_timeout_and_logged_by_name(tmp_path, path):
    # Injects: a request that never finishes, then a handoff.  On
    # /hold-log-lock it holds a log handler's lock, which flushing that
    # handler on the way out would wait for, for good.
    # Holds: the old worker leaves after TRAC_FCGI_DRAIN_TIMEOUT with status
    # 0, logs the request it abandons by method and path, and abandoned=1.
    launcher = start_launcher(tmp_path, HELLO, env={"TRAC_FCGI_DRAIN_TIMEOUT": "2"})
    try:
        launcher.wait_for("all-ready")
        old = int(launcher.events("ready")[0]["pid"])
        ask_in_background(launcher.socket, "delay=3600", path=path)
        time.sleep(0.3)
        launcher.signal(signal.SIGHUP)
        exit_line = launcher.wait_for("exit", pid=old, timeout=20)[0]
        assert exit_line["status"] == "0" and 2 <= float(exit_line["drain_s"]) < 5
        assert launcher.wait_for("drained", abandoned=1)
        abandoned = launcher.events("abandoned")
        assert [(a["method"], a["path"], a["bytes_sent"]) for a in abandoned] == [("GET", path, "0")]
        assert float(abandoned[0]["running_s"]) >= 2
        assert fcgi_get(launcher.socket).status == 200
    finally:
        launcher.stop()


def read_to_the_end(sock):
    received = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return received
        received += len(chunk)


@pytest.mark.parametrize("buffering", ["on", "off"])
def test_a_download_nobody_reads_holds_up_the_drain_only_when_nginx_does_not_buffer_it(tmp_path, buffering):
    # Injects: a client that stops reading an 8 MiB download (more than the
    # socket buffers between it and the worker hold), then a handoff.
    # Holds: with fastcgi_buffering on (nginx's default), nginx takes the
    # whole answer off the worker into a temporary file, so the drain ends
    # without abandoning it, however long the drain timeout, and the client
    # later gets every byte.  Off, the worker is still writing at the drain
    # timeout: it logs the download as abandoned, by path and bytes sent, and
    # the client's body stops short.
    size = 8 << 20
    drain_timeout = 120 if buffering == "on" else 3
    started = []
    try:
        nginx, launcher = trac_behind_nginx(started, tmp_path, tmp_path, "--", *HELLO,
                                            env={"TRAC_FCGI_DRAIN_TIMEOUT": str(drain_timeout)},
                                            directives={"fastcgi_buffering": buffering})
        old = int(launcher.events("ready")[0]["pid"])
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(60)
            client.connect(("127.0.0.1", nginx.port))
            client.sendall(b"GET /download?bytes=%d HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % size)
            first = client.recv(4096)
            assert first.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in first, first
            launcher.signal(signal.SIGHUP)
            launcher.wait_for("exit", pid=old, timeout=drain_timeout + 60)
            body = len(first) - first.index(b"\r\n\r\n") - 4 + read_to_the_end(client)
    finally:
        stop_all(*reversed(started))
    abandoned = launcher.events("abandoned")
    if buffering == "on":
        assert body == size
        assert launcher.events("drained", abandoned=0) and not abandoned
    else:
        assert body < size
        assert launcher.events("drained", abandoned=1)
        assert [(a["method"], a["path"]) for a in abandoned] == [("GET", "/download")], abandoned
        assert body <= int(abandoned[0]["bytes_sent"]) < size, abandoned


def test_without_memory_headroom_handoffs_stop_then_start_and_no_request_fails(site):
    # Injects: a --memory-reserve no machine has, so every handoff must break before make.
    # Holds: the launcher says so for each handoff, and with one worker every
    # request still gets a whole answer: connections wait in the backlog.
    nginx, launcher = site("--memory-reserve", "100000G",
                           env={"TRAC_FCGI_MAX_REQUESTS": "40", "TRAC_FCGI_JITTER": "0"})
    load = Load(nginx.port, PAGES, clients=8).run(lambda seconds: len(launcher.events("stop-then-start")) >= 3, 90)
    assert len(launcher.events("stop-then-start")) >= 3
    assert load.failures() == [], load.summary()


def test_with_too_few_file_descriptors_the_worker_says_so_and_keeps_serving(tmp_path):
    # Injects: ulimit -n 64 with room for 100 threads, and 120 concurrent clients.
    # Holds: accept() failing with EMFILE is logged once with the fix, the
    # connection waits in the backlog, every request is answered, no crash loop.
    sock = str(tmp_path / "s.sock")
    launcher = Process(["prlimit", "--nofile=64", PYTHON, LAUNCHER, "--bind", "unix:" + sock, "--", *HELLO],
                       tmp_path / "launcher.log", env={"TRAC_FCGI_MAX_THREADS": "100"})
    try:
        launcher.wait_for("all-ready")
        threads, results = ask_in_background(sock, "delay=1", count=120)
        for thread in threads:
            thread.join(60)
        assert [getattr(r, "status", r) for r in results] == [200] * 120
        failed = launcher.events("accept-failed")
        assert failed and "ulimit" in failed[0]["hint"]
        assert not launcher.events("backoff") and not launcher.events("exit")
    finally:
        launcher.stop()
