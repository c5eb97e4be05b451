"""trac_fcgi.py on its own: real Trac, real sockets, a real FastCGI client, real signals.

Most tests run it the way a sysadmin would without our launcher: under
spawn-fcgi, which hands it the listening socket on fd 0 and then steps aside.
"""
import os
import signal
import socket
import sqlite3
import stat
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import pytest

import trac_fcgi

from support import (FCGI_BEGIN_REQUEST, PYTHON, TRAC_FCGI, Process, alive, ask_in_background, fcgi_get,
                     fcgi_read_response, fcgi_record, fcgi_request_bytes, make_trac_env, start_launcher, wait_until,
                     worker_script)

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


def test_help_lists_every_setting_once_with_its_default():
    import trac_fcgi
    text = subprocess.run([PYTHON, TRAC_FCGI, "--help"], capture_output=True, text=True, check=True).stdout
    for name, _, default, _ in trac_fcgi.SETTINGS:
        row = text[text.index("  %s " % name):].split("\n  TRAC_")[0]
        assert row.count("(default") == 1, row
        assert default is None or "(default %s)" % default in " ".join(row.split()), row
    assert "see meaning" not in text
    for name in ("TRAC_ENV", "FCGI_WEB_SERVER_ADDRS", "spawn-fcgi", "SIGHUP"):
        assert name in text


# --------------------------------------------------------------------------
# Running as checked out

def test_the_checkout_runs_as_a_program_with_help_and_version():
    """./trac_fcgi.py and ./launcher.py, through their shebangs: whichever
    python3 is first on PATH, with flup or without, answers --help and --version."""
    import trac_fcgi
    for script, says in (("./trac_fcgi.py", "TRAC_FCGI_MAX_RSS"), ("./launcher.py", "WORKER_PATH")):
        for flag, answer in (("--help", says), ("--version", trac_fcgi.__version__)):
            result = subprocess.run([script, flag], cwd=os.path.dirname(TRAC_FCGI), capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0 and answer in result.stdout, (script, flag, result.stderr)
            assert result.stderr == ""


@pytest.fixture(scope="module")
def python_without_flup(tmp_path_factory):
    """A fresh venv's python: the standard library and nothing else."""
    import venv
    target = tmp_path_factory.mktemp("bare") / "venv"
    venv.create(target, with_pip=False)
    python = str(target / "bin" / "python")
    assert subprocess.run([python, "-c", "import flup"], capture_output=True).returncode != 0
    return python


def test_a_python_without_flup_gets_one_line_naming_it_and_the_pip_command(python_without_flup, tmp_path):
    with listening_socket(tmp_path) as sock:
        result = subprocess.run([python_without_flup, TRAC_FCGI], stdin=sock, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "%s -m pip install flup" % python_without_flup in result.stderr


def test_help_and_version_work_without_flup(python_without_flup):
    import trac_fcgi
    for flag, says in (("--help", "TRAC_FCGI_MAX_RSS"), ("--version", trac_fcgi.__version__)):
        result = subprocess.run([python_without_flup, TRAC_FCGI, flag], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and says in result.stdout and result.stderr == "", result


def listening_socket(tmp_path, name="fd0.sock"):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / name))
    sock.listen()
    return sock


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


def test_the_drain_is_bounded_and_each_abandoned_request_is_logged_by_name(spawn):
    worker = spawn(HELLO, env={"TRAC_FCGI_DRAIN_TIMEOUT": "1"})
    threads, results = ask_in_background(worker.socket, "delay=30", count=2, path="/hung")
    time.sleep(0.4)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert time.monotonic() - started < 5
    assert worker.events("drained", abandoned=2)
    abandoned = worker.events("abandoned")
    assert [(a["method"], a["path"], a["client"], a["bytes_sent"]) for a in abandoned] == [
        ("GET", "/hung", "127.0.0.1", "0")] * 2
    assert all(float(a["running_s"]) >= 1 for a in abandoned), abandoned


# --------------------------------------------------------------------------
# A web server that has given up

def test_a_request_whose_web_server_closed_the_connection_before_it_ran_is_dropped_and_logged(spawn):
    # As nginx does at fastcgi_read_timeout: the request waited in the backlog
    # (here behind a stopped worker) until the web server closed its end.
    worker = spawn(HELLO)
    worker.signal(signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(worker.socket)
            conn.sendall(fcgi_request_bytes(1, path="/newticket", method="POST", body=b"summary=x",
                                            params={"HTTP_X_REQUEST_START": "t=%.3f" % time.time()}))
            time.sleep(1)
    finally:
        worker.signal(signal.SIGCONT)
    dropped = worker.wait_for("dropped")[0]
    assert (dropped["method"], dropped["path"]) == ("POST", "/newticket")
    assert float(dropped["waited_s"]) >= 1, "measured from when the web server began (X-Request-Start)"
    assert fcgi_get(worker.socket).status == 200
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert worker.events("drained", requests=1), "the application ran only for the GET"


def test_an_answer_that_cannot_be_delivered_is_logged_with_its_request(spawn):
    worker = spawn(HELLO)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(worker.socket)
        # A path is the client's to choose (nginx decodes %0A): it stays on its line.
        conn.sendall(fcgi_request_bytes(1, path="/slow\nevent=forged", query="delay=0.5"))
        time.sleep(0.2)  # the application is running: the web server was there when it began
    undelivered = worker.wait_for("undelivered")[0]
    assert (undelivered["method"], undelivered["path"]) == ("GET", repr("/slow\nevent=forged"))
    assert not worker.events("forged")
    assert undelivered["error"] in ("EPIPE", "ECONNRESET"), undelivered
    assert not worker.events("dropped")
    assert fcgi_get(worker.socket).status == 200


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


def most_at_once(spawn, turn, delay):
    """Four requests of DELAY seconds sent together to a worker with TRAC_FCGI_TURN=TURN, all answered:
    the most that were in the application at once (hello.py's /overlap)."""
    worker = spawn(HELLO, env={"TRAC_FCGI_TURN": turn})
    threads, results = ask_in_background(worker.socket, query="delay=%s" % delay, count=4)
    for thread in threads:
        thread.join(60)
    assert [getattr(result, "status", result) for result in results] == [200] * 4
    return int(fcgi_get(worker.socket, "/overlap").body)


def test_requests_run_the_application_one_at_a_time_within_their_turns(spawn):
    assert most_at_once(spawn, turn="600", delay=0.2) == 1


def test_a_quick_request_is_answered_while_a_slow_one_runs_past_its_turn(spawn):
    worker = spawn(HELLO, env={"TRAC_FCGI_TURN": "0.1"})
    threads, results = ask_in_background(worker.socket, query="delay=10")
    wait_until(lambda: fcgi_get(worker.socket, "/overlap").body == b"1\n", what="the slow one running")
    assert fcgi_get(worker.socket).status == 200
    assert not results, "answered before the slow one ended"
    threads[0].join(60)
    assert [getattr(result, "status", result) for result in results] == [200]


def test_turn_zero_runs_requests_all_at_once_as_flup_does(spawn):
    assert most_at_once(spawn, turn="0", delay=1) >= 2


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
    # While each new image starts, a forked stand-in serves: asked faster
    # than an exec takes, most requests go to it.  So ask until 3 re-execs.
    statuses = []
    while len(worker.events("re-exec")) < 3 and len(statuses) < 2000:
        statuses.append(fcgi_get(worker.socket).status)
    assert statuses == [200] * len(statuses)
    assert len(worker.events("re-exec")) >= 3
    worker.wait_for("warm", count=4, timeout=60)
    assert alive(worker.pid), "the same process, re-executed, still holds fd 0"


def test_the_reload_turn_is_a_lock_only_the_sites_own_user_can_open(tmp_path):
    # Any local user could bind an abstract socket name first, and so keep a
    # pool from ever reloading; a 0600 file in a 0700 directory is ours alone.
    run = tempfile.mkdtemp(prefix="trac-fcgi-test-", dir="/tmp")  # made 0700, under a /tmp anyone can search
    environ = {"TRAC_ENV": str(tmp_path), "XDG_RUNTIME_DIR": run}
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = run
    try:
        turn, rival = trac_fcgi.ReloadTurn(dict(environ)), trac_fcgi.ReloadTurn(dict(environ))
        assert turn.take() and not rival.take(), "one holder at a time"
        path = os.path.join(run, turn.file_name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.stat(path).st_uid == os.geteuid()
        if os.geteuid() == 0:
            # As someone else, even with the directory opened to them, the
            # file cannot be opened, so it cannot be locked.
            os.chmod(run, 0o711)
            other = subprocess.run(["flock", "-n", path, "true"], user=65534, group=65534,
                                   capture_output=True, text=True)
            os.chmod(run, 0o700)
            assert other.returncode != 0 and "Permission denied" in other.stderr, other
        assert turn.release() and rival.take(), "given up, it is the next one's"
        rival.release()
    finally:
        os.environ.pop("XDG_RUNTIME_DIR") if saved is None else os.environ.update(XDG_RUNTIME_DIR=saved)
        shutil.rmtree(run)


def test_where_the_turns_directory_is_not_the_users_alone_a_worker_says_so_once_and_reloads_all_the_same(
        spawn, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others may write here: they could plant or hold the file
    worker = spawn(HELLO, env={"XDG_RUNTIME_DIR": str(shared)})
    for reloads in (1, 2):
        worker.signal(signal.SIGHUP)
        worker.wait_for("warm", count=reloads + 1, timeout=60)
    assert len(worker.events("reload-turn-unavailable")) == 2, worker.log()  # once per image
    assert not list(shared.iterdir())
    assert fcgi_get(worker.socket).status == 200


def test_max_requests_and_lifetime_are_drawn_with_jitter():
    import trac_fcgi
    draws = {trac_fcgi.Limits({"TRAC_FCGI_MAX_REQUESTS": "1000", "TRAC_FCGI_MAX_LIFETIME": "1000"}).max_requests
             for _ in range(50)}
    assert len(draws) > 10 and min(draws) >= 900 and max(draws) <= 1100
    hard = trac_fcgi.Limits({"TRAC_FCGI_MAX_RSS": "100M", "TRAC_FCGI_JITTER": "0.5"})
    assert hard.max_rss == 100 << 20 and hard.soft_rss <= hard.max_rss


def test_an_app_that_fails_to_import_is_one_line_and_exit_status_2(tmp_path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    sock.listen()
    result = subprocess.run([PYTHON, TRAC_FCGI], env=dict(os.environ, TRAC_FCGI_APP="no_such_module:app"),
                            capture_output=True, text=True, stdin=sock.fileno())
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "TRAC_FCGI_APP" in result.stderr


# --------------------------------------------------------------------------
# A failed warm-up says why

def warm_up_failure(tmp_path, argv, **environ):
    """Run a worker on a fresh listening socket; return its exit status, stderr and its one warm-failed line."""
    with listening_socket(tmp_path, "warm.sock") as sock:
        result = subprocess.run(argv, env=dict(os.environ, **environ), stdin=sock, capture_output=True,
                                text=True, timeout=120)
    failed = [line for line in result.stderr.splitlines() if " event=warm-failed " in line]
    assert len(failed) == 1, result.stderr
    return result.returncode, result.stderr, failed[0]


def test_a_warm_up_answered_with_a_server_error_exits_1_without_saying_ready(tmp_path):
    status, stderr, line = warm_up_failure(tmp_path, HELLO, TRAC_FCGI_WARMUP="/broken")
    assert status == 1
    assert "status=500" in line and "fix the app or set TRAC_FCGI_WARMUP" in line
    assert "Traceback" not in stderr


def test_a_warm_up_that_raises_logs_the_exceptions_last_line_and_its_traceback(tmp_path):
    status, stderr, line = warm_up_failure(tmp_path, HELLO, TRAC_FCGI_WARMUP="/raise")
    assert status == 1
    assert "error='RuntimeError: hello was asked to fail'" in line
    assert "the traceback is above" in line
    assert stderr.index("Traceback (most recent call last)") < stderr.index(line)


def lower_database_version(env_path):
    with sqlite3.connect(os.path.join(env_path, "db", "trac.db")) as db:
        db.execute("UPDATE system SET value = CAST(value AS INTEGER) - 1 WHERE name = 'database_version'")


@pytest.fixture(scope="module")
def env_needing_an_upgrade(tmp_path_factory):
    """A real Trac environment whose database says it is one version older than this Trac.

    Trac 1.6 compares the database_version row of the system table with the
    version its code expects (DatabaseManager.needs_upgrade), and refuses to
    open an environment whose database is older; as after an install that
    pulled in a newer Trac.
    """
    path = make_trac_env(tmp_path_factory.mktemp("old") / "env")
    lower_database_version(path)
    return path


@pytest.mark.parametrize("launcher_says, meanwhile", [
    (None, "nothing serves this site until then"),
    ("0", "nothing serves this site until then"),
    ("1", "1 other worker serves meanwhile"),
    ("3", "3 other workers serve meanwhile"),
], ids=["no-launcher", "launcher-none-ready", "launcher-one-ready", "launcher-three-ready"])
def test_a_warm_up_refused_for_an_environment_needing_an_upgrade_names_the_command_and_who_serves(
        tmp_path, env_needing_an_upgrade, launcher_says, meanwhile):
    environ = {"TRAC_ENV": env_needing_an_upgrade}
    if launcher_says is not None:
        # The test process is the worker's parent: it stands for the launcher.
        environ.update(LAUNCHER_PID=str(os.getpid()), LAUNCHER_READY_WORKERS=launcher_says)
    status, stderr, line = warm_up_failure(tmp_path, [PYTHON, TRAC_FCGI], **environ)
    assert status == 1
    assert "needs to be upgraded" in line, line
    assert 'run trac-admin "%s" upgrade' % env_needing_an_upgrade in line
    assert meanwhile in line and "serving=%s " % (launcher_says or 0) in line
    assert "trac.log has the rest" in line
    with open(os.path.join(env_needing_an_upgrade, "log", "trac.log")) as trac_log:
        assert "requires an environment upgrade" in trac_log.read()
    assert "Traceback" not in stderr


def test_under_the_launcher_a_replacement_needing_an_upgrade_says_the_worker_it_replaces_still_serves(tmp_path):
    """Injects: a launcher serving a real Trac environment; then the database
    is made one version older (the running worker has it open already) and
    the launcher gets SIGHUP, a rolling restart.
    Holds: the replacement's warm-up fails and says so, counting the old
    worker as serving (serving=1) and naming trac-admin upgrade; the old
    worker goes on answering 200."""
    env_path = make_trac_env(tmp_path / "env")
    launcher = start_launcher(tmp_path, [PYTHON, TRAC_FCGI], env={"TRAC_ENV": env_path})
    try:
        launcher.wait_for("all-ready", timeout=120)
        lower_database_version(env_path)
        launcher.signal(signal.SIGHUP)
        wait_until(lambda: " event=warm-failed " in launcher.log(), 120, "a replacement's warm-up to fail")
        line = next(line for line in launcher.log().splitlines() if " event=warm-failed " in line)
        assert "serving=1 " in line and "1 other worker serves meanwhile" in line, line
        assert 'run trac-admin "%s" upgrade' % env_path in line
        assert fcgi_get(launcher.socket, "/wiki/WikiStart", timeout=60).status == 200
    finally:
        launcher.stop(timeout=60)


# --------------------------------------------------------------------------
# Errors in connections: ours are logged with a traceback, a client's in one line

def test_an_exception_in_our_connection_code_is_logged_with_its_traceback_and_the_worker_serves_on(spawn):
    worker = spawn(HELLO, env={"HELLO_CONNECTION_BUG": "1"})
    try:
        fcgi_get(worker.socket, query="bug")
    except (OSError, EOFError):
        pass  # answered before the exception; whether the client saw the end is not the point
    errors = worker.wait_for("connection-error")
    assert "ZeroDivisionError: injected by HELLO_CONNECTION_BUG" in errors[0]["error"]
    assert errors[0]["at"].startswith("hello.py:")
    assert "Traceback (most recent call last)" in worker.log()
    assert fcgi_get(worker.socket).status == 200
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert len(worker.events("connection-error")) == 1
    assert worker.events("drained", abandoned=0)


def test_a_malformed_record_is_one_line_and_a_client_that_vanishes_is_none(spawn):
    worker = spawn(HELLO)
    # A client that resets its connection while its request runs.
    with socket.socket(socket.AF_UNIX) as vanishing:
        vanishing.connect(worker.socket)
        vanishing.sendall(fcgi_request_bytes(1, query="delay=0.5"))
        vanishing.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # A BEGIN_REQUEST whose body is 4 bytes long instead of 8.
    with socket.socket(socket.AF_UNIX) as malformed:
        malformed.settimeout(30)
        malformed.connect(worker.socket)
        malformed.sendall(fcgi_record(FCGI_BEGIN_REQUEST, 1, b"\0\1\0\0"))
        assert malformed.recv(100) == b"", "the worker closes the connection"
    bad = worker.wait_for("bad-request")
    assert "malformed record" in bad[0]["reason"] and "struct.error" in bad[0]["reason"]
    time.sleep(1)  # the vanished client's request has ended by now
    assert fcgi_get(worker.socket).status == 200
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    log = worker.log()
    assert len(worker.events("bad-request")) == 1 and not worker.events("connection-error"), log
    assert "Traceback" not in log, log


# --------------------------------------------------------------------------
# Freezing the warm set (TRAC_FCGI_GC_FREEZE)

CYCLES = {"TRAC_FCGI_APP": "cycles:app", "PYTHONPATH": os.path.dirname(HELLO[1])}


def freezes(worker):
    """(requests, frozen) of each event=freeze the worker logged, in order."""
    return [(int(e["requests"]), int(e["frozen"])) for e in worker.events("freeze")]


def test_trac_is_frozen_after_warm_up_and_again_after_requests_1_2_and_4(spawn, trac_env):
    worker = spawn([PYTHON, TRAC_FCGI], env={"TRAC_ENV": trac_env})
    warm_frozen = int(worker.events("warm")[0]["frozen"])
    assert warm_frozen > 1000  # Trac's modules and components, at least
    for path in ["/wiki/WikiStart", "/timeline", "/report", "/query", "/roadmap"]:
        assert fcgi_get(worker.socket, path).status == 200
    worker.wait_for("freeze", count=3)
    assert [requests for requests, _ in freezes(worker)] == [1, 2, 4]
    assert all(frozen > warm_frozen // 2 for _, frozen in freezes(worker))


def test_with_gc_freeze_off_nothing_is_frozen(spawn, trac_env):
    worker = spawn([PYTHON, TRAC_FCGI], env={"TRAC_ENV": trac_env, "TRAC_FCGI_GC_FREEZE": "off"})
    assert worker.events("warm")[0]["frozen"] == "0"
    # Freezes would be due after the first, second and fourth, each done before the next request runs.
    for _ in range(5):
        assert fcgi_get(worker.socket, "/wiki/WikiStart").status == 200
    assert worker.events("freeze") == []


def test_a_cycle_made_in_a_request_is_collected_after_it(spawn):
    worker = spawn([PYTHON, TRAC_FCGI], env=CYCLES)
    assert fcgi_get(worker.socket, "/cycle", query="name=first").status == 200
    worker.wait_for("freeze", requests=1)  # froze after the request that made the cycle
    assert fcgi_get(worker.socket, "/collected", query="name=first").body == b"yes\n"


def test_a_freeze_due_while_a_request_is_in_flight_waits_for_it_and_its_cycle_is_still_collected(spawn, tmp_path):
    worker = spawn([PYTHON, TRAC_FCGI], env=CYCLES)
    hold = str(tmp_path / "release")
    threads, results = ask_in_background(worker.socket, path="/cycle", query="name=held&hold=" + hold)
    wait_until(lambda: os.path.exists(hold + ".started"), 30, "the cycle-making request to start")
    # This one finishes first: the freeze due after request 1 comes while the other is in flight.
    assert fcgi_get(worker.socket, "/").status == 200
    # A pass or two of the main loop, where a freeze that did not wait for
    # the held request would happen; less than the longest a freeze waits.
    time.sleep(1.2 * trac_fcgi.PERIOD_S)
    open(hold, "w").close()
    for thread in threads:
        thread.join(90)
    assert results[0].status == 200
    wait_until(lambda: worker.events("freeze") or worker.events("freeze-postponed"), 30, "a freeze or its postponement")
    assert fcgi_get(worker.socket, "/collected", query="name=held").body == b"yes\n"
    # Frozen only once both were done, or not at all when the held one outlasted the wait.
    assert all(requests >= 2 for requests, _ in freezes(worker))


def test_an_environment_opened_after_warm_up_is_frozen_by_the_next_freeze(spawn, tmp_path):
    parent = tmp_path / "projects"
    parent.mkdir()
    for name in ("first", "second"):
        make_trac_env(parent / name)
    worker = spawn([PYTHON, TRAC_FCGI], env={"TRAC_ENV_PARENT_DIR": str(parent)})
    for path in ["/first/wiki/WikiStart", "/first/wiki/WikiStart", "/first/wiki/WikiStart",
                 "/second/wiki/WikiStart"]:
        assert fcgi_get(worker.socket, path).status == 200
    worker.wait_for("freeze", count=3)
    (_, after_first), (_, same_page_again), (requests, after_second) = freezes(worker)
    assert requests == 4
    # The second environment's objects were frozen: far more than one more view of a page adds.
    assert after_second - same_page_again > max(100, 3 * (same_page_again - after_first))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
