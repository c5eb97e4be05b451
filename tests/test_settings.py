"""Bad settings end in one clear line, and the security promises hold.

Bad settings: every setting of trac_fcgi.py and launcher.py, taken from their
own SETTINGS tables (so a new setting is covered the day it is added), with
each bad value, ends with exit status 2 and exactly one line on stderr that
names the setting: never a traceback, and never a silent default.  Each
program is started with a real listening socket on fd 0, so a bad value that
is silently accepted shows up as a program that serves instead of exiting.

Security: socket modes, FCGI_WEB_SERVER_ADDRS on TCP, WORKER_PATH and shells,
and whom a worker may signal.
"""
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import support
from test_hostile import exchange, get_request, status_of

if str(support.ROOT) not in sys.path:
    sys.path.insert(0, str(support.ROOT))

import launcher  # noqa: E402
import trac_fcgi  # noqa: E402

BAD_VALUES = ["abc", "-1", "90MB", ""]
WORKERS = str(support.WORKERS)
HELLO = support.worker_script("hello.py")
# How long a program that should refuse to start is given to do so: a
# program still running after this took a bad value as a good one.
EXIT_WITHIN_S = 10


# --------------------------------------------------------------------------
# Running a program that should refuse to start.

def clean_environment(**extra):
    """The test run's environment without any setting either program reads."""
    ours = ("TRAC_FCGI_", "LAUNCHER_", "TRAC_ENV", "FCGI_", "LISTEN_", "HELLO_")
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(ours) and k not in ("WORKER_PATH", "NOTIFY_SOCKET", "PYTHON_EGG_CACHE")}
    environ.update(extra)
    return environ


class Outcome:
    def __init__(self, status, stderr):
        self.status = status  # None: it started serving, or still ran after EXIT_WITHIN_S
        self.stderr = stderr
        self.lines = stderr.splitlines()

    def __repr__(self):
        return "<exit %s, stderr:\n%s>" % (self.status, self.stderr[-3000:])


# A line that only a program that has started serving writes.
STARTED = ("event=start ", "event=warm ")


def run(argv, environ, stdin=subprocess.DEVNULL, timeout=EXIT_WITHIN_S, **kw):
    """Run ARGV until it exits, or until it shows it has started anyway (then kill it)."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env=environ, cwd=kw.pop("cwd", support.ROOT), **kw)

        def text():
            stderr.seek(0)
            return stderr.read().decode(errors="replace")

        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if any(mark in text() for mark in STARTED):
                break
            time.sleep(0.05)
        if process.poll() is None:
            support.kill_tree(process.pid)
            process.wait(30)
            return Outcome(None, text())
        return Outcome(process.returncode, text())


def assert_refused_in_one_line(outcome, *names):
    assert outcome.status == 2, outcome
    assert "Traceback" not in outcome.stderr, outcome
    assert len(outcome.lines) == 1, outcome
    for name in names:
        assert name in outcome.lines[0], outcome


@pytest.fixture
def listener(tmp_path):
    """A real listening unix socket, to hand over as fd 0."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "fd0.sock"))
    sock.listen(16)
    yield sock
    sock.close()


def trac_fcgi_environment(**settings):
    """trac_fcgi serving the hello app, unless SETTINGS say otherwise."""
    environ = clean_environment(TRAC_FCGI_APP="hello:app", PYTHONPATH=WORKERS)
    environ.update(settings)
    return environ


def run_trac_fcgi(listener, *args, **settings):
    return run([support.PYTHON, support.TRAC_FCGI, *args], trac_fcgi_environment(**settings), stdin=listener)


def run_launcher(listener, *args, environ=None, command=HELLO, **kw):
    argv = [support.PYTHON, support.LAUNCHER, *args] + (["--", *command] if command else [])
    return run(argv, environ or clean_environment(), stdin=listener, **kw)


# --------------------------------------------------------------------------
# trac_fcgi.py: every TRAC_FCGI_* setting, from its own table.

@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
@pytest.mark.parametrize("name", [row[0] for row in trac_fcgi.SETTINGS])
def test_a_bad_trac_fcgi_setting_is_refused_in_one_line_that_names_it(listener, name, value):
    assert_refused_in_one_line(run_trac_fcgi(listener, **{name: value}), name)


def test_a_soft_rss_above_max_rss_is_refused_in_one_line(listener):
    outcome = run_trac_fcgi(listener, TRAC_FCGI_MAX_RSS="64M", TRAC_FCGI_SOFT_RSS="100M")
    assert_refused_in_one_line(outcome, "TRAC_FCGI_SOFT_RSS")


@pytest.mark.parametrize("settings, name", [
    ({"TRAC_FCGI_MAX_RSS": "8M"}, "TRAC_FCGI_MAX_RSS"),
    ({"TRAC_FCGI_MAX_RSS": "1G", "TRAC_FCGI_SOFT_RSS": "4M"}, "TRAC_FCGI_SOFT_RSS"),
], ids=["max", "soft"])
def test_a_memory_limit_below_the_warm_size_is_refused_in_one_line_not_replaced_without_end(listener, settings,
                                                                                            name):
    # The hello app holds about 15 MiB once warm.
    assert_refused_in_one_line(run_trac_fcgi(listener, **settings), name, "warm")


@pytest.mark.parametrize("environ, name", [
    ({"TRAC_ENV": "/nonexistent/trac/env"}, "TRAC_ENV"),
    ({"TRAC_ENV": "{tmp}"}, "TRAC_ENV"),  # a directory, but no Trac environment
    ({"TRAC_ENV_PARENT_DIR": "/nonexistent/trac/envs"}, "TRAC_ENV_PARENT_DIR"),
    ({"TRAC_ENV": ""}, "TRAC_ENV"),
], ids=["nowhere", "not-an-env", "parent-nowhere", "empty"])
def test_a_trac_environment_that_is_not_there_is_refused_in_one_line(listener, tmp_path, environ, name):
    environ = {key: value.format(tmp=tmp_path) for key, value in environ.items()}
    environ["TRAC_FCGI_APP"] = "trac.web.main:dispatch_request"
    assert_refused_in_one_line(run_trac_fcgi(listener, **environ), name)


@pytest.mark.parametrize("app", ["no_such_module_here:app", "hello:no_such_callable", "broken_app:app"])
def test_an_app_that_cannot_be_loaded_is_refused_in_one_line(listener, app):
    outcome = run_trac_fcgi(listener, TRAC_FCGI_APP=app)
    assert_refused_in_one_line(outcome, "TRAC_FCGI_APP", app.partition(":")[0])


@pytest.fixture
def keep():
    """Sockets a test needs open until it ends (the other end of a pair, a port held busy)."""
    kept = []
    yield kept
    for sock in kept:
        sock.close()


def _unbound_stream_socket(keep):
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _connected_stream_socket(keep):
    ours, theirs = socket.socketpair()
    keep.append(ours)
    return theirs


def _bound_datagram_socket(keep):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


NOT_LISTENING = [_unbound_stream_socket, _connected_stream_socket, _bound_datagram_socket]


@pytest.mark.parametrize("make_fd0", NOT_LISTENING, ids=lambda f: f.__name__.strip("_"))
def test_trac_fcgi_refuses_an_fd_0_that_is_a_socket_but_not_listening(keep, make_fd0):
    with make_fd0(keep) as fd0:
        assert_refused_in_one_line(run_trac_fcgi(fd0), "fd 0")


def _port_in_use(keep):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    keep.append(sock)
    return "127.0.0.1:%d" % sock.getsockname()[1]


TRAC_FCGI_BAD_BINDS = [
    "abc", "", "127.0.0.1:notaport", ":9000", "127.0.0.1:99999", "unix:/nonexistent-dir/trac.sock", "unix:",
    "unix:/tmp/%s.sock" % ("x" * 120), _port_in_use,
]


@pytest.mark.parametrize("address", TRAC_FCGI_BAD_BINDS, ids=lambda a: repr(a) if isinstance(a, str) else "port-in-use")
def test_trac_fcgi_refuses_a_bad_bind_address_in_one_line(keep, address):
    address = address(keep) if callable(address) else address
    outcome = run([support.PYTHON, support.TRAC_FCGI, "--bind", address], trac_fcgi_environment())
    assert_refused_in_one_line(outcome, "--bind")


def test_trac_fcgi_binds_a_bracketed_ipv6_address_or_refuses_it_in_one_line(tmp_path):
    port = support.free_port()
    worker = support.Process([support.PYTHON, support.TRAC_FCGI, "--bind", "[::1]:%d" % port],
                             tmp_path / "v6.log", env=trac_fcgi_environment())
    try:
        status = None
        try:
            status = worker.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if status is None:
            assert support.fcgi_get(("::1", port), timeout=30).status == 200
        else:
            assert_refused_in_one_line(Outcome(status, worker.log()), "--bind")
    finally:
        worker.stop()


def test_too_few_file_descriptors_at_start_is_one_line_naming_the_limit(listener):
    """Injects: RLIMIT_NOFILE from the fewest descriptors with which Python can
    import trac_fcgi and the app, one more at each run, until the worker serves.
    Holds: every run that cannot start ends in one line naming ulimit -n, exit
    status 2; one of them ran out taking fd 0 over as its socket."""
    def limited(n):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    environ = trac_fcgi_environment()
    # Below this, Python itself fails before a line of ours runs.
    first = next(n for n in range(3, 256)
                 if subprocess.run([support.PYTHON, "-c", "import trac_fcgi, hello"], env=environ,
                                   cwd=support.ROOT, capture_output=True, preexec_fn=limited(n)).returncode == 0)
    refusals = []
    for n in range(first, first + 64):
        outcome = run([support.PYTHON, support.TRAC_FCGI], environ, stdin=listener, preexec_fn=limited(n))
        if outcome.status is None:
            break  # it started serving
        assert_refused_in_one_line(outcome, "ulimit -n")
        refusals.append(outcome.lines[0])
    else:
        raise AssertionError("still refusing to start with %d descriptors: %s" % (n, refusals[-1]))
    assert any("fd 0" in line for line in refusals), refusals


def test_a_fractional_max_lifetime_is_kept_not_silently_turned_off(tmp_path):
    """Injects: TRAC_FCGI_MAX_LIFETIME=0.5 with no jitter, under plain spawn-fcgi.
    Holds: the worker recycles for its age (event=recycle reason=age)."""
    sock = str(tmp_path / "age.sock")
    worker = support.Process(["spawn-fcgi", "-n", "-s", sock, "--", *HELLO], tmp_path / "age.log",
                             env={"TRAC_FCGI_MAX_LIFETIME": "0.5", "TRAC_FCGI_JITTER": "0"})
    try:
        worker.wait_for("recycle", reason="age", timeout=8)
    finally:
        worker.stop()


# --------------------------------------------------------------------------
# launcher.py: every flag and its environment variable, from its own table.

def launcher_cases():
    for flag, env, *_ in launcher.SETTINGS:
        for value in BAD_VALUES:
            for via in ("flag", "env"):
                yield pytest.param(flag, env, value, via, id="%s=%r" % (flag if via == "flag" else env, value))


@pytest.mark.parametrize("flag, env, value, via", list(launcher_cases()))
def test_a_bad_launcher_setting_is_refused_in_one_line_that_names_it(listener, flag, env, value, via):
    if via == "flag":
        outcome = run_launcher(listener, "%s=%s" % (flag, value))
    else:
        outcome = run_launcher(listener, environ=clean_environment(**{env: value}))
    assert_refused_in_one_line(outcome, flag if via == "flag" else env)


def _listening_path(keep):
    """The path of a unix socket someone listens on."""
    return "unix:" + keep[0].getsockname()


LAUNCHER_BAD_BINDS = [
    "abc", "unix:relative.sock", "unix:/nonexistent-dir/trac.sock", "127.0.0.1:0", "127.0.0.1:65536",
    ":9000", "127.0.0.1:notaport", "[::1]", "999.1.1.1:9000", "unix:/tmp/%s.sock" % ("x" * 120), _port_in_use,
    _listening_path,
]


@pytest.mark.parametrize("address", LAUNCHER_BAD_BINDS, ids=lambda a: repr(a) if isinstance(a, str) else a.__name__)
def test_the_launcher_refuses_a_bad_bind_address_in_one_line(listener, keep, address):
    keep.append(listener)
    address = address(keep) if callable(address) else address
    assert_refused_in_one_line(run_launcher(listener, "--bind", address), "--bind")


def test_the_launcher_leaves_a_socket_that_someone_listens_on_in_place(listener):
    path = listener.getsockname()
    run_launcher(listener, "--bind", "unix:" + path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)  # still ours: not unlinked and re-bound
    client.close()


def _not_executable(tmp_path):
    path = tmp_path / "not-executable"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    return str(path)


WORKER_PATHS = [
    (None, "WORKER_PATH"),                      # unset, and no command after --
    ("", "WORKER_PATH"),
    ("trac_fcgi.py", "WORKER_PATH"),            # a bare name is looked up on PATH, not in the cwd
    ("/nonexistent/trac-fcgi", "WORKER_PATH"),
    (_not_executable, "WORKER_PATH"),
    ("/tmp", "WORKER_PATH"),                    # a directory
]


@pytest.mark.parametrize("worker_path, name", WORKER_PATHS,
                         ids=["unset", "empty", "bare-name-not-on-path", "nonexistent", "not-executable", "directory"])
def test_a_bad_worker_path_is_refused_in_one_line_that_names_it(listener, tmp_path, worker_path, name):
    environ = clean_environment()
    if worker_path is not None:
        environ["WORKER_PATH"] = worker_path(tmp_path) if callable(worker_path) else worker_path
    assert_refused_in_one_line(run_launcher(listener, environ=environ, command=None), name)


@pytest.mark.parametrize("command", [["/nonexistent/trac-fcgi"], ["no-such-command-anywhere"]])
def test_a_bad_command_after_the_double_dash_is_refused_in_one_line(listener, command):
    assert_refused_in_one_line(run_launcher(listener, command=command), "command after --")


@pytest.mark.parametrize("how", ["WORKER_PATH", "after --"])
def test_a_relative_worker_path_is_made_absolute_at_start_alike_from_worker_path_and_after_the_double_dash(
        listener, tmp_path, how):
    script = tmp_path / "bin" / "worker"
    script.parent.mkdir()
    script.write_text("#!%s\n%s" % (support.PYTHON, (support.WORKERS / "hello.py").read_text()))
    script.chmod(0o755)
    environ = clean_environment(PYTHONPATH=WORKERS)
    if how == "WORKER_PATH":
        environ["WORKER_PATH"] = "bin/worker"
    outcome = run_launcher(listener, environ=environ, command=["bin/worker"] if how == "after --" else None,
                           cwd=tmp_path)
    assert outcome.status is None, outcome  # it started serving
    assert "worker=%s" % script in outcome.stderr, outcome


@pytest.fixture
def reachable_path():
    path = support.directory_others_can_reach("trac-fcgi-settings-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_worker_whose_python_the_user_cannot_run_is_refused_naming_the_path_the_user_and_the_fix(
        listener, reachable_path):
    tmp_path = reachable_path
    script = tmp_path / "worker"
    script.write_text("#!%s\n" % (tmp_path / "locked" / "python"))
    script.chmod(0o755)
    (tmp_path / "locked").mkdir(mode=0o700)
    (tmp_path / "locked" / "python").symlink_to(support.PYTHON)
    if os.getuid() == 0:
        # root reaches any directory: run the launcher as nobody, who cannot.
        argv_prefix = ["runuser", "-u", "nobody", "--"]
        shutil.copy(support.LAUNCHER, tmp_path / "launcher.py")  # the checkout may be out of nobody's reach
    else:
        (tmp_path / "locked").chmod(0o000)
        argv_prefix = []
    argv = argv_prefix + (["/usr/bin/python3", str(tmp_path / "launcher.py")] if argv_prefix
                          else [support.PYTHON, support.LAUNCHER]) + ["--", str(script)]
    outcome = run(argv, clean_environment(), stdin=listener)
    user = "nobody" if argv_prefix else __import__("pwd").getpwuid(os.getuid()).pw_name
    assert_refused_in_one_line(outcome, str(script), str(tmp_path / "locked" / "python"), "user " + user, "venv")


def test_a_socket_in_a_missing_directory_is_refused_naming_the_user_and_the_mkdir_that_fixes_it(tmp_path):
    missing = tmp_path / "run" / "trac"
    outcome = run([support.PYTHON, support.LAUNCHER, "--bind", "unix:%s/trac.sock" % missing, "--", *HELLO],
                  clean_environment())
    user = __import__("pwd").getpwuid(os.getuid()).pw_name
    assert_refused_in_one_line(outcome, "as user " + user, "mkdir -p %s" % missing)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the launcher as nobody")
def test_a_socket_directory_the_user_cannot_write_is_refused_naming_the_user_and_the_chown(reachable_path):
    launcher_copy = shutil.copy(support.LAUNCHER, reachable_path / "launcher.py")  # nobody may not reach ROOT
    outcome = run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", launcher_copy,
                   "--bind", "unix:%s/trac.sock" % reachable_path, "--", "/bin/true"], clean_environment())
    assert_refused_in_one_line(outcome, "as user nobody", "chown nobody %s" % reachable_path)


def _closed(keep):
    return None


@pytest.mark.parametrize("make_fd0", [None, _closed] + NOT_LISTENING,
                         ids=lambda f: "devnull" if f is None else f.__name__.strip("_"))
def test_the_launcher_refuses_an_fd_0_that_is_not_a_listening_socket(keep, make_fd0):
    if make_fd0 is _closed:
        outcome = run_launcher(subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    elif make_fd0 is None:
        outcome = run_launcher(subprocess.DEVNULL)
    else:
        with make_fd0(keep) as fd0:
            outcome = run_launcher(fd0)
    assert_refused_in_one_line(outcome, "fd 0", "--bind")


# --------------------------------------------------------------------------
# --bind never destroys: what is at a unix path stays, unless it is a socket
# that nobody listens on.

def bind_with(program, address):
    """Run PROGRAM with --bind ADDRESS until it exits or starts serving."""
    if program == "trac_fcgi":
        return run([support.PYTHON, support.TRAC_FCGI, "--bind", address], trac_fcgi_environment())
    return run_launcher(subprocess.DEVNULL, "--bind", address)


def _regular_file(path, keep):
    path.write_text("[trac]\nbase_url = https://trac.example.org\n")
    path.chmod(0o640)


def _empty_file(path, keep):
    path.touch(0o600)


def _directory(path, keep):
    path.mkdir()
    (path / "inside").write_text("kept")


def _symlink_to_a_file(path, keep):
    target = path.with_name("target.ini")
    _regular_file(target, keep)
    path.symlink_to(target)


def _live_socket(path, keep):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    keep.append(sock)


def what_is_at(path):
    """Everything about PATH that --bind could change: inode, type, mode, times, contents."""
    info = os.lstat(path)
    facts = (info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if stat.S_ISREG(info.st_mode):
        return facts + (path.read_bytes(),)
    if stat.S_ISLNK(info.st_mode):
        return facts + (os.readlink(path), what_is_at(path.resolve()))
    if stat.S_ISDIR(info.st_mode):
        return facts + (sorted((p.name, what_is_at(p)) for p in path.iterdir()),)
    return facts


OBSTACLES = [_regular_file, _empty_file, _directory, _symlink_to_a_file, _live_socket]


@pytest.mark.parametrize("obstacle", OBSTACLES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("program", ["trac_fcgi", "launcher"])
def test_bind_onto_anything_but_a_stale_socket_is_refused_in_one_line_and_left_untouched(tmp_path, keep, program,
                                                                                         obstacle):
    path = tmp_path / "trac.ini"
    obstacle(path, keep)
    before = what_is_at(path)
    assert_refused_in_one_line(bind_with(program, "unix:%s" % path), "--bind", str(path))
    assert what_is_at(path) == before
    if obstacle is _live_socket:
        # Still the listener's own socket: a client that connects is accepted by it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            keep[0].settimeout(10)
            accepted, _ = keep[0].accept()
            accepted.close()


@pytest.mark.parametrize("program", ["trac_fcgi", "launcher"])
def test_bind_replaces_a_stale_socket_that_nobody_listens_on(tmp_path, program):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking, as by a server killed with SIGKILL
    if program == "trac_fcgi":
        argv = [support.PYTHON, support.TRAC_FCGI, "--bind", "unix:%s" % path]
        environ = trac_fcgi_environment()
    else:
        argv = [support.PYTHON, support.LAUNCHER, "--bind", "unix:%s" % path, "--", *HELLO]
        environ = clean_environment()
    process = support.Process(argv, tmp_path / "bind.log", env=environ)
    try:
        support.wait_until(lambda: support.listening(path) or process.popen.poll() is not None, 60,
                           "a listener at " + str(path))
        assert support.fcgi_get(str(path), timeout=60).status == 200, process.log()
    finally:
        process.stop()


# --------------------------------------------------------------------------
# Both programs read the same addresses and sizes, and mean the same by them.

def parsed(parse, text):
    try:
        return parse(text)
    except ValueError:
        return "refused"


UNIX, INET, INET6 = socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
# (kind, text, what both programs must make of it)
ONE_TABLE = [
    ("size", "0", 0),
    ("size", "4096", 4096),
    ("size", "64K", 64 << 10),
    ("size", "128M", 128 << 20),
    ("size", "128m", 128 << 20),
    ("size", " 2G ", 2 << 30),
    ("size", "", "refused"),
    ("size", "M", "refused"),
    ("size", "-1", "refused"),
    ("size", "+5", "refused"),
    ("size", "1_000", "refused"),
    ("size", "1.5G", "refused"),
    ("size", "5 M", "refused"),
    ("size", "90MB", "refused"),
    ("size", "1T", "refused"),
    ("size", "\u0663", "refused"),           # an Arabic-Indic three: int() would take it
    ("address", "unix:/run/trac/trac.sock", (UNIX, "/run/trac/trac.sock", 0o660)),
    ("address", "unix:/run/trac/trac.sock:0600", (UNIX, "/run/trac/trac.sock", 0o600)),
    ("address", "unix:/run/trac/trac.sock:666", (UNIX, "/run/trac/trac.sock", 0o666)),
    ("address", "unix:/run/a:b/trac.sock", (UNIX, "/run/a:b/trac.sock", 0o660)),
    ("address", "unix:/run/trac/trac.sock:0999", "refused"),  # a trailing :digits is a mode, never a name
    ("address", "unix:/run/trac/trac.sock:4777", "refused"),
    ("address", "unix:/run/trac/trac.sock:60", "refused"),
    ("address", "unix:/run/trac/trac.sock:", (UNIX, "/run/trac/trac.sock:", 0o660)),
    ("address", "unix:relative.sock", "refused"),
    ("address", "unix:", "refused"),
    ("address", "unix:/run/nul\0.sock", "refused"),
    ("address", "127.0.0.1:9000", (INET, "127.0.0.1", 9000)),
    ("address", "localhost:9000", (INET, "localhost", 9000)),
    ("address", "[::1]:9000", (INET6, "::1", 9000)),
    ("address", "127.0.0.1:65535", (INET, "127.0.0.1", 65535)),
    ("address", "127.0.0.1:0", "refused"),
    ("address", "127.0.0.1:65536", "refused"),
    ("address", "127.0.0.1:09000", (INET, "127.0.0.1", 9000)),
    ("address", "127.0.0.1:+900", "refused"),
    ("address", "127.0.0.1:\uff19\uff10", "refused"),  # full-width digits
    ("address", "::1:9000", "refused"),          # IPv6 takes brackets
    ("address", "[::1]", "refused"),
    ("address", "[]:9000", "refused"),
    ("address", ":9000", "refused"),
    ("address", "127.0.0.1:", "refused"),
    ("address", "127.0.0.1 :9000", "refused"),
    ("address", "abc", "refused"),
    ("address", "", "refused"),
]
PARSERS = {"size": (trac_fcgi.size, launcher.size_bytes), "address": (trac_fcgi.address, launcher.address)}


@pytest.mark.parametrize("kind, text, meaning", ONE_TABLE, ids=lambda v: repr(v) if isinstance(v, str) else "")
def test_both_programs_read_a_size_or_an_address_the_same_way(kind, text, meaning):
    assert [parsed(parse, text) for parse in PARSERS[kind]] == [meaning, meaning]


def test_the_tables_and_the_bind_option_use_the_parsers_checked_above():
    assert dict((name, parse) for name, parse, *_ in trac_fcgi.SETTINGS)["TRAC_FCGI_MAX_RSS"] is trac_fcgi.size
    flags = {flag: parse for flag, _, parse, *_ in launcher.SETTINGS}
    assert flags["--memory-reserve"] is launcher.size_bytes and flags["--bind"] is launcher.address
    assert trac_fcgi.parse_bind("unix:/a:0600") == trac_fcgi.address("unix:/a:0600")


@settings(max_examples=400, deadline=None, database=None)
@given(st.one_of(st.text(), st.from_regex(r"unix:/[a-z/:]{0,12}(:[0-9]{0,5})?", fullmatch=True),
                 st.from_regex(r"\[?[0-9a-z:.]{0,10}\]?:[0-9+]{0,6}", fullmatch=True),
                 st.from_regex(r"\s?[0-9+_.-]{0,6}[KMGkmgT]?\s?", fullmatch=True)))
def test_both_programs_agree_on_any_text_as_a_size_or_an_address(text):
    for kind, (ours, the_launchers) in PARSERS.items():
        assert parsed(ours, text) == parsed(the_launchers, text), (kind, text)


# --------------------------------------------------------------------------
# Security: socket modes.

def socket_mode(path):
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    return stat.S_IMODE(mode)


@pytest.mark.parametrize("suffix, mode", [("", 0o660), (":0666", 0o666), (":0600", 0o600)],
                         ids=["default", "0666", "0600"])
def test_a_unix_socket_bound_by_the_launcher_has_the_mode_asked_for_even_under_umask_0(tmp_path, suffix, mode):
    path = tmp_path / "launcher.sock"
    process = support.Process([support.PYTHON, support.LAUNCHER, "--bind", "unix:%s%s" % (path, suffix), "--", *HELLO],
                              tmp_path / "launcher.log", env=clean_environment(), preexec_fn=lambda: os.umask(0))
    try:
        process.wait_for("start")
        assert socket_mode(path) == mode
        assert support.fcgi_get(str(path)).status == 200
    finally:
        process.stop()


@pytest.mark.parametrize("suffix, mode", [("", 0o660), (":0666", 0o666), (":0600", 0o600)],
                         ids=["default", "0666", "0600"])
def test_a_unix_socket_bound_by_trac_fcgi_has_the_mode_asked_for_even_under_umask_0(tmp_path, suffix, mode):
    path = tmp_path / "trac_fcgi.sock"
    worker = support.Process([support.PYTHON, support.TRAC_FCGI, "--bind", "unix:%s%s" % (path, suffix)],
                             tmp_path / "trac_fcgi.log", env=trac_fcgi_environment(),
                             preexec_fn=lambda: os.umask(0))
    try:
        support.wait_until(lambda: path.exists(), 30, "trac_fcgi to bind " + str(path))
        assert support.fcgi_get(str(path)).status == 200
        assert socket_mode(path) == mode
    finally:
        worker.stop()


# --------------------------------------------------------------------------
# Security: FCGI_WEB_SERVER_ADDRS on TCP.

def status_from(port, source, answered=None):
    """The status a GET from SOURCE gets, or None if the worker closed on it (or is not there yet)."""
    try:
        status = status_of(exchange(("127.0.0.1", port), get_request(1), timeout=30, source=source))
    except OSError:
        return None
    if answered is not None and status is not None:
        answered.append(status)
    return status


@pytest.mark.parametrize("via", ["trac_fcgi --bind", "launcher --bind"])
def test_fcgi_web_server_addrs_closes_other_peers_before_reading_a_request(tmp_path, via):
    """Injects: FCGI_WEB_SERVER_ADDRS=127.0.0.2 on a TCP socket; full GETs from 127.0.0.1.
    Holds: 127.0.0.1 is closed on without a byte of answer, event=refused-peer
    is logged, and its requests are never served (the worker's own request
    count, logged when it drains, counts only 127.0.0.2's); 127.0.0.2 gets 200."""
    port = support.free_port()
    environ = trac_fcgi_environment(FCGI_WEB_SERVER_ADDRS="127.0.0.2")
    address = "127.0.0.1:%d" % port
    if via.startswith("trac_fcgi"):
        argv = [support.PYTHON, support.TRAC_FCGI, "--bind", address]
    else:
        argv = [support.PYTHON, support.LAUNCHER, "--bind", address, "--", *HELLO]
    process = support.Process(argv, tmp_path / "tcp.log", env=environ)
    answered = []
    try:
        support.wait_until(lambda: status_from(port, "127.0.0.2", answered) == 200, 60, "a 200 from 127.0.0.2")
        for _ in range(3):
            assert exchange(("127.0.0.1", port), get_request(1), source="127.0.0.1") == b""
        process.wait_for("refused-peer", count=3, peer="127.0.0.1")
        assert status_from(port, "127.0.0.2", answered) == 200
    finally:
        process.stop()
    drained = process.events("drained")
    assert drained, process.log()[-3000:]
    assert int(drained[-1]["requests"]) == len(answered) == answered.count(200)


# --------------------------------------------------------------------------
# Security: no shell, ever.

def test_a_worker_path_with_shell_metacharacters_is_refused_and_never_reaches_a_shell(listener, tmp_path):
    marker = tmp_path / "shell-was-here"
    environ = clean_environment(WORKER_PATH="/bin/echo; touch %s" % marker)
    assert_refused_in_one_line(run_launcher(listener, environ=environ, command=None), "WORKER_PATH")
    outcome = run_launcher(listener, command=["/bin/echo; touch %s" % marker])
    assert_refused_in_one_line(outcome, "command after --")
    assert not marker.exists()


def test_a_worker_whose_file_name_has_shell_metacharacters_is_run_literally(tmp_path):
    """A file really named `worker; touch shell-was-here $(touch subshell-was-here)`:
    the launcher runs that file itself (a python script), directly as its child."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    worker_file = tmp_path / "worker; touch shell-was-here $(touch subshell-was-here)"
    worker_file.write_text("#!%s\nimport runpy, sys\nsys.path.insert(0, %r)\nrunpy.run_path(%r, run_name='__main__')\n"
                           % (support.PYTHON, WORKERS, HELLO[1]))
    worker_file.chmod(0o755)
    process = support.Process([support.PYTHON, support.LAUNCHER, "--bind", "unix:%s" % (tmp_path / "s.sock")],
                              tmp_path / "launcher.log", env=clean_environment(WORKER_PATH=str(worker_file)),
                              cwd=str(workdir))
    try:
        spawned = process.wait_for("spawn")
        assert support.fcgi_get(str(tmp_path / "s.sock")).status == 200
        pid = int(spawned[0]["pid"])
        assert pid in support.children(process.pid)
        assert Path("/proc/%d/comm" % pid).read_text().strip() not in ("sh", "bash", "dash")
        assert str(worker_file) in Path("/proc/%d/cmdline" % pid).read_text()
    finally:
        process.stop()
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if "was-here" in p.name and p != worker_file) == []


# --------------------------------------------------------------------------
# Security: a worker signals its own launcher and nobody else.

def read_count(path):
    return int(path.read_text())


def test_a_worker_whose_parent_is_not_a_launcher_never_signals_it(tmp_path, listener):
    """Injects: the worker's parent is a plain process that counts SIGUSR1
    (no LAUNCHER_PID anywhere); TRAC_FCGI_MAX_REQUESTS=1, no jitter.
    Holds: the worker recycles by re-executing itself, keeps serving, and its
    parent never receives SIGUSR1."""
    count = tmp_path / "usr1-count"
    parent = support.Process([support.PYTHON, str(support.WORKERS / "usr1_counter.py"), str(count), *HELLO],
                             tmp_path / "parent.log", stdin=listener,
                             env=trac_fcgi_environment(TRAC_FCGI_MAX_REQUESTS="1", TRAC_FCGI_JITTER="0"))
    path = listener.getsockname()
    try:
        # A stand-in serves while each new image starts, and may take every
        # request that comes meanwhile: ask until three re-execs have happened.
        deadline = time.monotonic() + 90
        while len(parent.events("re-exec")) < 3 and time.monotonic() < deadline:
            assert support.fcgi_get(path, timeout=60).status == 200
            time.sleep(0.05)
        parent.wait_for("re-exec", count=3, timeout=30)
        assert support.fcgi_get(path, timeout=60).status == 200
        time.sleep(trac_fcgi.PERIOD_S * 2)  # a wrongly sent signal would have arrived by now
        assert read_count(count) == 0
    finally:
        parent.stop()
    assert read_count(count) == 0


def test_a_worker_never_signals_a_launcher_pid_that_is_not_its_parent(tmp_path, listener):
    """Injects: LAUNCHER_PID names a live process (which counts SIGUSR1) that is
    not the worker's parent; TRAC_FCGI_MAX_REQUESTS=1, no jitter.
    Holds: the worker treats its launcher as gone: it drains and exits 0, and
    the process named by LAUNCHER_PID never receives SIGUSR1."""
    count = tmp_path / "usr1-count"
    stranger = support.Process([support.PYTHON, str(support.WORKERS / "usr1_counter.py"), str(count)],
                               tmp_path / "stranger.log", env=clean_environment())
    try:
        support.wait_until(count.exists, 30, "the counter to start")
        worker = support.Process(HELLO, tmp_path / "worker.log", stdin=listener,
                                 env=trac_fcgi_environment(LAUNCHER_PID=str(stranger.pid),
                                                           TRAC_FCGI_MAX_REQUESTS="1", TRAC_FCGI_JITTER="0"))
        try:
            assert worker.wait(30) == 0
            assert "launcher gone" in worker.log()
        finally:
            worker.stop()
        time.sleep(trac_fcgi.PERIOD_S * 2)
        assert read_count(count) == 0
        assert support.alive(stranger.pid)
    finally:
        stranger.stop()
