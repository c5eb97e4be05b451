"""What the tests share: a real FastCGI client, processes with their logs, and patience.

Nothing here stands in for the thing under test: every helper starts or talks
to real processes over real sockets.
"""
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flup.client.fcgi_app import FCGIApp

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LAUNCHER = str(ROOT / "launcher.py")
TRAC_FCGI = str(ROOT / "trac_fcgi.py")
WORKERS = ROOT / "tests" / "workers"


# --------------------------------------------------------------------------
# A FastCGI client: flup's own, over a unix or TCP socket.

class FlupClient(FCGIApp):
    """flup.client.fcgi_app.FCGIApp with a time limit, and unix paths that work on Python 3."""

    def __init__(self, address, timeout=30):
        FCGIApp.__init__(self, connect=address)
        self.timeout = timeout

    def _getConnection(self):
        if isinstance(self._connect, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self._connect)
            return sock
        return socket.create_connection(self._connect, timeout=self.timeout)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self):
        return "<Response %d, %d bytes>" % (self.status, len(self.body))


def fcgi_get(address, path="/", query="", timeout=30, headers=None):
    """One GET through a real FastCGI client; raises OSError if the worker fails us."""
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
        "REQUEST_URI": path + ("?" + query if query else ""),
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost", "wsgi.input": _Empty(),
    }
    environ.update(headers or {})
    seen = {}

    def start_response(status, response_headers):
        seen["status"] = int(status.split()[0])
        seen["headers"] = {k.decode().lower(): v.decode() for k, v in response_headers}

    body = b"".join(FlupClient(address, timeout)(environ, start_response))
    return Response(seen["status"], seen["headers"], body)


def ask_in_background(address, query="", count=1, path="/"):
    """Start COUNT requests at once; return (threads, results), each result a Response or the exception."""
    results = []

    def ask():
        try:
            results.append(fcgi_get(address, path, query=query, timeout=90))
        except Exception as error:  # noqa: BLE001 - every failure is a finding
            results.append(error)

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


class _Empty:
    def read(self, size=-1):
        return b""


# --------------------------------------------------------------------------
# Processes whose stderr goes to a file the test can watch.

class Process:
    """A real child process with its stderr in a log file that tests can wait on."""

    def __init__(self, argv, log_path, env=None, stdin=None, stamped=False, **kw):
        self.log_path = Path(log_path)
        self.log_file = open(self.log_path, "ab")
        environ = dict(os.environ)
        environ.update(env or {})
        # stamped: output goes through a pipe that a thread reads, so each
        # line also lands in self.lines with the time it arrived (the
        # programs' own log lines carry no time; the benchmark needs one).
        self.lines, self.reader = [], None
        output = subprocess.PIPE if stamped else self.log_file
        self.popen = subprocess.Popen(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                      stdout=output, stderr=subprocess.STDOUT if stamped else self.log_file,
                                      env=environ, **kw)
        self.pid = self.popen.pid
        if stamped:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.append((time.time(), line.decode(errors="replace").rstrip("\n")))
            self.log_file.write(line)
            self.log_file.flush()

    def wait_for_line(self, pattern, since=0.0, timeout=60):
        """The arrival time of the first line after SINCE matching PATTERN (stamped processes only)."""
        checked = 0

        def found():
            nonlocal checked
            lines, start = self.lines[:], checked
            checked = len(lines)
            return next((when for when, line in lines[start:] if when >= since and re.search(pattern, line)), None)
        return wait_until(found, timeout, "a line matching %r in %s" % (pattern, self.log_path))

    def log(self):
        return self.log_path.read_text(errors="replace")

    def events(self, event, **facts):
        """Every log line with event=EVENT and the given key=value facts, as dicts."""
        found = []
        for line in self.log().splitlines():
            fields = dict(re.findall(r"(\w+)=('[^']*'|\S+)", line))
            if fields.get("event") == event and all(fields.get(k) == str(v) for k, v in facts.items()):
                found.append(fields)
        return found

    def wait_for(self, event, count=1, timeout=30, **facts):
        wait_until(lambda: len(self.events(event, **facts)) >= count, timeout,
                   "%d x event=%s %s in %s:\n%s" % (count, event, facts, self.log_path, self.log()[-3000:]))
        return self.events(event, **facts)

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self, timeout=30):
        return self.popen.wait(timeout)

    def stop(self, timeout=30):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_tree(self.pid)
                self.popen.wait(5)
        if self.reader:
            self.reader.join(10)
        self.log_file.close()


def start_launcher(tmp_path, worker_argv, *flags, env=None, name="launcher"):
    """The launcher on a fresh unix socket (its own --bind) running WORKER_ARGV."""
    sock = str(tmp_path / (name + ".sock"))
    argv = [PYTHON, LAUNCHER, "--bind", "unix:" + sock, *flags, "--", *worker_argv]
    process = Process(argv, tmp_path / (name + ".log"), env=env)
    process.socket = sock
    return process


def worker_script(name):
    """argv for one of the small test workers in tests/workers/."""
    return [PYTHON, str(WORKERS / name)]


# --------------------------------------------------------------------------
# Looking at processes through /proc.

def children(pid):
    """Live (non-zombie) direct children of PID."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def alive(pid):
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def family(pid, without=()):
    """PID and all its live descendants, parents before their children, less the subtrees rooted at WITHOUT."""
    found = [pid]
    for child in children(pid):
        if child not in without:
            found += family(child, without)
    return found


def molds_of(pid):
    """PID's children that are molds: a worker has the listening socket on fd 0, a mold /dev/null."""
    found = set()
    for child in children(pid):
        try:
            if os.readlink("/proc/%d/fd/0" % child) == os.devnull:
                found.add(child)
        except OSError:
            pass
    return found


def workers_of(launcher_pid):
    """The launcher's live children less its molds: its workers."""
    return sorted(set(children(launcher_pid)) - molds_of(launcher_pid))


def kill_tree(pid):
    for member in reversed(family(pid)):  # children first, so none is re-parented mid-way
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stat_fields(pid):
    """/proc/PID/stat after the command name: state is [0], ppid [1], utime [11] ... cstime [14]."""
    try:
        return Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid, children=False):
    """utime + stime of PID; with CHILDREN, plus those of the children it has reaped."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = sum(int(fields[i]) for i in ((11, 12, 13, 14) if children else (11, 12)))
    return ticks / os.sysconf("SC_CLK_TCK")


def memory(pid):
    """{rss, pss, private} of PID in bytes, from /proc/PID/smaps_rollup; {} once it is gone.

    RSS counts pages shared with other processes in full, PSS divides each
    shared page among its sharers, and private memory is what exiting frees.
    """
    try:
        text = Path("/proc/%d/smaps_rollup" % pid).read_text()
    except OSError:
        return {}
    kib = {key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in text.splitlines()[1:])
           if rest.strip().endswith("kB")}
    return {"rss": kib.get("Rss", 0) * 1024, "pss": kib.get("Pss", 0) * 1024,
            "private": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) * 1024}


def resident(pid):
    """RSS in bytes from /proc/PID/statm (cheaper than memory()); 0 once it is gone."""
    try:
        return int(Path("/proc/%d/statm" % pid).read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def open_connections(pid):
    """Connected sockets PID holds: every socket but the listening one on its fd 0."""
    try:
        listener = os.readlink("/proc/%d/fd/0" % pid)
        links = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]
    except OSError:
        return 0
    return len({link for link in links if link.startswith("socket:") and link != listener})


def wait_until(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(0.05)


def listening(path):
    """Whether something listens on the unix socket at PATH (a file that exists may not listen yet)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_trac_env(path, database="sqlite:db/trac.db?journal_mode=WAL"):
    """A real Trac environment made by trac-admin initenv, on SQLite with the WAL journal the
    README advises (readers go on while another worker process writes) unless DATABASE says otherwise.
    """
    trac_admin(path, "initenv", "Test Project", database)
    return str(path)


def trac_admin(path, *command):
    subprocess.run([str(Path(PYTHON).parent / "trac-admin"), str(path), *command], check=True, capture_output=True)


# --------------------------------------------------------------------------
# Raw FastCGI records, for what flup's client cannot do (kept-alive connections).

FCGI_BEGIN_REQUEST, FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT, FCGI_END_REQUEST = 1, 4, 5, 6, 3
FCGI_RESPONDER, FCGI_KEEP_CONN = 1, 1


def fcgi_record(kind, request_id, content=b"", version=1):
    return struct.pack("!BBHHBx", version, kind, request_id, len(content), 0) + content


def fcgi_pairs(params):
    out = b""
    for name, value in params.items():
        name, value = name.encode(), value.encode()
        for length in (len(name), len(value)):
            out += bytes([length]) if length < 128 else (length | 0x80000000).to_bytes(4, "big")
        out += name + value
    return out


def fcgi_request_bytes(request_id=1, path="/", query="", keep_conn=False, method="GET", body=b"", params=None):
    """One whole request as a web server writes it; BODY (under 64 KiB) goes in one FCGI_STDIN record."""
    params = dict({"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
                   "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
                   "CONTENT_LENGTH": str(len(body))}, **(params or {}))
    begin = struct.pack("!HB5x", FCGI_RESPONDER, FCGI_KEEP_CONN if keep_conn else 0)
    return (fcgi_record(FCGI_BEGIN_REQUEST, request_id, begin)
            + fcgi_record(FCGI_PARAMS, request_id, fcgi_pairs(params)) + fcgi_record(FCGI_PARAMS, request_id)
            + (fcgi_record(FCGI_STDIN, request_id, body) if body else b"") + fcgi_record(FCGI_STDIN, request_id))


def fcgi_read_response(sock):
    """Read records until FCGI_END_REQUEST; return the STDOUT bytes.  EOFError if the peer closes first."""
    stdout = b""
    while True:
        header = _read_exactly(sock, 8)
        _, kind, _, length, padding = struct.unpack("!BBHHBx", header)
        content = _read_exactly(sock, length + padding)[:length]
        if kind == FCGI_STDOUT:
            stdout += content
        elif kind == FCGI_END_REQUEST:
            return stdout


def _read_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("peer closed after %d of %d bytes" % (len(data), size))
        data += chunk
    return data


def copy_of_tracked_files(directory):
    """The repository's tracked files as they are now, in DIRECTORY: what a fresh clone has (no demo/,
    no build/), with any change not yet committed."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, names.decode().split("\0")):
        if (ROOT / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, directory / name)
    return directory


def directory_others_can_reach(prefix):
    """A fresh directory in /tmp that other users can search (pytest's own tmp_path is 0700, under
    /tmp/pytest-of-USER), for tests that run a program as another user.  The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
