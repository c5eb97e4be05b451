#!/usr/bin/env python3
"""make demo: a Trac site whose workers you can watch being replaced.

    browser -> nginx (127.0.0.1:8000) -> spawn-fcgi's socket -> launcher (2 workers) -> trac_fcgi -> Trac

The workers get low limits, so that clicking around for a minute shows
recycles in the log below: a worker logs event=recycle, the launcher starts
its replacement, the replacement says it is ready, the old one drains and
exits, and the browser never sees an error.

Run by `make demo` with the venv's Python.  Ctrl-C stops everything it started;
running it again reuses the Trac environment and stops anything a previous
run left behind.  Settings, from the environment:

    DEMO_PORT      port on 127.0.0.1 to serve on (default 8000)
    DEMO_DIR       where the Trac environment, configs and logs go (default ./demo)
    DEMO_SECONDS   stop by itself after this many seconds (default: at Ctrl-C)
    TRAC_FCGI_*    worker limits (trac-fcgi --help); the demo's defaults are below
"""
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent          # the venv `make venv` made
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SPAWN_FCGI = shutil.which("spawn-fcgi") or "/usr/bin/spawn-fcgi"

# Low enough to see recycles within a minute of clicking: a worker is
# replaced after 100 requests (each page is ~10, its CSS and images
# included), or when it reaches 90% of MAX_RSS.  A worker weighs ~50 MB once
# warm; one whose limit leaves less headroom than that refuses to start.
WORKER_LIMITS = {
    "TRAC_FCGI_MAX_RSS": "80M",
    "TRAC_FCGI_MAX_REQUESTS": "100",
}
WORKERS = 2
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 45


class NginxTemplate(string.Template):
    """examples/nginx.conf's placeholders are @{name}: nginx uses $ and braces itself."""
    delimiter = "@"


class Demo:
    def __init__(self, directory, port):
        self.dir = Path(directory).resolve()
        self.port = port
        self.env = self.dir / "env"
        self.run_dir = self.dir / "run"
        self.logs = self.dir / "logs"
        self.nginx_dir = self.dir / "nginx"
        self.socket = self.run_dir / "trac.sock"
        self.launcher_log = self.logs / "launcher.log"
        self.launcher_pid = self.run_dir / "launcher.pid"
        self.metrics = self.run_dir / "trac.prom"
        self.nginx_pid = self.nginx_dir / "nginx.pid"
        self.launcher = self.nginx = self.follow = None

    # -- setting up ------------------------------------------------------

    def prepare(self):
        for tool in (BIN / "trac-admin", BIN / "trac-fcgi", BIN / "trac-fcgi-launcher"):
            if not tool.exists():
                raise SystemExit("demo: %s is missing: run `make demo`, which installs it" % tool)
        for directory in (self.run_dir, self.logs, self.nginx_dir / "logs", self.nginx_dir / "tmp"):
            directory.mkdir(parents=True, exist_ok=True)
        self.stop_leftovers()
        if not self.env.exists():
            self.create_trac_environment()
        template = (ROOT / "examples" / "nginx.conf").read_text()
        (self.nginx_dir / "nginx.conf").write_text(NginxTemplate(template).substitute(
            prefix=self.nginx_dir, user=pwd.getpwuid(os.getuid()).pw_name,
            listen="127.0.0.1:%d" % self.port, fastcgi_server="unix:%s" % self.socket))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as error:
                raise SystemExit("demo: 127.0.0.1:%d is taken (%s): stop what uses it, or set DEMO_PORT"
                                 % (self.port, error.strerror))

    def create_trac_environment(self):
        say("creating a Trac environment in %s" % self.env)
        # Made aside and renamed into place, so an interrupted run leaves none half-made.
        making = self.dir / "env.new"
        shutil.rmtree(making, ignore_errors=True)
        trac_admin = str(BIN / "trac-admin")
        run([trac_admin, str(making), "initenv", "Demo", "sqlite:db/trac.db"])
        # Anyone may edit the wiki and file tickets: more pages to click through.
        run([trac_admin, str(making), "permission", "add", "anonymous",
             "WIKI_CREATE", "WIKI_MODIFY", "TICKET_CREATE", "TICKET_MODIFY"])
        making.rename(self.env)

    def stop_leftovers(self):
        """A previous run that was killed, not stopped, may still hold the socket and port."""
        for pid_file, signum in ((self.nginx_pid, signal.SIGQUIT), (self.launcher_pid, signal.SIGTERM)):
            try:
                pid = int(pid_file.read_text())
                # Ours only: nginx names our directory, the launcher's workers our env.
                mine = (Path("/proc/%d/cmdline" % pid).read_bytes()
                        + Path("/proc/%d/environ" % pid).read_bytes())
            except (OSError, ValueError):
                continue
            if str(self.dir).encode() in mine:
                say("stopping pid %d, left over from a previous run" % pid)
                os.kill(pid, signum)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline and Path("/proc/%d" % pid).exists():
                    time.sleep(0.1)

    # -- running ---------------------------------------------------------

    def start(self):
        environ = dict(os.environ, TRAC_ENV=str(self.env), WORKER_PATH=str(BIN / "trac-fcgi"))
        for name, value in WORKER_LIMITS.items():
            environ.setdefault(name, value)
        say("worker limits: %s" % ", ".join("%s=%s" % (n, environ[n]) for n in WORKER_LIMITS))
        # Own sessions: Ctrl-C reaches this script only, which then stops
        # nginx before the launcher, so no browser request finds nobody there.
        # The log is kept across runs; this run's part starts here.
        self.launcher_log.touch()
        self.follow = open(self.launcher_log, "rb")
        self.follow.seek(0, os.SEEK_END)
        self.follow_from = self.follow.tell()
        with open(self.launcher_log, "ab") as log:
            self.launcher = subprocess.Popen(
                [SPAWN_FCGI, "-n", "-s", str(self.socket), "-M", "0600", "--",
                 str(BIN / "trac-fcgi-launcher"), "--workers", str(WORKERS), "--metrics-file", str(self.metrics)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environ, start_new_session=True)
        self.launcher_pid.write_text("%d\n" % self.launcher.pid)
        self.wait_for(lambda text: "event=all-ready" in text, self.launcher, "the workers to be ready")

        with open(self.nginx_dir / "logs" / "nginx.out", "ab") as out:
            self.nginx = subprocess.Popen(
                [NGINX, "-p", str(self.nginx_dir), "-c", str(self.nginx_dir / "nginx.conf"),
                 "-e", str(self.nginx_dir / "logs" / "error.log"), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.wait_for(lambda text: self.listening(), self.nginx, "nginx to listen")

    def listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            return True
        except OSError:
            return False

    def wait_for(self, ready, process, what):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready(self.new_log_text()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: gave up waiting for %s; see %s and %s"
                                 % (what, self.launcher_log, self.nginx_dir / "logs" / "error.log"))
            time.sleep(0.1)

    def new_log_text(self):
        with open(self.launcher_log, "rb") as log:
            log.seek(self.follow_from)
            return log.read().decode(errors="replace")

    def follow_log(self, seconds):
        """Print the launcher's log (workers' lines included) until Ctrl-C or SECONDS."""
        deadline = time.monotonic() + seconds if seconds else None
        while deadline is None or time.monotonic() < deadline:
            line = self.follow.readline()
            if line:
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
                continue
            for name, process in (("launcher", self.launcher), ("nginx", self.nginx)):
                if process.poll() is not None:
                    say("the %s exited with status %s; stopping" % (name, process.returncode))
                    return
            time.sleep(0.2)

    def stop(self):
        # nginx first, gracefully (SIGQUIT): it finishes the requests it has.
        # Then the launcher (SIGTERM): each worker finishes what it accepted.
        for name, process, signum in (("nginx", self.nginx, signal.SIGQUIT),
                                      ("launcher", self.launcher, signal.SIGTERM)):
            if process is None or process.poll() is not None:
                continue
            say("stopping %s (pid %d)" % (name, process.pid))
            process.send_signal(signum)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.print_new_lines()
        for pid_file in (self.launcher_pid, self.nginx_pid):
            try:
                pid_file.unlink()
            except FileNotFoundError:
                pass

    def print_new_lines(self):
        """The launcher's last words (event=stop), once it has exited."""
        if self.follow is not None:
            sys.stdout.write(self.follow.read().decode(errors="replace"))
            sys.stdout.flush()


def say(text):
    sys.stdout.write("demo: %s\n" % text)
    sys.stdout.flush()


def run(argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit("demo: %s failed:\n%s%s" % (" ".join(argv), done.stdout, done.stderr))


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    port = int(os.environ.get("DEMO_PORT", "8000"))
    seconds = float(os.environ.get("DEMO_SECONDS", "0"))
    demo = Demo(os.environ.get("DEMO_DIR", ROOT / "demo"), port)
    # Ctrl-C and `kill` stop the demo alike.  Set SIGINT's handler even so:
    # Python leaves it ignored when started in the background by a script.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        demo.prepare()
        demo.start()
        say("Trac is at http://127.0.0.1:%d/  (served through nginx, %d workers)" % (port, WORKERS))
        say("click around: each worker is replaced after ~%s requests or past its memory mark;"
            % os.environ.get("TRAC_FCGI_MAX_REQUESTS", WORKER_LIMITS["TRAC_FCGI_MAX_REQUESTS"]))
        say("watch for event=recycle, event=ready, event=hup, event=drained below")
        say("logs: %s, %s; Ctrl-C stops everything" % (demo.launcher_log, demo.nginx_dir / "logs"))
        say("metrics: %s status %s  (or point node_exporter's textfile collector at its directory)"
            % (BIN / "trac-fcgi-launcher", demo.metrics))
        demo.follow_log(seconds)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
