"""trac_fcgi.py on its own: real Trac, real sockets, a real FastCGI client, real signals.

Most tests run it the way a sysadmin would without our launcher: under
spawn-fcgi, which hands it the listening socket on fd 0 and then steps aside.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from support import (PYTHON, TRAC_FCGI, Process, alive, ask_in_background, fcgi_get, fcgi_read_response,
                     fcgi_request_bytes, wait_until, worker_script)

HELLO = worker_script("hello.py")


@pytest.fixture
def spawn(tmp_path):
    """Start a worker under plain spawn-fcgi on a fresh unix socket."""
    started = []

    def spawn(argv, env=None, name="worker"):
        sock = str(tmp_path / (name + ".sock"))
        worker = Process(["spawn-fcgi", "-n", "-s", sock, "--", *argv], tmp_path / (name + ".log"), env=env)
        worker.socket = sock
        started.append(worker)
        worker.wait_for("warm")
        wait_until(lambda: os.path.exists(sock), 10)
        return worker

    yield spawn
    for worker in started:
        worker.stop(timeout=10)


# --------------------------------------------------------------------------
# Serving Trac

def test_a_trac_wiki_page_is_served_as_real_html(spawn, trac_env):
    worker = spawn([PYTHON, TRAC_FCGI], env={"TRAC_ENV": trac_env})
    response = fcgi_get(worker.socket, "/wiki/WikiStart")
    assert response.status == 200
    assert b"<title>" in response.body and b"Welcome to Trac" in response.body
    assert worker.events("warm", status=200)


def test_trac_env_parent_dir_serves_the_project_index(spawn, trac_env):
    worker = spawn([PYTHON, TRAC_FCGI], env={"TRAC_ENV_PARENT_DIR": os.path.dirname(trac_env)})
    response = fcgi_get(worker.socket, "/")
    assert response.status == 200 and b"Available Projects" in response.body


def test_path_info_is_taken_as_the_web_server_decoded_it_never_decoded_again(spawn, trac_env):
    # Web servers decode PATH_INFO; stock trac.fcgi takes it as it comes.  A
    # "%53" that arrives in it is part of a page name, not an escaped "S".
    worker = spawn([PYTHON, TRAC_FCGI], env={"TRAC_ENV": trac_env})
    response = fcgi_get(worker.socket, "/wiki/Wiki%53tart")
    assert b"Welcome to Trac" not in response.body and b"Wiki%53tart" in response.body, response
    assert b"Welcome to Trac" in fcgi_get(worker.socket, "/wiki/WikiStart").body


def test_in_a_terminal_it_serves_one_cgi_request_as_flup_does(trac_env):
    env = dict(os.environ, TRAC_ENV=trac_env, REQUEST_METHOD="GET", PATH_INFO="/wiki/WikiStart",
               SCRIPT_NAME="", SERVER_NAME="localhost", SERVER_PORT="80", SERVER_PROTOCOL="HTTP/1.1")
    result = subprocess.run([PYTHON, TRAC_FCGI], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith(b"Status: 200") and b"Welcome to Trac" in result.stdout


def test_bind_runs_a_standalone_fastcgi_server(tmp_path):
    sock = str(tmp_path / "bound.sock")
    worker = Process([PYTHON, TRAC_FCGI, "--bind", "unix:" + sock], tmp_path / "w.log",
                     env={"TRAC_FCGI_APP": "hello:app", "PYTHONPATH": os.path.dirname(HELLO[1])})
    try:
        wait_until(lambda: os.path.exists(sock), 20)
        assert fcgi_get(sock).status == 200
    finally:
        worker.stop()


def test_help_lists_every_setting():
    import trac_fcgi
    text = subprocess.run([PYTHON, TRAC_FCGI, "--help"], capture_output=True, text=True, check=True).stdout
    for name, *_ in trac_fcgi.SETTINGS:
        assert name in text
    for name in ("TRAC_ENV", "FCGI_WEB_SERVER_ADDRS", "spawn-fcgi", "SIGHUP"):
        assert name in text


# --------------------------------------------------------------------------
# Draining

def test_every_request_in_flight_at_sighup_is_answered(spawn):
    worker = spawn(HELLO)
    threads, results = ask_in_background(worker.socket, "delay=1", count=6)
    time.sleep(0.4)
    worker.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert [r.status for r in results] == [200] * 6
    assert worker.wait(10) == 0
    assert worker.events("drained", abandoned=0)


def test_a_request_accepted_but_not_yet_on_a_thread_is_answered(spawn):
    # The test worker waits 1 s between accepting a connection and running it,
    # the window in which flup's shutdown() would drop the job.
    worker = spawn(HELLO, env={"HELLO_PICKUP_DELAY": "1"})
    threads, results = ask_in_background(worker.socket, count=3)
    wait_until(lambda: worker.events("warm"), 5)
    time.sleep(0.3)
    worker.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert [r.status for r in results] == [200] * 3
    assert worker.wait(10) == 0
    assert worker.events("drain", connections=3)
    assert worker.events("drained", abandoned=0)


def test_the_drain_is_bounded_and_abandoned_requests_are_counted(spawn):
    worker = spawn(HELLO, env={"TRAC_FCGI_DRAIN_TIMEOUT": "1"})
    threads, results = ask_in_background(worker.socket, "delay=30", count=2)
    time.sleep(0.4)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert time.monotonic() - started < 5
    assert worker.events("drained", abandoned=2)


def test_a_kept_alive_connection_is_closed_cleanly_after_its_current_request_on_drain(spawn):
    worker = spawn(HELLO)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(worker.socket)
        conn.sendall(fcgi_request_bytes(1, keep_conn=True))
        assert b"hello from pid" in fcgi_read_response(conn)
        conn.sendall(fcgi_request_bytes(2, query="delay=1", keep_conn=True))
        time.sleep(0.3)
        worker.signal(signal.SIGTERM)
        assert b"hello from pid" in fcgi_read_response(conn), "the request under way is finished"
        assert conn.recv(1) == b"", "then the kept-alive connection is closed"
    assert worker.wait(10) == 0


def test_a_busy_kept_alive_connection_does_not_hold_up_the_drain(spawn):
    # nginx reuses a kept-alive connection as soon as a request ends; the drain
    # must close it after its current request, not wait for it to fall idle.
    worker = spawn(HELLO, env={"TRAC_FCGI_DRAIN_TIMEOUT": "20"})
    answered = 0
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(worker.socket)
        started = None
        for request_id in range(1, 200):
            if request_id == 5:
                worker.signal(signal.SIGTERM)
                started = time.monotonic()
            try:
                conn.sendall(fcgi_request_bytes(request_id, query="delay=0.05", keep_conn=True))
                assert b"hello from pid" in fcgi_read_response(conn)
                answered += 1
            except (EOFError, OSError):
                break
    assert worker.wait(10) == 0
    assert time.monotonic() - started < 3
    assert 4 <= answered <= 6, "at most the request under way at SIGTERM, and one already sent"
    assert worker.events("drained", abandoned=0)


def test_a_request_slower_than_the_idle_timeout_is_answered_and_not_logged_as_idle(spawn):
    # The idle timeout bounds how long a request takes to arrive, not to run.
    worker = spawn(HELLO, env={"TRAC_FCGI_IDLE_TIMEOUT": "1"})
    assert fcgi_get(worker.socket, query="delay=1.5").status == 200
    assert fcgi_get(worker.socket).status == 200
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert not worker.events("idle-closed")


def kept_alive_connection(worker):
    """A connection that has had one answer and stays open, as nginx's keepalive cache holds it."""
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(10)
    conn.connect(worker.socket)
    conn.sendall(fcgi_request_bytes(1, keep_conn=True))
    assert b"hello from pid" in fcgi_read_response(conn)
    return conn


def test_idle_kept_alive_connections_give_their_threads_up_to_a_waiting_client(spawn):
    # Every thread is held by a connection nginx keeps open between requests;
    # a new client must not wait for the idle timeout (nginx would 504 first).
    worker = spawn(HELLO, env={"TRAC_FCGI_MAX_THREADS": "2", "TRAC_FCGI_IDLE_TIMEOUT": "60"})
    kept = [kept_alive_connection(worker) for _ in range(2)]
    time.sleep(0.3)  # both have finished their requests: idle, not at a request's end
    started = time.monotonic()
    assert fcgi_get(worker.socket, timeout=10).status == 200
    assert time.monotonic() - started < 5, "answered within a couple of idle checks, not the idle timeout"
    assert kept[0].recv(1) == b"", "the connection idle longest is closed"
    kept[1].sendall(fcgi_request_bytes(2, keep_conn=True))
    assert b"hello from pid" in fcgi_read_response(kept[1])
    for conn in kept:
        conn.close()


def test_a_busy_kept_alive_connection_gives_its_thread_up_after_its_request(spawn):
    # nginx reuses a kept-alive connection the moment its request ends, so it
    # is never idle for long: it must close after a request when a client waits.
    worker = spawn(HELLO, env={"TRAC_FCGI_MAX_THREADS": "1"})
    conn = kept_alive_connection(worker)
    conn.sendall(fcgi_request_bytes(2, query="delay=0.5", keep_conn=True))
    time.sleep(0.2)
    threads, results = ask_in_background(worker.socket)
    assert b"hello from pid" in fcgi_read_response(conn), "the request under way is finished"
    assert conn.recv(1) == b"", "then the connection is closed, freeing the thread"
    conn.close()  # as nginx does when it sees the close
    threads[0].join(10)
    assert [getattr(result, "status", result) for result in results] == [200]


def test_never_refuses_four_times_max_threads_concurrent_clients(spawn):
    worker = spawn(HELLO, env={"TRAC_FCGI_MAX_THREADS": "3"})
    threads, results = ask_in_background(worker.socket, "delay=0.3", count=12)
    for thread in threads:
        thread.join(60)
    assert [getattr(r, "status", r) for r in results] == [200] * 12


# --------------------------------------------------------------------------
# Recycling

TEST_LAUNCHER = """
import os, signal, subprocess, sys, time
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(time.monotonic()))
env = dict(os.environ, LAUNCHER_PID=str(os.getpid()))
env.pop("NOTIFY_SOCKET", None)
worker = subprocess.Popen(sys.argv[1:], env=env)
while worker.poll() is None:
    time.sleep(0.05)
    with open(os.environ["ASKED_FILE"], "w") as out:
        out.write(str(len(asked)))
"""


def test_crossing_the_soft_memory_mark_asks_the_launcher_and_the_hard_limit_stops_accepting(spawn, tmp_path):
    # A test launcher that counts SIGUSR1 but never answers with SIGHUP: the
    # worker must ask, keep serving, and stop on its own at MAX_RSS.
    asked = tmp_path / "asked"
    worker = spawn([PYTHON, "-c", TEST_LAUNCHER, *HELLO],
                   env={"ASKED_FILE": str(asked), "HELLO_LEAK": str(1 << 20), "TRAC_FCGI_JITTER": "0",
                        "TRAC_FCGI_SOFT_RSS": "40M", "TRAC_FCGI_MAX_RSS": "60M"})
    statuses = []
    while not worker.events("drain") and len(statuses) < 200:
        try:
            statuses.append(fcgi_get(worker.socket, timeout=10).status)
        except (OSError, EOFError):
            break  # it stopped accepting and, with no replacement here, exited
    assert len(statuses) >= 20 and set(statuses) == {200}
    recycle = worker.events("recycle", reason="rss")
    assert recycle and int(recycle[0]["rss"]) >= 40 << 20
    wait_until(lambda: asked.exists() and int(asked.read_text() or 0) >= 1, 10, "SIGUSR1 at the test launcher")
    drain = worker.wait_for("drain", reason="max_rss")[0]
    # The promise: past MAX_RSS by at most what one request allocates (1 MiB here).
    assert 60 << 20 <= int(drain["rss"]) <= (60 << 20) + (1 << 20) + (512 << 10)


def test_without_a_launcher_it_drains_and_reexecs_in_place_keeping_the_socket(spawn):
    worker = spawn(HELLO, env={"TRAC_FCGI_MAX_REQUESTS": "5", "TRAC_FCGI_JITTER": "0"})
    statuses = [fcgi_get(worker.socket).status for _ in range(25)]
    assert statuses == [200] * 25
    assert len(worker.events("re-exec")) >= 3
    assert len(worker.events("warm")) >= 4
    assert alive(worker.pid), "the same process, re-executed, still holds fd 0"


def test_max_requests_and_lifetime_are_drawn_with_jitter():
    import trac_fcgi
    draws = {trac_fcgi.Limits({"TRAC_FCGI_MAX_REQUESTS": "1000", "TRAC_FCGI_MAX_LIFETIME": "1000"}).max_requests
             for _ in range(50)}
    assert len(draws) > 10 and min(draws) >= 900 and max(draws) <= 1100
    hard = trac_fcgi.Limits({"TRAC_FCGI_MAX_RSS": "100M", "TRAC_FCGI_JITTER": "0.5"})
    assert hard.max_rss == 100 << 20 and hard.soft_rss <= hard.max_rss


def test_an_app_that_fails_to_import_is_one_line_and_exit_status_2():
    result = subprocess.run([PYTHON, TRAC_FCGI], env=dict(os.environ, TRAC_FCGI_APP="no_such_module:app"),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "TRAC_FCGI_APP" in result.stderr


def test_a_replacement_whose_warm_up_fails_exits_without_saying_ready(tmp_path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    sock.listen()
    result = subprocess.run(HELLO, env=dict(os.environ, TRAC_FCGI_WARMUP="/broken"), stdin=sock.fileno(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "event=warm-failed" in result.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
