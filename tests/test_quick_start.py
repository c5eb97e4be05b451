"""The admin's first steps, as the documents give them: the README's quick start,
examples/replace-trac-fcgi.md, trac_fcgi.py --check and --replace, and
trac_fcgi.py run by hand.

The commands are taken from the Markdown itself, every ```sh block of the
quick start and of the replace recipe, so the documents and this test cannot
drift apart.  Each command runs as written, each in a fresh empty directory
with a plain PATH, as root, with a Trac user that is not root (nobody); only
the paths, the port and that user are put in, as an admin puts in theirs.
"""
import grp
import os
import pty
import pwd
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sysconfig
import textwrap
from pathlib import Path

import pytest

from stack import NGINX, START_TIMEOUT, http_get, is_trac_page
from support import (PYTHON, ROOT, TRAC_FCGI, WORKERS, Process, alive, copy_of_tracked_files,
                     directory_others_can_reach, free_port, make_trac_env, wait_until)

README = ROOT / "README.md"
REPLACE_RECIPE = ROOT / "examples" / "replace-trac-fcgi.md"
# A fresh login shell's PATH: `python3` is the system's, which any user can run.
SHELL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WELCOME = "Welcome to Trac"

as_root = pytest.mark.skipif(os.getuid() != 0, reason="the documents' commands run as root (spawn-fcgi -u, "
                                                      "chown, runuser, systemd-tmpfiles)")


# --------------------------------------------------------------------------
# Reading the commands out of the Markdown.

def quick_start():
    text = README.read_text()
    return text[text.index("## Quick start"):text.index("\n## ", text.index("## Quick start") + 1)]


def shell_commands(markdown):
    """Every command of every fenced block, each block a list of commands (continuation lines joined).

    Every fenced block must be a ```sh block: one in another language would
    otherwise go untested.
    """
    languages = re.findall(r"^\s*```(\w*)\n.*?^\s*```", markdown, re.MULTILINE | re.DOTALL)
    assert languages and set(languages) == {"sh"}, languages
    blocks = re.findall(r"^\s*```sh\n(.*?)^\s*```", markdown, re.MULTILINE | re.DOTALL)
    return [[line for line in textwrap.dedent(block).replace("\\\n", " ").splitlines() if line.strip()]
            for block in blocks]


def trac_user():
    """The unprivileged user the documents' www-data becomes here, and its group."""
    user = pwd.getpwnam("nobody")
    return user.pw_name, grp.getgrgid(user.pw_gid).gr_name


def put_in(command, paths, port=None):
    """COMMAND with this machine's paths, port and Trac user in place of the documents' examples."""
    user, group = trac_user()
    replacements = [("s|@{user}|www-data|", "s|@{user}|%s %s|" % (user, group)),
                    ("www-data:www-data", "%s:%s" % (user, group)), ("-G www-data", "-G " + group),
                    ("www-data www-data", "%s %s" % (user, group)), ("www-data", user)]
    if port is not None:
        replacements.append(("s|@{listen}|80|", "s|@{listen}|127.0.0.1:%d|" % port))
    # Longest first, so /srv/trac/project is not taken for a prefix of another path.
    replacements += sorted(paths.items(), key=lambda pair: -len(pair[0]))
    for old, new in replacements:
        command = command.replace(old, new)
    return command


def reachable(path, user):
    return subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)]).returncode == 0


def offline_venv(venv):
    """A virtualenv whose dependencies (Trac, flup, setuptools<81) come from the test run's own
    environment, so that pip needs no network.  ensurepip's setuptools may be too old to build
    this package; the build then uses the test run's, as the dependencies do."""
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dependencies = Path(sysconfig.get_paths()["purelib"])
    if not reachable(dependencies / "trac" / "__init__.py", trac_user()[0]):
        # The test run's virtualenv is out of the Trac user's reach (a checkout under /root): a copy.
        dependencies = Path(shutil.copytree(dependencies, venv.parent / "dependencies", symlinks=True))
    Path(site, "test-run-dependencies.pth").write_text("%s\n" % dependencies)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                   capture_output=True)


class Admin:
    """Runs the documents' commands: each in a fresh empty directory, with a plain PATH."""

    def __init__(self, base):
        self.base = base
        self.ran = []
        self.servers = []
        self.environ = dict(os.environ, PATH=SHELL_PATH)
        for name in [k for k in self.environ if k.startswith(("TRAC_", "LAUNCHER_", "WORKER_", "VIRTUAL_ENV"))]:
            del self.environ[name]

    def fresh_directory(self):
        path = self.base / ("cwd-%d" % len(self.ran))
        path.mkdir()
        return path

    def run(self, command):
        cwd = self.fresh_directory()
        self.ran.append(command)
        done = subprocess.run(["sh", "-ec", command], cwd=cwd, env=self.environ, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, "%s\nexit %d\n%s%s" % (command, done.returncode, done.stdout, done.stderr)
        return done.stdout + done.stderr

    def start(self, command):
        """A command that serves in the foreground (spawn-fcgi -n): started, not waited for.

        Split as the shell would, its leading NAME=value words becoming its
        environment, so that stopping it reaches the program itself.
        """
        cwd = self.fresh_directory()
        self.ran.append(command)
        words = shlex.split(command)
        environ = {}
        while re.match(r"^[A-Z_]+=", words[0]):
            name, _, value = words.pop(0).partition("=")
            environ[name] = value
        process = Process(words, self.base / ("server-%d.log" % len(self.servers)),
                          env=dict(self.environ, **environ), cwd=cwd)
        self.servers.append(process)
        return process

    def stop(self):
        for process in reversed(self.servers):
            process.stop()


def serves_foreground(command):
    return "spawn-fcgi -n" in command


def wait_for_socket(path, process):
    def connects():
        if process.popen.poll() is not None:
            raise AssertionError("%s exited:\n%s" % (process.popen.args, process.log()))
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            return True
        except OSError:
            return False
    wait_until(connects, START_TIMEOUT, "the socket %s" % path)


def uid_of(pid):
    status = Path("/proc/%d/status" % pid).read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))


def run_nginx(prefix, conf, port):
    nginx = Process([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], prefix / "nginx.out")
    try:
        wait_until(lambda: http_get(port, "/chrome/common/trac_logo_mini.png", timeout=5).status is not None
                   or nginx.popen.poll() is not None, 30, "nginx to listen on %d" % port)
    except AssertionError:
        nginx.stop()
        raise
    return nginx


@pytest.fixture
def base():
    path = directory_others_can_reach("trac-fcgi-quick-start-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# The README's quick start.

@as_root
def test_the_readme_quick_start_run_as_written_ends_in_a_trac_page_through_nginx_served_by_a_non_root_user(base):
    user, group = trac_user()
    port = free_port()
    # The site the admin already has: a Trac environment.
    project = make_trac_env(base / "project")
    checkout = copy_of_tracked_files(base / "trac-fcgi-launcher")
    paths = {"/srv/trac/project": project, "/srv/trac/venv": str(base / "venv"),
             "/path/to/trac-fcgi-launcher": str(checkout), "/etc/tmpfiles.d/trac.conf": str(base / "tmpfiles.conf"),
             "/run/trac": str(base / "run" / "trac"), "/srv/trac/nginx": str(base / "nginx"),
             # Trac comes from the test run's environment (offline_venv), so
             # pip writes no trac-admin script into the new virtualenv.
             "/srv/trac/venv/bin/trac-admin": "%s -m trac.admin.console" % (base / "venv" / "bin" / "python")}
    blocks = shell_commands(quick_start())
    assert len(blocks) == 5, blocks  # one for each step

    admin = Admin(base)
    launcher = None
    try:
        for block in blocks:
            for command in block:
                command = put_in(command, paths, port)
                if "pip install" in command:
                    command = command.replace("pip install", "pip install --no-index --no-build-isolation")
                if serves_foreground(command):
                    launcher = admin.start(command)
                    wait_for_socket(base / "run" / "trac" / "trac.sock", launcher)
                    launcher.wait_for("all-ready", timeout=START_TIMEOUT)
                    continue
                out = admin.run(command)
                if " -m venv " in command:
                    offline_venv(base / "venv")
                if "--check" in command:
                    assert "GET / -> 200" in out and "ok:" in out, out
        # Step 2 made the socket's directory, for the Trac user.
        socket_dir = base / "run" / "trac"
        assert socket_dir.is_dir() and socket_dir.stat().st_uid == pwd.getpwnam(user).pw_uid
        # Step 4: the launcher and its workers run as the Trac user, not root.
        pids = [launcher.pid] + [int(w["pid"]) for w in launcher.events("spawn")]
        assert {uid_of(pid) for pid in pids if alive(pid)} == {pwd.getpwnam(user).pw_uid}
        # Step 5: nginx, run as the text says, with the configuration the step wrote.
        nginx = run_nginx(base / "nginx", base / "nginx" / "nginx.conf", port)
        admin.servers.append(nginx)
        page = http_get(port, "/wiki/WikiStart", timeout=START_TIMEOUT)
        assert is_trac_page(page, WELCOME), (page, launcher.log())
        assert b"Test Project" in page.body
    finally:
        admin.stop()
    assert len(admin.ran) == sum(len(block) for block in blocks)


# --------------------------------------------------------------------------
# examples/replace-trac-fcgi.md

@pytest.fixture
def site_venv(base):
    """The Python the old trac.fcgi runs on: a virtualenv of the system's python3 with Trac."""
    venv = base / "venv"
    subprocess.run(["/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3", "-m", "venv",
                    str(venv)], check=True, capture_output=True)
    offline_venv(venv)
    return venv


@as_root
def test_the_replace_recipe_run_as_written_carries_the_environment_over_and_serves_with_and_without_launcher(
        base, site_venv):
    user, group = trac_user()
    project = make_trac_env(base / "project")
    # An existing site: its Trac user owns its environment.
    subprocess.run(["chown", "-R", "%s:%s" % (user, group), project], check=True)
    run_dir = base / "run" / "trac"
    run_dir.mkdir(parents=True)
    checkout = copy_of_tracked_files(base / "trac-fcgi-launcher")
    paths = {"/srv/trac/project": project, "/srv/trac/deploy": str(base / "deploy"),
             "/srv/trac/venv": str(site_venv), "/path/to/trac_fcgi.py": str(checkout / "trac_fcgi.py"),
             "/path/to/launcher.py": str(checkout / "launcher.py"), "/run/trac": str(run_dir),
             # The admin's trac-admin (see offline_venv for why not bin/trac-admin).
             "trac-admin ": "%s -m trac.admin.console " % (site_venv / "bin" / "python")}
    blocks = shell_commands(REPLACE_RECIPE.read_text())
    commands = [put_in(command, paths) for block in blocks for command in block]
    servers = [command for command in commands if serves_foreground(command)]
    assert len(servers) == 2 and "launcher.py" in servers[1], servers

    admin = Admin(base)
    script = base / "deploy" / "cgi-bin" / "trac.fcgi"
    nginx = None
    try:
        for command in commands:
            if serves_foreground(command):
                continue
            out = admin.run(command)
            if "--replace" in command:
                assert "TRAC_ENV=%s (from its TRAC_ENV line)" % project in out, out
            if "--check" in command:
                assert "GET / -> 200" in out and "ok:" in out, out
        # The environment path came over by itself, and the old file is kept.
        assert "DEFAULT_TRAC_ENV = %r" % project in script.read_text()
        assert script.read_text().splitlines()[0] == "#!%s" % (site_venv / "bin" / "python")
        assert "fcgi_frontend.run()" in (base / "deploy" / "cgi-bin" / "trac.fcgi.orig").read_text()

        import stack
        for number, command in enumerate(servers):
            server = admin.start(command)
            wait_for_socket(run_dir / "trac.sock", server)
            if nginx is None:
                nginx = stack.Nginx(base / "nginx", "unix:%s" % (run_dir / "trac.sock"))
            page = nginx.get("/wiki/WikiStart", timeout=START_TIMEOUT)
            assert is_trac_page(page, WELCOME), (page, server.log())
            assert b"Test Project" in page.body  # the environment DEFAULT_TRAC_ENV names
            assert uid_of(server.pid) == pwd.getpwnam(user).pw_uid
            if "launcher.py" in command:
                server.wait_for("all-ready", workers=2, timeout=START_TIMEOUT)
            else:
                assert "trac-fcgi[%d] event=warm" % server.pid in server.log()  # our file, not Trac's frontend
            server.stop()
    finally:
        if nginx is not None:
            nginx.stop()
        admin.stop()
    assert len(admin.ran) == len(commands)


# --------------------------------------------------------------------------
# --replace refuses, and changes nothing, when the old file's Python cannot run it.

def old_trac_fcgi(directory, first_line, body="import os\nos.environ['TRAC_ENV'] = '/srv/trac/project'\n"):
    path = directory / "trac.fcgi"
    path.write_text("%s\n%s" % (first_line, body))
    path.chmod(0o755)
    return path


def replace(path):
    return subprocess.run([PYTHON, TRAC_FCGI, "--replace", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("first_line, says", [
    ("#!%s -S" % PYTHON, "cannot import Trac and flup"),                    # a Python without them
    ("#!/bin/sh -c 'echo 2.7; exit 1' --", "Python 2.7"),                     # answers as Python 2 would
    ("#!/nonexistent/python", "cannot be run"),
], ids=["no-trac-or-flup", "python-2", "missing"])
def test_replace_refuses_in_one_line_and_changes_nothing_when_the_old_files_python_cannot_run_it(
        tmp_path, first_line, says):
    path = old_trac_fcgi(tmp_path, first_line)
    before = path.read_bytes()
    result = replace(path)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and says in result.stderr and str(path) in result.stderr, result.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["trac.fcgi"]


def test_replace_carries_a_trac_env_parent_dir_over_and_a_second_run_keeps_the_first_backup(tmp_path):
    parent = tmp_path / "projects"
    parent.mkdir()
    path = old_trac_fcgi(tmp_path, "#!" + PYTHON,
                         "import os\nos.environ.setdefault('TRAC_ENV_PARENT_DIR', %r)\n" % str(parent))
    original = path.read_text()
    assert replace(path).returncode == 0
    assert "DEFAULT_TRAC_ENV_PARENT_DIR = %r" % str(parent) in path.read_text()
    again = replace(path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "trac.fcgi.orig").read_text() == original
    assert "TRAC_ENV_PARENT_DIR=%s" % parent in again.stdout


def test_replace_refuses_python_2_source_and_leaves_it_alone(tmp_path):
    path = old_trac_fcgi(tmp_path, "#!" + PYTHON, "print 'Trac 1.4'\n")
    result = replace(path)
    assert result.returncode == 2 and "not Python 3" in result.stderr, result.stderr
    assert not (tmp_path / "trac.fcgi.orig").exists()


# --------------------------------------------------------------------------
# --check

def check(env_path, **environ):
    settings = {k: v for k, v in os.environ.items() if not k.startswith(("TRAC_", "PYTHON_EGG_CACHE"))}
    settings.update(TRAC_ENV=str(env_path), **environ)
    return subprocess.run([PYTHON, TRAC_FCGI, "--check"], env=settings, capture_output=True, text=True,
                          timeout=300)


def needs_upgrade(env_path):
    """Make ENV_PATH one that Trac 1.6 says needs `trac-admin upgrade`: the database version in its
    system table below the one this Trac writes, as an environment of an older Trac has."""
    with sqlite3.connect(os.path.join(env_path, "db", "trac.db")) as db:
        (version,), = db.execute("SELECT value FROM system WHERE name='database_version'")
        db.execute("UPDATE system SET value=? WHERE name='database_version'", (str(int(version) - 1),))


def test_check_on_a_good_environment_prints_status_time_memory_and_settings_and_exits_0(trac_env):
    result = check(trac_env, TRAC_FCGI_MAX_REQUESTS="500")
    assert result.returncode == 0, result.stderr
    assert re.search(r"GET / -> 200 in \d+\.\d+ s", result.stdout), result.stdout
    assert re.search(r"\d+\.\d MiB resident once warm", result.stdout), result.stdout
    assert "TRAC_FCGI_MAX_REQUESTS=500\n" in result.stdout and "TRAC_FCGI_MAX_RSS=128M (default)" in result.stdout
    assert "environment  TRAC_ENV=%s" % trac_env in result.stdout


def test_check_on_an_environment_that_needs_an_upgrade_exits_1_with_the_trac_admin_command(tmp_path):
    env_path = make_trac_env(tmp_path / "old")
    needs_upgrade(env_path)
    result = check(env_path)
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert 'trac-admin "%s" upgrade' % env_path in result.stderr, result.stderr
    assert "GET / -> 500" in result.stdout


def test_a_worker_whose_warm_up_fails_on_an_environment_that_needs_an_upgrade_logs_the_trac_admin_command(
        tmp_path):
    env_path = make_trac_env(tmp_path / "old")
    needs_upgrade(env_path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "trac.sock"))
    listener.listen()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TRAC_", "PYTHON_EGG_CACHE"))}
    result = subprocess.run([PYTHON, TRAC_FCGI], env=dict(environ, TRAC_ENV=env_path), stdin=listener.fileno(),
                            capture_output=True, text=True, timeout=300)
    listener.close()
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if " event=warm-failed " in line]
    assert len(failed) == 1 and 'trac-admin "%s" upgrade' % env_path in failed[0], result.stderr


@as_root
def test_check_as_a_user_who_cannot_write_the_environment_exits_1_naming_the_user_the_path_and_chown(
        base, site_venv):
    env_path = make_trac_env(base / "project")  # root's, and only readable by others
    user, _ = trac_user()
    script = shutil.copy(TRAC_FCGI, base / "trac_fcgi.py")  # the checkout may be out of the user's reach
    result = subprocess.run(["runuser", "-u", user, "--", str(site_venv / "bin" / "python"), script, "--check"],
                            env=dict(os.environ, TRAC_ENV=env_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert "user %s cannot write %s" % (user, env_path) in result.stderr, result.stderr
    assert "chown -R %s %s" % (user, env_path) in result.stderr


def test_check_on_a_path_that_is_no_environment_exits_1_with_the_reason(tmp_path):
    result = check(tmp_path)
    assert result.returncode == 1 and "not a Trac environment" in result.stderr, result


# --------------------------------------------------------------------------
# Run by hand

def test_run_in_a_terminal_it_says_what_it_is_and_how_to_test_it_instead_of_serving_cgi():
    controller, terminal = pty.openpty()
    try:
        environ = {k: v for k, v in os.environ.items() if k not in ("REQUEST_METHOD", "GATEWAY_INTERFACE")}
        process = subprocess.Popen([PYTHON, TRAC_FCGI], stdin=terminal, stdout=terminal, stderr=terminal,
                                   env=environ)
        status = process.wait(60)
        os.close(terminal)
        terminal = None
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    text = output.decode(errors="replace")
    assert status == 2, text
    assert "drop-in trac.fcgi" in text and "--check" in text and "--bind" in text, text
    assert "missing FastCGI param" not in text and "<html" not in text, text


def test_a_real_cgi_request_is_still_served_as_cgi():
    environ = dict(os.environ, REQUEST_METHOD="GET", SERVER_NAME="localhost", SERVER_PORT="80",
                   SERVER_PROTOCOL="HTTP/1.1", SCRIPT_NAME="", PATH_INFO="/", QUERY_STRING="",
                   GATEWAY_INTERFACE="CGI/1.1", TRAC_FCGI_APP="hello:app", PYTHONPATH=str(WORKERS))
    result = subprocess.run([PYTHON, TRAC_FCGI], env=environ, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Status: 200"), result.stdout[:300]


# --------------------------------------------------------------------------
# The README's troubleshooting table

def troubleshooting_row(words):
    """The troubleshooting table's row whose first cell has WORDS: (what you see, its fix), backticks kept."""
    text = README.read_text()
    table = text[text.index("## Troubleshooting"):text.index("\n## ", text.index("## Troubleshooting") + 1)]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and words in line.split("|")[1]]
    assert len(rows) == 1, rows
    return rows[0][0], rows[0][2]


def quoted(cell):
    return re.findall(r"`([^`]+)`", cell)


def test_the_troubleshooting_table_quotes_what_spawn_fcgi_and_nginx_print_and_its_fixes_work(base):
    spawn_fcgi = shutil.which("spawn-fcgi") or "/usr/bin/spawn-fcgi"

    # The socket's directory is missing.
    seen, fix = troubleshooting_row("bind failed")
    sock = base / "run" / "trac" / "trac.sock"
    failed = subprocess.run([spawn_fcgi, "-n", "-s", str(sock), "--", "/bin/true"], capture_output=True, text=True)
    assert quoted(seen)[0] in failed.stderr, failed.stderr
    assert "mkdir -p /run/trac" in fix
    sock.parent.mkdir(parents=True)
    fixed = subprocess.run([spawn_fcgi, "-n", "-s", str(sock), "--", "/bin/true"], capture_output=True, text=True)
    assert fixed.returncode == 0 and "failed" not in fixed.stderr, fixed.stderr

    # nginx's log directory is missing.
    seen, fix = troubleshooting_row("nginx: [emerg] open()")
    prefix = base / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    import stack
    conf.write_text(stack.nginx_config(prefix, "127.0.0.1:%d" % free_port(), "unix:%s" % sock))
    failed = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)
    assert failed.returncode != 0
    assert quoted(seen)[0].replace("nginx: [emerg] ", "").replace("PREFIX", str(prefix)) in failed.stderr, failed.stderr
    assert "mkdir -p PREFIX/logs" in fix
    (prefix / "logs").mkdir()
    fixed = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr


@as_root
def test_the_troubleshooting_table_quotes_spawn_fcgis_exec_failure_for_a_program_the_user_cannot_reach(base):
    spawn_fcgi = shutil.which("spawn-fcgi") or "/usr/bin/spawn-fcgi"
    seen, fix = troubleshooting_row("exec failed")
    locked = base / "root-only"
    locked.mkdir(mode=0o700)
    program = Path(shutil.copy("/bin/true", locked / "true"))
    argv = [spawn_fcgi, "-n", "-s", str(base / "trac.sock"), "-u", trac_user()[0], "--", str(program)]
    failed = subprocess.run(argv, capture_output=True, text=True)
    assert quoted(seen)[0] in failed.stderr, failed.stderr
    assert "outside `/root`" in fix
    locked.chmod(0o755)  # the fix: a place the user can reach
    (base / "trac.sock").unlink()
    fixed = subprocess.run(argv, capture_output=True, text=True)
    assert fixed.returncode == 0 and "failed" not in fixed.stderr, fixed.stderr
