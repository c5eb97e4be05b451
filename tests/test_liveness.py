"""Requests that take too long, or never end: named with their stack, and cured by a replacement.

A small app of our own (tests/workers/hang.py) has /hang, which never
returns, and /slow?S, which takes S seconds.  Python cannot kill a thread,
so the cure for a stuck request is the worker: it is replaced make before
break, its healthy requests finish, and only the stuck ones are abandoned.
Most tests use short timeouts for speed; one runs with the defaults.
"""
import os
import re
import signal
import socket
import threading
import time

import pytest

from stack import START_TIMEOUT, Nginx, http_get
from support import PYTHON, WORKERS, Process, fcgi_get, start_launcher, wait_until, worker_script

HELLO = worker_script("hello.py")
HANG = WORKERS / "hang.py"
HANG_LINE = next(number for number, line in enumerate(HANG.read_text().splitlines(), 1)
                 if "NOBODY_SETS_IT.wait()" in line)


def hang_app(**settings):
    environ = {"TRAC_FCGI_APP": "hang:app", "TRAC_FCGI_JITTER": "0"}
    environ.update(("TRAC_FCGI_" + name.upper(), str(value)) for name, value in settings.items())
    return environ


def entries(process, event):
    """Every `event=EVENT` entry of PROCESS's log: (its facts, the indented lines that follow it)."""
    found, current = [], None
    for line in process.log().splitlines():
        if line.startswith("  ") and current is not None:
            current[1].append(line)
            continue
        current = None
        if line.startswith("trac-fcgi[") and " event=%s " % event in line + " ":
            current = (dict(re.findall(r"(\w+)=('[^']*'|\S+)", line)), [])
            current[0]["pid"] = line[len("trac-fcgi["):line.index("]")]
            found.append(current)
    return found


def names_the_hang(details):
    return any('hang.py", line %d, in app' % HANG_LINE in line for line in details)


def in_background(get, path, count, **kw):
    """COUNT requests for PATH at once, each on a thread of its own; their answers land in the list returned."""
    answers = []

    def ask():
        try:
            answers.append(get(path, **kw))
        except Exception as error:  # noqa: BLE001 - a failure is an answer too, for the test to judge
            answers.append(error)
    threads = [threading.Thread(target=ask, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


@pytest.fixture
def site(tmp_path, started):
    """nginx (examples/nginx.conf) in front of the launcher with one worker serving hang.py."""
    def site(env):
        launcher = start_launcher(tmp_path, HELLO, env=env)
        started.append(launcher)
        launcher.wait_for("all-ready", timeout=START_TIMEOUT)
        nginx = Nginx(tmp_path / "nginx", "unix:" + launcher.socket)
        started.append(nginx)
        return launcher, nginx
    return site


def every_thread_stuck_then_served_again(launcher, nginx, threads, request_timeout, client_timeout):
    """Hang every thread and two more; the seconds until a normal page is served again."""
    in_background(nginx.get, "/hang", threads + 2, timeout=client_timeout)
    asked = time.monotonic()
    wait_until(lambda: len(entries(launcher, "slow")) >= threads, request_timeout + START_TIMEOUT, "slow entries")
    answer = nginx.get("/", timeout=request_timeout + START_TIMEOUT)
    assert answer.ok and b"/ from pid" in answer.body, (answer, launcher.log()[-3000:])
    return time.monotonic() - asked


def assert_each_stuck_request_named_once_as_slow_and_once_as_stuck(launcher, count):
    for event in ("slow", "stuck"):
        named = [facts for facts, details in entries(launcher, event) if facts["path"] == "/hang"]
        assert len(named) == count, (event, named, launcher.log()[-4000:])
        assert all(names_the_hang(details) for _, details in entries(launcher, event)), launcher.log()[-4000:]


def test_every_thread_stuck_the_site_serves_again_on_its_own_and_names_each_stuck_request_with_its_stack(
        site, tmp_path):
    # Six requests that never end, four threads: every thread is held, two
    # wait in the backlog.  Their clients give up, as people do.
    timeout = 3
    launcher, nginx = site(hang_app(max_threads=4, slow_request=1, request_timeout=timeout, drain_timeout=60))
    first = launcher.events("ready")[0]["pid"]
    elapsed = every_thread_stuck_then_served_again(launcher, nginx, 4, timeout, client_timeout=2)
    log = launcher.log()
    assert elapsed >= timeout, "nothing could serve before the requests were stuck: %.1f s\n%s" % (elapsed, log)
    assert_each_stuck_request_named_once_as_slow_and_once_as_stuck(launcher, 4)
    assert launcher.events("recycle", reason="stuck", next="'ask launcher'"), log
    # The stuck worker leaves as soon as only stuck requests are left, not
    # at the drain timeout, and names each one it abandons.
    drained = launcher.wait_for("drained", timeout=START_TIMEOUT)[0]
    assert drained["abandoned"] == "4" and float(drained["drain_s"]) < 30, (drained, log)
    abandoned = [facts for facts, _ in entries(launcher, "abandoned") if facts["pid"] == first]
    assert [(a["path"], a["stuck"]) for a in abandoned] == [("/hang", "True")] * 4, log
    wait_until(lambda: int(first) not in [int(p) for p in os.listdir("/proc") if p.isdigit()], 30, "the old worker gone")
    # A normal load afterwards meets no failure.
    threads, answers = in_background(nginx.get, "/", 16, timeout=60)
    for thread in threads:
        thread.join(90)
    assert len(answers) == 16 and all(a.ok for a in answers), answers


def test_with_the_defaults_every_thread_stuck_the_site_serves_again_within_the_request_timeout_and_a_fork(
        site, tmp_path):
    launcher, nginx = site(hang_app(max_threads=4))
    elapsed = every_thread_stuck_then_served_again(launcher, nginx, 4, 60, client_timeout=90)
    log = launcher.log()
    ready = launcher.events("ready")
    assert len(ready) >= 2, log
    assert 60 <= elapsed <= 60 + START_TIMEOUT, (elapsed, log)
    assert_each_stuck_request_named_once_as_slow_and_once_as_stuck(launcher, 4)
    threads, answers = in_background(nginx.get, "/", 16, timeout=60)
    for thread in threads:
        thread.join(90)
    assert len(answers) == 16 and all(a.ok for a in answers), answers


def slow_requests_beside_a_stuck_one(get, process, timeout):
    """One /hang, then, a second before it turns stuck, three /slow that run past the handoff but never stuck."""
    in_background(get, "/hang", 1, timeout=timeout + START_TIMEOUT)
    wait_until(lambda: entries(process, "slow"), START_TIMEOUT, "the hang named slow")
    time.sleep(max(0.0, timeout - 2 - float(entries(process, "slow")[0][0]["running_s"])))
    return in_background(get, "/slow", 3, query=str(timeout - 2))


def test_healthy_requests_in_flight_on_a_worker_replaced_for_a_stuck_one_all_finish_with_200(tmp_path, started):
    timeout = 8
    launcher = start_launcher(tmp_path, HELLO, "--verbose", env=hang_app(max_threads=4, slow_request=1,
                                                                           request_timeout=timeout, drain_timeout=60))
    started.append(launcher)
    launcher.wait_for("all-ready", timeout=START_TIMEOUT)
    get = lambda path, timeout=60, **kw: fcgi_get(launcher.socket, path, timeout=timeout, **kw)
    threads, answers = slow_requests_beside_a_stuck_one(get, launcher, timeout)
    for thread in threads:
        thread.join(60)
    log = launcher.log()
    assert [a.status for a in answers] == [200] * 3, (answers, log)
    drain = launcher.wait_for("drain", reason="SIGHUP")[0]
    assert int(drain["connections"]) == 4, ("the slow ones were in flight at the handoff", drain, log)
    drained = launcher.wait_for("drained")[0]
    assert drained["abandoned"] == "1", log
    assert [facts["path"] for facts, details in entries(launcher, "stuck") if names_the_hang(details)] == ["/hang"]
    # The counts reach the launcher, for its metrics, as they change and with STOPPING=1.
    old = launcher.events("ready")[0]["pid"]
    told = [set(n["fields"].split(",")) for n in launcher.events("notify", pid=old)]
    assert {"REQUESTS", "SLOW", "STUCK"} <= set.union(*told), told
    assert any({"STOPPING", "REQUESTS", "SLOW", "STUCK", "ABANDONED"} <= fields for fields in told), told


@pytest.fixture
def spawned(tmp_path):
    """A worker serving hang.py under plain spawn-fcgi, once warm; .get(path, ...) asks it over FastCGI."""
    workers = []

    def spawned(env, wait=True):
        sock = str(tmp_path / "worker.sock")
        worker = Process(["spawn-fcgi", "-n", "-s", sock, "--", *HELLO], tmp_path / "worker.log", env=env)
        workers.append(worker)
        worker.get = lambda path, timeout=60, **kw: fcgi_get(sock, path, timeout=timeout, **kw)
        if wait:
            worker.wait_for("warm", timeout=START_TIMEOUT)
            wait_until(lambda: os.path.exists(sock), 10)
        return worker
    yield spawned
    for worker in workers:
        worker.stop()


def test_under_plain_spawn_fcgi_a_stuck_request_reexecs_the_worker_once_its_healthy_requests_finish(spawned):
    timeout = 6
    worker = spawned(hang_app(max_threads=4, slow_request=1, request_timeout=timeout, drain_timeout=60))
    threads, answers = slow_requests_beside_a_stuck_one(worker.get, worker, timeout)
    worker.wait_for("re-exec", timeout=START_TIMEOUT)
    for thread in threads:
        thread.join(60)
    log = worker.log()
    assert [a.status for a in answers] == [200] * 3, (answers, log)
    assert worker.events("recycle", reason="stuck", next="re-exec"), log
    drained = worker.wait_for("drained")[0]
    assert drained["abandoned"] == "1", log
    # Forked from a process whose stuck thread may hold locks, a stand-in
    # could wait on them for good: the new image comes up from the backlog.
    assert not worker.events("stand-in"), log
    worker.wait_for("warm", count=2, timeout=START_TIMEOUT)
    assert worker.get("/", timeout=START_TIMEOUT).status == 200
    assert [facts["path"] for facts, details in entries(worker, "stuck") if names_the_hang(details)] == ["/hang"]


def test_sigusr2_logs_every_threads_stack_with_its_request_and_the_worker_serves_on(spawned):
    worker = spawned(hang_app(max_threads=3, slow_request=0.5, drain_timeout=1))
    in_background(worker.get, "/hang", 1)
    wait_until(lambda: entries(worker, "slow"), 30, "the request in flight")
    worker.signal(signal.SIGUSR2)
    wait_until(lambda: entries(worker, "stacks"), 30, "event=stacks")
    facts, details = entries(worker, "stacks")[0]
    # The main thread and the pool's three, each named with what it serves.
    heads = [line for line in details if line.startswith("  thread=")]
    assert int(facts["threads"]) == len(heads) >= 2 and facts["in_flight"] == "1", details
    assert [line for line in heads if "path=/hang" in line and "running_s=" in line], details
    assert names_the_hang(details) and any("_serve" in line for line in details), details
    assert worker.get("/", timeout=30).status == 200
    assert worker.popen.poll() is None


def test_a_slow_request_is_logged_once_with_its_stack_and_never_as_stuck(spawned):
    worker = spawned(hang_app(slow_request=0.5, request_timeout=30))
    assert worker.get("/slow", query="2.5").status == 200
    assert worker.get("/").status == 200
    slow = entries(worker, "slow")
    assert len(slow) == 1 and slow[0][0]["path"] == "/slow", worker.log()
    assert any('hang.py", line' in line and "in app" in line for line in slow[0][1]), slow
    assert not entries(worker, "stuck")


def test_a_worker_beats_the_watchdog_with_ready_then_from_its_loop_and_on_while_it_drains(tmp_path, spawned):
    # systemd's contract, which the launcher gives too: WATCHDOG_USEC in the
    # environment, WATCHDOG=1 at least every quarter of it, the first with READY=1.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(START_TIMEOUT)
    worker = spawned(dict(hang_app(slow_request=0.5), NOTIFY_SOCKET=str(tmp_path / "notify"),
                          WATCHDOG_USEC="1000000"), wait=False)
    try:
        messages = [notify.recv(4096).decode()]
        assert messages == ["READY=1\nWATCHDOG=1"], (messages, worker.log())
        while len(messages) < 3:
            messages.append(notify.recv(4096).decode())
        assert messages[1:] == ["WATCHDOG=1"] * 2, messages
        threads, answers = in_background(worker.get, "/slow", 1, query="4")
        wait_until(lambda: entries(worker, "slow"), 30, "the request in flight")
        worker.signal(signal.SIGTERM)
        during_drain = []
        while True:
            message = notify.recv(4096).decode()
            if message.startswith("STOPPING=1"):
                break
            during_drain.append(message)
        threads[0].join(30)
        assert [a.status for a in answers] == [200], (answers, worker.log())
        assert worker.events("drain", reason="SIGTERM", connections=1), worker.log()
        assert len(during_drain) >= 2 and set(during_drain) == {"WATCHDOG=1"}, during_drain
    finally:
        notify.close()
