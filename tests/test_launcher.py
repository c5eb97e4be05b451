"""launcher.py, as a sysadmin would see it: real processes, sockets and signals.

The workers are tests/workers/hello.py: trac_fcgi's server around a tiny app,
with knobs to be slow, broken or silent.  Each is exec'd (--mold off), so
that its knobs act on every start; test_mold.py forks them from a mold.
"""
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from support import (LAUNCHER, PYTHON, ROOT, Process, alive, ask_in_background, children, fcgi_get,
                     start_launcher, wait_until, worker_script)

HELLO = worker_script("hello.py")


@pytest.fixture
def launch(tmp_path):
    """Start launchers on fresh sockets; stop them all at the end of the test."""
    started = []

    def launch(*flags, env=None, worker=HELLO, name="launcher"):
        launcher = start_launcher(tmp_path, worker, *flags, env=dict({"LAUNCHER_MOLD": "off"}, **(env or {})),
                                  name=name)
        started.append(launcher)
        return launcher

    yield launch
    for launcher in started:
        launcher.stop(timeout=10)


def serving_pid(launcher):
    return int(fcgi_get(launcher.socket, "/").body.split()[-1])


def slot_pids(launcher):
    """{slot: pid} of the serving workers, from the launcher's own log."""
    serving = {}
    for line in launcher.events("ready"):
        serving[line["slot"]] = int(line["pid"])
    return serving


class Poller(threading.Thread):
    """A client that asks every 10 ms until stopped, and records every answer or failure."""

    def __init__(self, address, path="/"):
        super().__init__(daemon=True)
        self.address, self.path = address, path
        self.answers, self.failures = [], []
        self.running = True

    def run(self):
        while self.running:
            try:
                response = fcgi_get(self.address, self.path, timeout=10)
                self.answers.append((time.monotonic(), response.status, response.body))
            except Exception as error:  # noqa: BLE001 - every failure counts
                self.failures.append((time.monotonic(), repr(error)))
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.join(15)


# --------------------------------------------------------------------------
# Respawn and handoff

def test_a_worker_that_exits_on_its_own_is_respawned_at_once(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    first = serving_pid(launcher)
    os.kill(first, signal.SIGTERM)  # it drains, says STOPPING=1 and exits 0
    launcher.wait_for("exit", pid=first, status=0)
    launcher.wait_for("ready", count=2, timeout=10)
    assert serving_pid(launcher) != first
    assert not launcher.events("backoff"), "a clean exit is no crash, however young"


def test_a_ready_worker_killed_again_and_again_is_respawned_at_once_each_time(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    for kill in range(1, 7):
        victim = serving_pid(launcher)
        os.kill(victim, signal.SIGKILL)
        launcher.wait_for("exit", pid=victim, signal="SIGKILL")
        launcher.wait_for("ready", count=kill + 1, timeout=10)
        assert serving_pid(launcher) != victim
        time.sleep(0.3)  # young: the old rule counted each of these as a crash
    assert not launcher.events("backoff"), "a worker that was ready can start: no backoff"


def test_a_worker_that_dies_before_ready_is_a_crash_and_backs_off(launch, tmp_path):
    switch = tmp_path / "fail-while-this-exists"
    launcher = launch(env={"HELLO_FAIL_IF_EXISTS": str(switch)})
    launcher.wait_for("all-ready")
    switch.touch()
    first = serving_pid(launcher)
    os.kill(first, signal.SIGKILL)
    assert launcher.wait_for("backoff")[0]["delay_s"] == "1.000"
    switch.unlink()
    launcher.wait_for("ready", count=2, timeout=10)
    assert serving_pid(launcher) != first


def test_handoff_is_make_before_break_and_a_client_every_10ms_is_always_answered(launch, tmp_path):
    trace = tmp_path / "trace"
    launcher = launch(env={"HELLO_START_DELAY": "1", "HELLO_TRACE": str(trace)})
    launcher.wait_for("all-ready")
    old = serving_pid(launcher)
    poller = Poller(launcher.socket)
    poller.start()
    time.sleep(0.2)
    launcher.signal(signal.SIGUSR1)
    launcher.wait_for("exit", pid=old, timeout=20)
    time.sleep(0.3)
    poller.stop()

    assert poller.failures == []
    pids = {int(body.split()[-1]) for _, status, body in poller.answers}
    assert len(poller.answers) > 50 and all(status == 200 for _, status, _ in poller.answers)
    new = slot_pids(launcher)["0"]
    assert pids == {old, new}
    # Across processes, on one monotonic clock: the old worker heard SIGHUP
    # only after its replacement said READY=1.
    events = {}
    for line in trace.read_text().split("\n"):
        if line:
            pid, what, when = line.split()
            events[(int(pid), what)] = float(when)
    assert events[(new, "ready")] < events[(old, "hup")]
    ready = launcher.events("ready", pid=new)[0]
    assert float(ready["ready_s"]) >= 1.0, "the replacement's slow warm-up was waited for"


def test_sigusr1_from_a_worker_replaces_only_that_worker(launch):
    launcher = launch("--workers", "2", env={"TRAC_FCGI_MAX_REQUESTS": "3", "TRAC_FCGI_JITTER": "0"})
    launcher.wait_for("all-ready")
    before = slot_pids(launcher)
    # Find slot 0's worker and send it 3 requests directly through the socket:
    # the kernel picks the acceptor, so keep asking until that worker has served 3.
    asker = before["0"]
    served = 0
    deadline = time.monotonic() + 20
    while served < 3 and time.monotonic() < deadline:
        if serving_pid(launcher) == asker:
            served += 1
    launcher.wait_for("replace", reason="'worker asked'", pid=asker)
    launcher.wait_for("exit", pid=asker)
    after = slot_pids(launcher)
    assert after["0"] != before["0"]
    assert alive(before["1"]) and after["1"] == before["1"] or launcher.events("replace", pid=before["1"])
    assert not launcher.events("rolling-restart")


def test_sigusr1_from_outside_replaces_every_worker_one_at_a_time(launch):
    launcher = launch("--workers", "3")
    launcher.wait_for("all-ready")
    before = set(slot_pids(launcher).values())
    launcher.signal(signal.SIGUSR1)
    launcher.wait_for("rolling-restart-done", timeout=30)
    after = set(slot_pids(launcher).values()) - before
    assert len(after) == 3
    wait_until(lambda: not any(alive(pid) for pid in before), 10, "the old workers to exit")
    # One at a time: every warming spawn is followed by its ready before the next.
    order = [line for line in launcher.log().splitlines() if "role=warming" in line or "by=notify" in line]
    kinds = ["spawn" if "role=warming" in line else "ready" for line in order[3:]]
    assert kinds == ["spawn", "ready"] * 3


def test_a_burst_of_100_sigusr1_never_gives_a_slot_more_than_two_processes(launch):
    launcher = launch(env={"HELLO_START_DELAY": "0.3"})
    launcher.wait_for("all-ready")
    most = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            most[0] = max(most[0], len(children(launcher.pid)))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(100):
        launcher.signal(signal.SIGUSR1)
        time.sleep(0.005)
    time.sleep(1)
    wait_until(lambda: not launcher.events("rolling-restart")
               or len(launcher.events("rolling-restart-done")) == len(launcher.events("rolling-restart")), 30)
    stop.set()
    watcher.join()
    assert 1 <= most[0] <= 2
    assert len(children(launcher.pid)) == 1
    assert fcgi_get(launcher.socket).status == 200


@pytest.mark.parametrize("knob, flags, failure", [
    ("HELLO_FAIL_IF_EXISTS", (), "backoff"),                               # it exits at start
    ("HELLO_SILENT_IF_EXISTS", ("--ready-timeout", "1"), "ready-timeout"),  # it never says READY=1
], ids=["dies", "silent"])
def test_a_replacement_that_dies_or_stays_silent_leaves_the_old_worker_serving_and_is_retried(
        launch, tmp_path, knob, flags, failure):
    switch = tmp_path / "fail-while-this-exists"
    launcher = launch(*flags, env={knob: str(switch)})
    launcher.wait_for("all-ready")
    old = serving_pid(launcher)
    switch.touch()
    launcher.signal(signal.SIGHUP)
    launcher.wait_for(failure, timeout=10)
    assert serving_pid(launcher) == old
    switch.unlink()
    launcher.wait_for("exit", pid=old, timeout=20)
    assert serving_pid(launcher) != old


def test_a_worker_that_never_speaks_notify_counts_as_ready_once_the_timeout_passes(launch):
    launcher = launch("--ready-timeout", "1", env={"HELLO_NOTIFY": "0"})
    launcher.wait_for("all-ready")
    assert launcher.events("ready", by="timeout")
    old = serving_pid(launcher)
    launcher.signal(signal.SIGHUP)
    launcher.wait_for("exit", pid=old, timeout=20)
    assert launcher.events("ready", by="timeout")[-1]["pid"] != str(old)
    assert fcgi_get(launcher.socket).status == 200


def test_without_memory_headroom_a_handoff_stops_the_old_worker_first_and_says_so(launch):
    launcher = launch("--memory-reserve", "100000G")
    launcher.wait_for("all-ready")
    old = serving_pid(launcher)
    launcher.signal(signal.SIGHUP)
    launcher.wait_for("stop-then-start", pid=old)
    launcher.wait_for("ready", count=2)
    assert serving_pid(launcher) != old


# --------------------------------------------------------------------------
# Crashes

def test_a_crashing_worker_is_respawned_with_doubling_backoff_and_sigterm_is_answered(tmp_path):
    launcher = Process([PYTHON, LAUNCHER, "--bind", "unix:%s/s.sock" % tmp_path, "--", "/bin/false"],
                       tmp_path / "launcher.log")
    try:
        spawns = launcher.wait_for("spawn", count=4, timeout=20)
    finally:
        launcher.signal(signal.SIGTERM)
        started = time.monotonic()
        assert launcher.wait(5) == 0
        assert time.monotonic() - started < 1.5
    delays = [float(line["delay_s"]) for line in launcher.events("backoff")]
    assert delays[:3] == [1.0, 2.0, 4.0]


# --------------------------------------------------------------------------
# Never spin, never die

def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_rolling_restart_of_three_slow_workers_costs_the_launcher_almost_no_cpu(launch):
    launcher = launch("--workers", "3", env={"HELLO_START_DELAY": "1.5"})
    launcher.wait_for("all-ready", timeout=60)
    before = cpu_seconds(launcher.pid)
    launcher.signal(signal.SIGHUP)
    launcher.wait_for("rolling-restart-done", timeout=60)
    # Waiting on a warming replacement is sleeping, not polling: the spin this
    # replaces burnt 1.6 s here, and a handful of events cost milliseconds.
    assert cpu_seconds(launcher.pid) - before <= 0.15


UNMEANT = ["SIGALRM", "SIGVTALRM", "SIGPROF", "SIGWINCH", "SIGPIPE", "SIGURG"]


def test_signals_that_end_most_processes_are_ignored_and_logged_and_the_workers_keep_serving(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    workers = children(launcher.pid)
    for name in UNMEANT:
        launcher.signal(getattr(signal, name))
        launcher.wait_for("ignored", signal=name)
    assert launcher.popen.poll() is None
    assert children(launcher.pid) == workers
    assert fcgi_get(launcher.socket).status == 200


def test_a_worker_killed_by_a_real_time_signal_is_reported_and_replaced(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    victim = serving_pid(launcher)
    os.kill(victim, signal.SIGRTMIN + 6)
    launcher.wait_for("exit", pid=victim, signal="SIGRTMIN+6")
    launcher.wait_for("ready", count=3)
    assert launcher.popen.poll() is None
    assert len(children(launcher.pid)) == 2


BUGGY_SIGTTIN = """
import sys
sys.path.insert(0, %r)
import launcher

def on_ttin(self, sender, now):
    raise RuntimeError("a bug in the SIGTTIN policy")

launcher.LauncherCore.on_ttin = on_ttin
sys.exit(launcher.main())
"""


def test_a_bug_in_the_loop_is_logged_once_with_its_traceback_and_the_launcher_goes_on(tmp_path):
    # A fault planted in one policy stands for any bug the loop may meet.
    sock = str(tmp_path / "s.sock")
    launcher = Process([PYTHON, "-c", BUGGY_SIGTTIN % str(ROOT), "--bind", "unix:" + sock, "--", *HELLO],
                       tmp_path / "launcher.log")
    try:
        launcher.wait_for("all-ready")
        for count in range(1, 4):
            launcher.signal(signal.SIGTTIN)  # one at a time: standard signals coalesce
            launcher.wait_for("loop-error", count=count)
        assert launcher.log().count("Traceback (most recent call last)") == 1
        assert launcher.log().count("RuntimeError: a bug in the SIGTTIN policy") >= 3
        assert fcgi_get(sock).status == 200
        launcher.signal(signal.SIGTERM)
        assert launcher.wait(10) == 0
    finally:
        launcher.stop()


# --------------------------------------------------------------------------
# Stop

def test_sigterm_lets_requests_in_flight_finish_then_exits_zero(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    threads, results = ask_in_background(launcher.socket, "delay=1.5")
    time.sleep(0.5)
    launcher.signal(signal.SIGTERM)
    threads[0].join(10)
    assert results[0].status == 200
    assert launcher.wait(10) == 0
    assert launcher.events("exit", status=0)


def test_sigterm_kills_what_has_not_drained_by_the_stop_timeout(launch):
    launcher = launch("--stop-timeout", "1", env={"TRAC_FCGI_DRAIN_TIMEOUT": "60"})
    launcher.wait_for("all-ready")
    threads, results = ask_in_background(launcher.socket, "delay=60")
    time.sleep(0.5)
    worker = children(launcher.pid)[0]
    launcher.signal(signal.SIGTERM)
    assert launcher.wait(10) == 0
    assert len(launcher.events("kill", pid=worker, reason="'stop timeout'")) == 1, "each worker is killed once"
    assert len(launcher.events("kill")) == 1
    assert not alive(worker)
    threads[0].join(5)
    assert isinstance(results[0], (OSError, EOFError)), "the hung request was cut off, as it had to be"


def test_sigquit_stops_at_once(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    workers = children(launcher.pid)
    launcher.signal(signal.SIGQUIT)
    assert launcher.wait(5) == 0
    assert not any(alive(pid) for pid in workers)


def test_workers_leave_when_the_launcher_is_killed(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    workers = children(launcher.pid)
    assert len(workers) == 2
    launcher.signal(signal.SIGKILL)
    launcher.wait(5)
    wait_until(lambda: not any(alive(pid) for pid in workers), 3, "workers to leave")


# --------------------------------------------------------------------------
# Slots

def test_workers_3_then_sigttin_adds_a_slot_and_sigttou_removes_one(launch):
    launcher = launch("--workers", "3")
    launcher.wait_for("all-ready")
    assert len(children(launcher.pid)) == 3
    launcher.signal(signal.SIGTTIN)
    launcher.wait_for("slot-added", workers=4)
    wait_until(lambda: len(children(launcher.pid)) == 4, 10)
    launcher.wait_for("ready", slot=3)
    launcher.signal(signal.SIGTTOU)
    launcher.wait_for("slot-removed", workers=3)
    launcher.wait_for("exit", slot=3, status=0)
    wait_until(lambda: len(children(launcher.pid)) == 3, 10)
    for workers in (2, 1):
        launcher.signal(signal.SIGTTOU)
        launcher.wait_for("slot-removed", workers=workers)
    launcher.signal(signal.SIGTTOU)
    wait_until(lambda: len(children(launcher.pid)) == 1, 10, "one worker left")
    time.sleep(0.5)
    assert len(children(launcher.pid)) == 1, "the last slot is never removed"
    assert fcgi_get(launcher.socket).status == 200


# --------------------------------------------------------------------------
# Sockets

def test_bind_unix_serves_and_the_socket_is_not_world_writable(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    assert fcgi_get(launcher.socket).status == 200
    assert os.stat(launcher.socket).st_mode & 0o777 == 0o660


def test_bind_tcp_serves(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Process([PYTHON, LAUNCHER, "--bind", "127.0.0.1:%d" % port, "--", *HELLO], tmp_path / "l.log")
    try:
        launcher.wait_for("all-ready")
        assert fcgi_get(("127.0.0.1", port)).status == 200
    finally:
        launcher.stop()


def test_the_socket_spawn_fcgi_hands_over_on_fd_0_is_used(tmp_path):
    sock = str(tmp_path / "s.sock")
    launcher = Process(["spawn-fcgi", "-n", "-s", sock, "--", PYTHON, LAUNCHER, "--", *HELLO],
                       tmp_path / "l.log")
    try:
        launcher.wait_for("all-ready")
        assert fcgi_get(sock).status == 200
    finally:
        launcher.stop()


def test_a_stale_unix_socket_file_is_replaced_but_a_live_one_is_not(launch, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "launcher.sock"))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed launcher leaves
    first = launch()
    first.wait_for("all-ready")
    second = Process([PYTHON, LAUNCHER, "--bind", "unix:" + first.socket, "--", *HELLO], tmp_path / "second.log")
    assert second.wait(10) == 2
    assert "something is listening there already" in second.log()
    assert fcgi_get(first.socket).status == 200


# --------------------------------------------------------------------------
# systemd

def test_under_systemd_it_reports_ready_reloading_and_stopping(launch, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    launcher = launch("--workers", "2", env={"NOTIFY_SOCKET": str(tmp_path / "notify")})

    def next_state():
        while True:
            message = notify.recv(4096).decode()
            if not message.startswith("STATUS="):
                return message

    assert next_state() == "READY=1"
    assert fcgi_get(launcher.socket).status == 200, "workers got the launcher's NOTIFY_SOCKET, not ours"
    launcher.signal(signal.SIGHUP)
    assert next_state().startswith("RELOADING=1")
    assert next_state() == "READY=1"
    launcher.signal(signal.SIGTERM)
    assert next_state() == "STOPPING=1"
    assert launcher.wait(10) == 0


def test_systemd_socket_activation_hands_over_fd_3(tmp_path):
    sock = str(tmp_path / "s.sock")
    launcher = Process(["systemd-socket-activate", "-l", sock, PYTHON, LAUNCHER, "--", *HELLO],
                       tmp_path / "l.log")
    try:
        wait_until(lambda: os.path.exists(sock), 10, "systemd-socket-activate to listen")
        # systemd-socket-activate starts the service on the first connection.
        assert fcgi_get(sock).status == 200
        launcher.wait_for("all-ready")
    finally:
        launcher.stop()


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run([PYTHON, LAUNCHER, "--workers", "two", "--", *HELLO],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--workers" in result.stderr
