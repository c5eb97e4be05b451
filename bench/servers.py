"""servers.py: the stage (a Trac environment, nginx) and the servers each row puts on it.

    load ──HTTP──> nginx (examples/nginx.conf) ──FastCGI──> bench/work/fcgi.sock ──> the row's server

Processes, /proc readers, nginx and the Trac fixture come from the test
suite's helpers (tests/support.py, tests/stack.py), so the benchmark and the
tests start and watch processes the same way.
"""

import copy
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import rows
from peers import Ceiling, Endpoint, ModWsgi, OneProcess
from stack import KEEPALIVE_FRONT, Nginx
from support import Process, children, kill_tree, make_trac_env, wait_until

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

VENV = ROOT / ".venv" / "bin"
PYTHON = str(VENV / "python")


def find_program(name):
    for directory in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("bench: %s is not installed; bench/run installs it" % name)


def run(argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout


# --------------------------------------------------------------------------
# The stage: one Trac environment, its deploy directory, an nginx per variant.

class Stage:
    def __init__(self, work):
        self.work = Path(work)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.iterdir():
            old.unlink()
        self.socket = self.work / "fcgi.sock"
        self.spawn_fcgi = find_program("spawn-fcgi")
        self.env = self.work / "trac-env"
        self.deploy = self.work / "trac-deploy"
        # Made afresh each run, so that it is the fixture of the code measured.
        for old in (self.env, self.deploy):
            shutil.rmtree(old, ignore_errors=True)
        make_bench_env(self.env)
        run([str(VENV / "trac-admin"), str(self.env), "deploy", str(self.deploy)])
        self.nginx, self.name = {}, ""
        self.known = known_settings()

    def twin(self, name):
        """Another socket and nginx on the same Trac environment, for a server run beside the first."""
        other = copy.copy(self)
        other.socket, other.nginx, other.name = self.work / ("fcgi-%s.sock" % name), {}, "-" + name
        return other

    def front(self, variant):
        """The front of a variant: nginx "shipped" (examples/nginx.conf as it is) or "other" (see
        other_front); "apache", the port of a server that is its own front (mod_wsgi); None for none."""
        if variant is None:
            return None
        if variant == "apache" and variant not in self.nginx:
            self.nginx[variant] = Endpoint()
        if variant not in self.nginx:
            self.nginx[variant] = Nginx(self.work / ("nginx-" + variant + self.name), "unix:%s" % self.socket,
                                        **(other_front()[1] if variant == "other" else {}))
        return self.nginx[variant]

    def stop(self):
        for nginx in self.nginx.values():
            nginx.stop()


def shipped_keepalive():
    """The `keepalive N` examples/nginx.conf sets today, or None: it is read at run time."""
    found = re.search(r"^\s*keepalive\s+(\d+)\s*;", (ROOT / "examples" / "nginx.conf").read_text(), re.M)
    return int(found.group(1)) if found else None


def other_front():
    """(label, Nginx keywords) of the connection choice examples/nginx.conf does not make.

    Kept-alive FastCGI connections if it opens one per request (the tests'
    KEEPALIVE_FRONT), else nginx's default, one per request.
    """
    if shipped_keepalive():
        upstream = "    upstream trac {\n        server @{fastcgi_server};\n    }\n"
        return "without FastCGI keepalive", {"upstream": upstream, "directives": {"fastcgi_keep_conn": None}}
    return "with FastCGI keepalive", KEEPALIVE_FRONT


def make_bench_env(path):
    """trac-admin initenv, then tickets with a comment each and two attachments,
    so that every page of the mixes has something to show."""
    make_trac_env(path)
    run([PYTHON, "-W", "ignore", "-c", """
import io, sys
from trac.attachment import Attachment
from trac.env import Environment
from trac.ticket.model import Ticket
env = Environment(sys.argv[1])
for n in range(1, int(sys.argv[2]) + 1):
    ticket = Ticket(env)
    ticket.populate({"summary": "Bench ticket %d: pages render slowly" % n, "reporter": "bench",
                     "type": "defect", "status": "new", "priority": "major", "component": "component1",
                     "milestone": "milestone1",
                     "description": "Steps:\\n 1. Open WikiStart\\n 1. Wait\\n\\n{{{\\nTraceback\\n}}}\\n"
                                    "[wiki:WikiStart]."})
    ticket.insert()
    ticket["status"] = "accepted" if n % 3 == 0 else "new"
    ticket.save_changes("bench", "Comment %d: still happens with '''Trac 1.6'''." % n)
for realm, name in (("wiki", "WikiStart"), ("ticket", "1")):
    attachment = Attachment(env, realm, name)
    attachment.description = "bench notes"
    text = b"notes\\n" * 2000
    attachment.insert("notes.txt", io.BytesIO(text), len(text))
""", str(path), str(rows.TICKETS)])


def known_settings():
    """Every flag and variable the code under test documents in its --help."""
    text = run([PYTHON, str(ROOT / "launcher.py"), "--help"]) + run([PYTHON, str(ROOT / "trac_fcgi.py"), "--help"])
    return sorted(set(re.findall(r"(--[a-z][a-z-]+|\b[A-Z][A-Z0-9_]{3,}\b)", text)))


def resolve(row, known):
    """(args, env, note): a row's settings as the code under test can take them.

    note is None when they apply as written; a sentence saying what ran instead
    when a setting is unknown but asks for what the code does anyway; and the
    row is not run (args None) when it asks for something the code cannot do.
    """
    args, env, notes = [], dict(row["env"]), []
    pairs = list(zip(row["args"][::2], row["args"][1::2]))
    for name, value in pairs + [(k, v) for k, v in row["env"].items() if k in rows.WHEN_UNKNOWN]:
        if name in rows.WHEN_UNKNOWN and name not in known:
            if value != rows.WHEN_UNKNOWN[name]:
                return None, None, "not run: the code measured has no %s" % name
            notes.append("%s is unknown to the code measured, which always does what %s=%s asks"
                         % (name, name, value))
            env.pop(name, None)
            continue
        if name.startswith("--"):
            args += [name, value]
    return args, env, "; ".join(notes) or None


# --------------------------------------------------------------------------
# The servers: how each kind starts on the bench socket, which of its
# processes are workers, which log lines are recycles, and whom faults kill.

class Stock(OneProcess):
    """Trac's own cgi-bin/trac.fcgi under spawn-fcgi.

    It has no master to restart it, so faults run it under a restart loop, as
    runit or systemd's Restart=always would.
    """
    restart_when_dead = True

    def command(self, stage, args):
        return [stage.spawn_fcgi, "-n", "-s", str(stage.socket), "--", str(stage.deploy / "cgi-bin" / "trac.fcgi")]


class UWSGI:
    restart_when_dead = False
    RESPAWN = re.compile(r"Respawned uWSGI worker")
    KILLED = re.compile(r"killed by signal 9")

    def command(self, stage, args, processes=1):
        return [str(VENV / "uwsgi"), "--fastcgi-socket", str(stage.socket),
                "--wsgi-file", str(stage.deploy / "cgi-bin" / "trac.wsgi"),
                "--master", "--processes", str(processes), "--threads", "15",
                "--disable-logging", "--die-on-term", "--need-app"] + args

    def workers(self, root):
        return children(root)

    def recycles(self, lines):
        # Every respawn but those that followed our SIGKILLs.
        respawns = [when for when, line in lines if self.RESPAWN.search(line)]
        kills = sum(1 for when, line in lines if self.KILLED.search(line))
        return respawns[kills:]

    def victim(self, root, kills):
        workers = children(root)
        return workers[0] if workers else None


class Ours:
    """spawn-fcgi -> launcher.py -> trac-fcgi, as the README deploys it."""
    restart_when_dead = False
    HANDOFF = re.compile(r"event=hup .*reason='replaced by")

    def command(self, stage, args):
        return [stage.spawn_fcgi, "-n", "-s", str(stage.socket), "--", PYTHON, str(ROOT / "launcher.py"),
                "--stop-timeout", "10"] + args + ["--", str(VENV / "trac-fcgi")]

    def workers(self, root, lines=()):
        """Serving workers: the launcher's children, but not a mold, which serves nobody."""
        return [pid for pid in children(root) if pid not in molds(lines)]

    def recycles(self, lines):
        return [when for when, line in lines if self.HANDOFF.search(line)]

    def victim(self, root, kills, lines=()):
        workers = self.workers(root, lines)
        return workers[kills % len(workers)] if workers else None


def molds(lines):
    """Pids logged as molds: the launcher's event=mold-start pid=N, a forked worker's mold=N."""
    return {int(pid) for _, line in lines for found in re.findall(r"event=mold-start pid=(\d+)|\bmold=(\d+)", line)
            for pid in found if pid}


SERVERS = {"stock": Stock(), "uwsgi": UWSGI(), "ours": Ours(), "mod_wsgi": ModWsgi(), "ceiling": Ceiling()}


class Running:
    """One server on the bench socket, restarted when it dies if its kind needs that."""

    def __init__(self, stage, kind, argv, env, name):
        self.stage, self.kind, self.argv = stage, SERVERS[kind], argv
        self.env = dict(env, TRAC_ENV=str(stage.env), PYTHONWARNINGS="ignore")
        self.log_path = stage.logs / (name + ".log")
        self.processes, self.stopping = [], False
        self.start()
        if self.kind.restart_when_dead:
            threading.Thread(target=self.restart_loop, daemon=True).start()

    @classmethod
    def of_row(cls, stage, row, name, args, env):
        kind = SERVERS[row["server"]]
        return cls(stage, row["server"], kind.command(stage, args), env, name)

    def warm(self, front):
        """Wait until it serves, and serve every page once (uncounted): the ceiling does so itself."""
        if isinstance(self.kind, Ceiling):
            self.processes[-1].wait_for_line(r"event=ready ", timeout=120)
        else:
            warm_up(front, rows.cycle(rows.MIX))

    def start(self):
        if self.stage.socket.exists():
            self.stage.socket.unlink()
        self.processes.append(Process(self.argv, self.log_path, env=self.env, stamped=True, start_new_session=True))

    def restart_loop(self):
        while not self.stopping:
            if self.processes[-1].popen.poll() is not None and not self.stopping:
                self.start()
            time.sleep(0.05)

    @property
    def root(self):
        return self.processes[-1].pid

    def workers(self):
        if self.processes[-1].popen.poll() is not None:
            return []
        if isinstance(self.kind, Ours):
            return self.kind.workers(self.root, self.lines())
        return self.kind.workers(self.root)

    def victim(self, kills):
        if isinstance(self.kind, Ours):
            return self.kind.victim(self.root, kills, self.lines())
        return self.kind.victim(self.root, kills)

    def lines(self):
        return [entry for process in self.processes for entry in process.lines]

    def recycles(self, started, ended):
        return [when for when in self.kind.recycles(self.lines()) if started <= when <= ended]

    def stop(self):
        self.stopping = True
        for process in self.processes:
            process.stop(timeout=15)
            kill_tree(process.pid)


def http_get(url, timeout=30):
    """The status of one GET, or None if no answer came."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def warm_up(nginx, paths, timeout=120):
    """Wait until the server answers, then fetch each page once (uncounted):
    the first request of each kind compiles its templates."""
    wait_until(lambda: http_get(nginx.url("/wiki/WikiStart")) == 200, timeout, "a 200 from the server")
    for path in sorted(set(paths)):
        http_get(nginx.url(path))
