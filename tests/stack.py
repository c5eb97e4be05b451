"""The whole stack, for end-to-end tests: a web server -> spawn-fcgi -> launcher -> trac_fcgi -> Trac.

Every piece is the real program: nginx, lighttpd or Apache with a config made
from examples/, spawn-fcgi creating the socket, the launcher and the
trac-fcgi console script serving a Trac environment made by trac-admin.  The
load generator is plain http.client in threads, and it records every
response: status, whether the whole body arrived, latency, and errors.
"""
import collections
import contextlib
import glob
import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from support import LAUNCHER, PYTHON, ROOT, Process, children, free_port, make_trac_env

EXAMPLES = ROOT / "examples"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LIGHTTPD = shutil.which("lighttpd") or "/usr/sbin/lighttpd"
APACHE = shutil.which("apache2") or "/usr/sbin/apache2"
SPAWN_FCGI = shutil.which("spawn-fcgi") or "/usr/bin/spawn-fcgi"
# The console script `pip install .` makes; E2E_WORKER_PATH runs the suite
# against another build of it (an installed release, a patched copy).
TRAC_FCGI = os.environ.get("E2E_WORKER_PATH") or str(Path(PYTHON).parent / "trac-fcgi")
# Patience for a machine shared with other test runs: a cold Trac worker
# takes ~0.5 s on an idle machine, many times that under load.
START_TIMEOUT = 90


# --------------------------------------------------------------------------
# Web servers in front

class ConfigTemplate(string.Template):
    """examples/ config placeholders: @{name}, since nginx, lighttpd and Apache use $ and braces themselves."""
    delimiter = "@"


def unprivileged(argv):
    """ARGV as a web server started by a user who is not root runs.

    Apache refuses to serve as root, and switches to its User.  Here every
    file (this checkout's Python included) is root's, so instead the server
    runs in a user namespace as www-data mapped onto us: it believes it is
    unprivileged and stays who it is, and the kernel still checks its file
    access as ours.  A test run that is not root needs nothing of the kind.
    """
    if os.getuid() != 0:
        return list(argv)
    try:
        uid, gid = pwd.getpwnam("www-data")[2:4]
    except KeyError:
        uid = gid = 65534
    return ["unshare", "--user", "--map-user=%d" % uid, "--map-group=%d" % gid, *argv]


class Front:
    """A real web server on a free port of 127.0.0.1, in the foreground, its files in DIRECTORY.

    A subclass says how to write its config (config()) and how to run it
    (argv()); everything else, from the retry on a port someone else took to
    reading its access log, is the same for every server.
    """

    name = "front"

    def __init__(self, directory, port=None, env=None):
        self.prefix = Path(directory)
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / (self.name + ".conf")
        self.access_log_path = self.prefix / "logs" / "access.log"
        self.error_log_path = self.prefix / "logs" / "error.log"
        # A free port can be taken by someone else before the server binds it: try again.
        for attempt in range(5):
            self.port = port or free_port()
            self.conf.write_text(self.config("127.0.0.1:%d" % self.port))
            self.process = Process(self.argv(), self.prefix / (self.name + ".out"), env=env)
            if self._wait_listening():
                return
            self.process.stop()
            if port or "Address already in use" not in self.errors() + self.process.log():
                break
        raise AssertionError("%s did not start:\n%s\n%s" % (self.name, self.process.log(), self.errors()))

    def config(self, listen):
        raise NotImplementedError

    def argv(self):
        raise NotImplementedError

    def _wait_listening(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.popen.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def url(self, path="/"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def get(self, path, timeout=60):
        return http_get(self.port, path, timeout)

    def errors(self):
        return self.error_log_path.read_text(errors="replace") if self.error_log_path.exists() else ""

    def access_log(self):
        """Every logged request as {request, status, bytes, upstream}.

        Every example logs '"request" status bytes' (Common Log Format).
        upstream, where the server logs it (nginx), is every server it tried,
        in order: "a, b" when a failed.
        """
        entries = []
        if self.access_log_path.exists():
            for line in self.access_log_path.read_text(errors="replace").splitlines():
                match = re.search(r'"(?P<request>[^"]*)" (?P<status>\d+) (?P<bytes>\d+|-)'
                                  r'(?:.*upstream=(?P<upstream>.*) upstream_status=)?', line)
                if match:
                    bytes_sent = 0 if match["bytes"] == "-" else int(match["bytes"])
                    entries.append(dict(match.groupdict(), status=int(match["status"]), bytes=bytes_sent))
        return entries

    def stop(self):
        self.process.stop()


# The other way to run nginx in front, which examples/nginx.conf weighs and
# turns down: FastCGI connections kept open between requests, which trac-fcgi
# serves too.  As trac_behind_nginx(**KEEPALIVE_FRONT).
KEEPALIVE_FRONT = {
    "upstream": "    upstream trac {\n        server @{fastcgi_server};\n        keepalive 8;\n    }\n",
    "directives": {"fastcgi_keep_conn": "on", "fastcgi_next_upstream": "error timeout"},
}



class Nginx(Front):
    """Real nginx from examples/nginx.conf, in its own prefix directory."""

    name = "nginx"

    def __init__(self, directory, fastcgi_server, upstream=None, port=None, directives=None):
        self.fastcgi_server, self.upstream, self.directives = fastcgi_server, upstream, directives
        Front.__init__(self, directory, port)

    def config(self, listen):
        return nginx_config(self.prefix, listen, self.fastcgi_server, self.upstream, self.directives)

    def argv(self):
        return [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log_path),
                "-g", "daemon off;"]


class Lighttpd(Front):
    """Real lighttpd from an examples/lighttpd*.conf, its placeholders filled in from VALUES.

    SETTINGS are lines such as `var.trac_url = "/"` that replace the example's
    line of the same name, as an admin edits it; EXTRA is appended.
    """

    name = "lighttpd"

    def __init__(self, directory, example, values, settings=(), extra="", env=None):
        self.example, self.values, self.settings, self.extra = example, values, settings, extra
        Front.__init__(self, directory, env=env)

    def config(self, listen):
        address, _, port = listen.rpartition(":")
        text = fill_example(self.example, self.settings, prefix=self.prefix, address=address, port=port,
                            user=web_user(), **self.values)
        return text + self.extra

    def argv(self):
        return unprivileged([LIGHTTPD, "-D", "-f", str(self.conf)])


class Apache(Front):
    """Real Apache (apache2 -f CONF -DFOREGROUND) from an examples/apache*.conf, as Lighttpd above."""

    name = "apache2"

    def __init__(self, directory, example, values, settings=(), extra="", env=None):
        self.example, self.values, self.settings, self.extra = example, values, settings, extra
        (Path(directory) / "fcgid").mkdir(parents=True, exist_ok=True)
        Front.__init__(self, directory, env=env)

    def config(self, listen):
        text = fill_example(self.example, self.settings, prefix=self.prefix, listen=listen, user=web_user(),
                            **self.values)
        return text + self.extra

    def argv(self):
        return unprivileged([APACHE, "-f", str(self.conf), "-DFOREGROUND"])


def web_user():
    """The user an example's server is told to run as; when not root, it stays who it is anyway."""
    return "www-data" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def fill_example(name, settings=(), **values):
    """examples/NAME with its @{placeholders} filled in, and each of SETTINGS replacing its line.

    A setting is a whole line, `var.trac_url = "/"`; the example's line that
    starts with the same name (up to its spaces) must be there, once.
    """
    text = (EXAMPLES / name).read_text()
    for line in settings:
        key = line.split()[0]
        text, found = re.subn(r"^%s\s.*$" % re.escape(key), lambda _: line, text, flags=re.MULTILINE)
        assert found == 1, "examples/%s has no single %s line" % (name, key)
    return ConfigTemplate(text).substitute(values)


def nginx_config(prefix, listen, fastcgi_server, upstream=None, directives=None):
    """examples/nginx.conf filled in; UPSTREAM replaces its `upstream trac {...}` block.

    DIRECTIVES ({name: value}) set server-level directives in its place: each
    named one is taken out of the example, and put back with VALUE unless
    that is None (nginx's default then applies).
    """
    text = (EXAMPLES / "nginx.conf").read_text()
    if upstream is not None:
        text, found = re.subn(r"^    upstream trac \{.*?^    \}\n", lambda _: upstream, text,
                              flags=re.MULTILINE | re.DOTALL)
        assert found == 1, "examples/nginx.conf has no single `upstream trac {...}` block"
    for name, value in (directives or {}).items():
        text = re.sub(r"^ *%s [^;]*;\n" % re.escape(name), "", text, flags=re.MULTILINE)
        if value is not None:
            text, found = re.subn(r"^( *)server_name _;\n", lambda m: "%s%s%s %s;\n" % (
                m[0], m[1], name, value), text, count=1, flags=re.MULTILINE)
            assert found == 1, "examples/nginx.conf has no `server_name _;` to put %s after" % name
    return ConfigTemplate(text).substitute(prefix=prefix, listen=listen,
                                            fastcgi_server=fastcgi_server or "the upstream block below",
                                            user=pwd.getpwuid(os.getuid()).pw_name)


def upstream_block(*servers):
    """examples/nginx-upstream.conf, indented into nginx.conf, with SERVERS as its machines."""
    text = (EXAMPLES / "nginx-upstream.conf").read_text()
    values = {"machine_%s" % chr(ord("a") + i): server for i, server in enumerate(servers)}
    text = ConfigTemplate(text).substitute(values)
    return "".join("    " + line if line.strip() else line for line in text.splitlines(True))


# --------------------------------------------------------------------------
# PostgreSQL: Debian's server, as an unprivileged cluster in a temp dir

PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


class Postgres:
    """A throwaway cluster on a free port of 127.0.0.1, trusting local connections.

    initdb refuses to run as root: under root the cluster belongs to nobody,
    in a directory of its own under /tmp (pytest's are root's alone).  Its
    log is kept for the tests that look for errors in every log.  A cluster
    that other machines reach (tests/test_hosts.py) also listens on
    ADDRESSES and trusts the NETWORKS (CIDR) they connect from.
    """

    def __init__(self, addresses=(), networks=()):
        assert PG_BIN, "PostgreSQL is not installed: make debs installs it"
        self.directory = Path(tempfile.mkdtemp(prefix="trac-fcgi-pg-"))
        self.directory.chmod(0o755)
        self.as_owner = []
        if os.getuid() == 0:
            self.as_owner = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            shutil.chown(self.directory, "nobody", "nogroup")
        self.data, self.log_path = self.directory / "data", self.directory / "postgres.log"
        self.run("initdb", "-D", self.data, "-U", "trac", "--auth=trust", "-E", "UTF8", "--no-locale")
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.writelines("host all all %s trust\n" % network for network in networks)
        for attempt in range(5):
            self.port = free_port()
            try:
                self.run("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "120", "start", "-o",
                         "-c listen_addresses=%s -p %d -k '' -c fsync=off -c max_connections=200"
                         % (",".join(("127.0.0.1",) + tuple(addresses)), self.port))
                return
            except subprocess.CalledProcessError as failed:
                if "already in use" not in self.log():
                    raise AssertionError("PostgreSQL did not start: %s\n%s" % (failed.stderr, self.log()))

    def run(self, program, *args):
        done = subprocess.run(self.as_owner + [os.path.join(PG_BIN, program), *map(str, args)],
                              capture_output=True, text=True, cwd=self.directory)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, program, done.stdout, done.stderr)
        return done.stdout

    def url(self, database, host="127.0.0.1"):
        return "postgres://trac@%s:%d/%s" % (host, self.port, database)

    def create_database(self, name):
        self.run("createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "trac", name)
        return self.url(name)

    def query(self, database, sql):
        """Rows of SQL's answer, each a list of strings."""
        out = self.run("psql", "-h", "127.0.0.1", "-p", self.port, "-U", "trac", "-d", database,
                       "-AtX", "-F", "\t", "-c", sql)
        return [line.split("\t") for line in out.splitlines()]

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        try:
            self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------
# spawn-fcgi -> launcher -> trac_fcgi

def start_trac(directory, trac_env, *launcher_flags, env=None, name="trac", cleanup=None):
    """spawn-fcgi -n on a fresh unix socket, exec'ing the launcher with WORKER_PATH=trac-fcgi.

    Returns the launcher's Process (spawn-fcgi -n execs it, so the pid is the
    launcher's) with .socket set, once every worker is ready.  The Process
    goes on the CLEANUP list as soon as it exists, so a slow start is stopped too.
    """
    sock = str(Path(directory) / (name + ".sock"))
    environ = {"WORKER_PATH": TRAC_FCGI, "TRAC_ENV": str(trac_env)}
    environ.update(env or {})
    argv = [SPAWN_FCGI, "-n", "-s", sock, "-M", "0600", "--", PYTHON, LAUNCHER, *launcher_flags]
    launcher = Process(argv, Path(directory) / (name + ".log"), env=environ)
    launcher.socket = sock
    if cleanup is not None:
        cleanup.append(launcher)
    launcher.wait_for("all-ready", timeout=START_TIMEOUT)
    return launcher


def recycles(launcher):
    """Handoffs the launcher completed: one `event=hup reason='replaced by pid N'` each."""
    return [e for e in launcher.events("hup") if "replaced by" in e.get("reason", "")]


def drains(launcher):
    """Every `event=drained` a worker logged (workers share the launcher's stderr)."""
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in launcher.log().splitlines()
            if line.startswith("trac-fcgi[") and " event=drained " in line]


def serving_workers(launcher):
    """Workers that said READY=1, were not told to go, and still run: the ones a kill hurts."""
    told_to_go = {hup["pid"] for hup in launcher.events("hup")}
    running = children(launcher.pid)
    return [int(e["pid"]) for e in launcher.events("ready") if e["pid"] not in told_to_go and int(e["pid"]) in running]


# --------------------------------------------------------------------------
# HTTP: one request, and many clients at once.

class Answer:
    """One HTTP exchange as a client saw it."""

    def __init__(self, path, started, latency, status=None, body=b"", complete=False, error=None, headers=()):
        self.path, self.started, self.latency = path, started, latency
        self.status, self.body, self.complete, self.error = status, body, complete, error
        self.headers = list(headers)  # (name, value) pairs, Set-Cookie repeated as it came

    def header(self, name):
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    @property
    def ok(self):
        return self.error is None and self.status == 200 and self.complete

    def __repr__(self):
        return "<Answer %s %s %d bytes%s%s %.3fs%s>" % (
            self.path, self.status, len(self.body), "" if self.complete else " TRUNCATED",
            " error=%s" % self.error if self.error else "", self.latency, self.why())

    def why(self):
        """For a server error, the words of Trac's error page that say what went wrong."""
        if not self.status or self.status < 500:
            return ""
        message = re.search(rb'class="message">(.*?)</(?:p|div)>', self.body, re.S)
        text = re.sub(rb"<[^>]+>", b" ", message.group(1) if message else self.body[:300])
        return " why=%r" % " ".join(text.decode("utf-8", "replace").split())[:300]


def whole_body(response, body):
    """Did the whole body arrive?  Content-Length when there is one, else the end of the HTML."""
    length = response.getheader("Content-Length")
    if length is not None:
        return len(body) == int(length)
    if "html" in (response.getheader("Content-Type") or ""):
        return body.rstrip().endswith(b"</html>")
    return True  # chunked and not HTML: http.client raises IncompleteRead if it was cut


def exchange(conn, path, method="GET", body=None, headers=None):
    """One request on CONN (reconnecting if needed); every failure becomes part of the Answer."""
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        try:
            body = response.read()
        except http.client.IncompleteRead as cut:
            conn.close()
            return Answer(path, started, time.monotonic() - started, response.status, cut.partial, False)
        return Answer(path, started, time.monotonic() - started, response.status, body,
                      whole_body(response, body), headers=response.getheaders())
    except (OSError, http.client.HTTPException) as error:
        conn.close()
        return Answer(path, started, time.monotonic() - started, error="%s: %s" % (type(error).__name__, error))


def http_get(port, path, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        return exchange(conn, path)
    finally:
        conn.close()


class Load:
    """CLIENTS threads, each on its own kept-alive connection, asking for PATHS in turn.

    Each request is a GET, or a POST of BODY (a form) when one is given.
    run() returns when stop() says so (it is called about every 0.2 s with the
    seconds elapsed), or after max_seconds.  Every answer is kept.
    """

    def __init__(self, port, paths, clients, timeout=60, body=None, headers=None):
        self.port, self.paths, self.clients, self.timeout = port, list(paths), clients, timeout
        self.method = "GET" if body is None else "POST"
        self.body, self.headers = body, dict(headers or {})
        if body is not None:
            self.headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        self.answers = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.seconds = 0.0

    def next_request(self, number, turn):
        """What client NUMBER asks on its TURN: (path, method, body, headers)."""
        return self.paths[(number + turn) % len(self.paths)], self.method, self.body, self.headers

    def client(self, number):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        turn = 0
        try:
            while not self.done.is_set():
                request = self.next_request(number, turn)
                answer = exchange(conn, *request)
                answer.request = request
                turn += 1
                with self.lock:
                    self.answers.append(answer)
                if answer.error:
                    time.sleep(0.05)  # a refused connection must not become a busy loop
        finally:
            conn.close()

    def run(self, stop, max_seconds):
        threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(self.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            while True:
                self.seconds = time.monotonic() - started
                if self.seconds >= max_seconds or stop(self.seconds):
                    break
                time.sleep(0.2)
        finally:
            self.done.set()
            for thread in threads:
                thread.join(self.timeout + 10)
        self.seconds = time.monotonic() - started
        return self

    # -- what happened ---------------------------------------------------

    def failures(self):
        return [a for a in self.answers if not a.ok]

    def errors(self):
        return [a for a in self.answers if a.error]

    def truncated(self):
        return [a for a in self.answers if not a.error and not a.complete]

    def non_200(self):
        return [a for a in self.answers if not a.error and a.status != 200]

    def longest_wait(self):
        return max((a.latency for a in self.answers), default=0.0)

    def summary(self):
        latencies = sorted(a.latency for a in self.answers) or [0.0]
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
        return ("%d answers from %d clients in %.1f s (%.1f/s): %d non-200, %d truncated, %d errors; "
                "latency p50 %.3f s, p99 %.3f s, max %.3f s; first failures: %s" % (
                    len(self.answers), self.clients, self.seconds, len(self.answers) / max(self.seconds, 0.001),
                    len(self.non_200()), len(self.truncated()), len(self.errors()),
                    pick(0.5), pick(0.99), latencies[-1], self.failures()[:5]))


# --------------------------------------------------------------------------
# Writing to Trac: real form posts, and what the database then holds.

# Trac accepts a POST only when its __FORM_TOKEN field matches the
# trac_form_token cookie; a client may pick its own, as a browser's first
# visit gets one from Trac.
FORM_TOKEN = "e2e0token"


def form_post(fields):
    """A Trac form POST of FIELDS: (body, headers) with the form token in both places."""
    body = urllib.parse.urlencode(dict(fields, __FORM_TOKEN=FORM_TOKEN))
    return body, {"Cookie": "trac_form_token=" + FORM_TOKEN, "Content-Type": "application/x-www-form-urlencoded"}


def writable_trac_env(path, max_upload=100 << 20):
    """A fresh Trac environment where anyone may create tickets and attach files up to MAX_UPLOAD bytes."""
    make_trac_env(path)
    trac_admin = str(Path(PYTHON).parent / "trac-admin")
    for command in (["permission", "add", "anonymous", "TICKET_CREATE", "TICKET_APPEND"],
                    ["config", "set", "attachment", "max_size", str(max_upload)]):
        subprocess.run([trac_admin, str(path), *command], check=True, capture_output=True)
    return str(path)


def ticket_summaries(trac_env):
    """How many tickets the database holds with each summary."""
    with contextlib.closing(sqlite3.connect("file:%s/db/trac.db?mode=ro" % trac_env, uri=True)) as db:
        return collections.Counter(summary for (summary,) in db.execute("SELECT summary FROM ticket"))


class TicketLoad(Load):
    """CLIENTS threads creating tickets through Trac's form, each with a summary of its own.

    Between two tickets a client reads each of PAGES (none by default).
    Each answer to a POST carries the summary it sent, as answer.summary.
    """

    def __init__(self, port, clients, tag, pages=(), timeout=120):
        Load.__init__(self, port, ["/newticket"], clients, timeout)
        self.tag, self.pages = tag, list(pages)

    def next_request(self, number, turn):
        cycle = len(self.pages) + 1
        if turn % cycle:
            return self.pages[turn % cycle - 1], "GET", None, {}
        summary = "%s client %d ticket %d" % (self.tag, number, turn // cycle)
        body, headers = form_post({"field_summary": summary, "field_description": summary,
                                   "submit": "Create ticket"})
        return "/newticket", "POST", body, headers

    def posts(self):
        """(summary, answer) for every ticket asked for."""
        return [(urllib.parse.parse_qs(a.request[2])["field_summary"][0], a)
                for a in self.answers if a.request[1] == "POST"]

    def created(self):
        """Answers Trac gave to a ticket it created: 303 to the new ticket."""
        return [(summary, a) for summary, a in self.posts() if a.status == 303]


def is_trac_page(answer, text):
    """A whole 200 HTML page that Trac rendered, with TEXT in it."""
    return (answer.ok and text.encode() in answer.body
            and re.search(rb"Powered by\s*<a [^>]*><strong>Trac 1\.", answer.body) is not None)


def trac_behind_nginx(started, directory, trac_env, *launcher_flags, env=None, upstream=None, directives=None):
    """nginx in front of spawn-fcgi -> launcher -> trac_fcgi; both go on the STARTED list as they start.

    UPSTREAM and DIRECTIVES change examples/nginx.conf as nginx_config() says;
    an @{fastcgi_server} in UPSTREAM is the launcher's socket.
    """
    launcher = start_trac(directory, trac_env, *launcher_flags, env=env, cleanup=started)
    nginx = Nginx(Path(directory) / "nginx", "unix:" + launcher.socket, upstream=upstream, directives=directives)
    started.append(nginx)
    return nginx, launcher


def stop_all(*things):
    """Stop in order, ignoring what was never started; nginx first so clients see no refusal."""
    for thing in things:
        if thing is not None:
            thing.stop()


def terminate(process, timeout=60):
    """SIGTERM (systemctl stop with KillMode=mixed) and the exit status."""
    process.signal(signal.SIGTERM)
    return process.wait(timeout)
