#!/usr/bin/env python3
"""trac-fcgi-launcher: hold a FastCGI listening socket and keep N workers on it.

The launcher never accepts a connection.  It owns the socket that spawn-fcgi,
systemd or its own --bind created, starts each worker with that socket on
fd 0, and replaces workers make-before-break:

    1. a worker crosses a limit and sends SIGUSR1 to its launcher;
    2. the launcher starts a replacement for that slot, same socket on fd 0;
    3. the replacement warms up and sends READY=1 on NOTIFY_SOCKET;
    4. only then the launcher sends SIGHUP to the old worker;
    5. the old worker stops accepting, finishes what it accepted, exits 0.

Everything the launcher reacts to arrives as a signal, and it sleeps in
sigtimedwait() between them: worker requests (SIGUSR1), deaths (SIGCHLD),
operator commands, and notify datagrams (the notify socket raises SIGIO).
Reading this file top to bottom is meant to be how one learns how it works;
the policy for each signal is one method, named after the signal.

Standard library only.  See README.md for deployment recipes.
"""

import argparse
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import struct
import sys
import time

__version__ = "0.1.0"

# A worker that dies sooner than this after its start was a crash.
CRASH_WINDOW_S = 10.0
# Crash backoff doubles from the first to the last figure, and is forgotten
# once a worker has stayed up for HEALTHY_S.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
HEALTHY_S = 60.0
# Nothing scheduled: still wake now and then, so a lost signal costs at most this.
IDLE_WAKE_S = 60.0

SIGNALS = {
    # signal: (effect, for --help and the README's signals table)
    signal.SIGUSR1: "from a worker: replace that worker; from anyone else: replace every worker, one at a time",
    signal.SIGHUP: "replace every worker, one at a time, each make-before-break (a rolling restart)",
    signal.SIGTTIN: "add a slot (one more worker)",
    signal.SIGTTOU: "remove the last slot (its worker drains and exits)",
    signal.SIGTERM: "graceful stop: SIGHUP every worker, wait --stop-timeout for them to drain, SIGKILL the rest, exit 0",
    signal.SIGINT: "same as SIGTERM",
    signal.SIGQUIT: "immediate stop: SIGKILL every worker, exit 0",
}
# SIGCHLD reaps workers and SIGIO says a notify datagram is waiting.
HANDLED = set(SIGNALS) | {signal.SIGCHLD, signal.SIGIO}


# --------------------------------------------------------------------------
# Settings: declared once; this table feeds argparse, validation and --help.

class BadInput(Exception):
    """A problem the operator can fix: printed as one line, exit status 2."""


def positive_int(text):
    """a whole number of at least 1, e.g. 2"""
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def positive_seconds(text):
    """a number of seconds above 0, e.g. 30"""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def size_bytes(text):
    """a size in bytes with an optional K, M or G suffix, e.g. 512M"""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units and text[-1:] else (text, "")
    value = int(number) * units[unit]
    if value < 0:
        raise ValueError
    return value


def on_off(text):
    """on or off"""
    if text not in ("on", "off"):
        raise ValueError
    return text == "on"


def address(text):
    """an address: unix:/path[:mode], HOST:PORT or [v6]:PORT, e.g. unix:/run/trac/trac.sock"""
    if text.startswith("unix:"):
        path, mode = text[len("unix:"):], 0o660
        head, sep, tail = path.rpartition(":")
        if sep and tail and all(c in "01234567" for c in tail):
            path, mode = head, int(tail, 8)
        if not path.startswith("/"):
            raise ValueError
        return socket.AF_UNIX, path, mode
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        family, host = socket.AF_INET6, host[1:-1]
    else:
        family = socket.AF_INET
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError
    return family, host, int(port)


# (flag, environment variable, parser, default, metavar, help)
SETTINGS = [
    ("--workers", "LAUNCHER_WORKERS", positive_int, 1, "N",
     "workers accepting on the socket; SIGTTIN and SIGTTOU change it at run time"),
    ("--ready-timeout", "LAUNCHER_READY_TIMEOUT", positive_seconds, 30.0, "SECONDS",
     "how long a replacement may warm up before READY=1; a worker that never "
     "speaks the notify protocol counts as ready once this passes and it is alive"),
    ("--stop-timeout", "LAUNCHER_STOP_TIMEOUT", positive_seconds, 30.0, "SECONDS",
     "how long SIGTERM waits for workers to drain before SIGKILL"),
    ("--memory-reserve", "LAUNCHER_MEMORY_RESERVE", size_bytes, 0, "SIZE",
     "memory (K, M, G) to keep available; when MemAvailable minus one worker's "
     "RSS would fall below it, a handoff stops the old worker before starting "
     "the new one"),
    ("--mold", "LAUNCHER_MOLD", on_off, "on", "on|off",
     "on: start WORKER_PATH once as a warm mold and fork every worker from it, "
     "in milliseconds and sharing its memory; a worker command that does not "
     "answer as a mold is exec'd for each worker, as with off"),
    ("--bind", "LAUNCHER_BIND", address, None, "ADDR",
     "create the socket: unix:/path[:mode] (mode 0660 by default), HOST:PORT or "
     "[v6]:PORT; without it the socket is fd 0 (spawn-fcgi) or systemd's fd 3"),
]

EPILOG = """\
worker command:
  WORKER_PATH=/abs/path/to/trac-fcgi in the environment, or a command after --.
  It is run directly (no shell) with the socket on fd 0, stdout and stderr
  inherited, every other fd closed, an empty signal mask, default signal
  dispositions, and LAUNCHER_PID and NOTIFY_SOCKET in its environment.

signals:
%s

examples:
  spawn-fcgi -n -s /run/trac/trac.sock -M 0660 -u www-data -- \\
      /usr/bin/env WORKER_PATH=/srv/trac/venv/bin/trac-fcgi trac-fcgi-launcher --workers 2
  trac-fcgi-launcher --bind unix:/run/trac/trac.sock --workers 2 -- /srv/trac/venv/bin/trac-fcgi
""" % "\n".join("  %-8s %s" % (signal.Signals(s).name, effect) for s, effect in SIGNALS.items())


def parse_settings(argv):
    parser = argparse.ArgumentParser(
        prog="trac-fcgi-launcher",
        description="Hold a FastCGI socket and keep workers on it, replacing them make-before-break.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, env, parse, default, metavar, help_text in SETTINGS:
        shown = "" if default is None else " (default %s)" % default
        parser.add_argument(flag, metavar=metavar, default=None,
                            help="%s; env %s%s" % (help_text, env, shown))
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="log only failures")
    verbosity.add_argument("--verbose", action="store_true", help="also log notify messages and signals")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="worker command after --; WORKER_PATH if absent")
    # argparse prints usage and exits 2 on an unknown flag: already one clear answer.
    args = parser.parse_args(argv)
    args.source = {}  # attribute -> the flag or variable it came from, for error lines

    for flag, env, parse, default, metavar, help_text in SETTINGS:
        attr = flag[2:].replace("-", "_")
        raw = getattr(args, attr)
        source = flag
        if raw is None and os.environ.get(env) is not None:
            raw, source = os.environ[env], env
        args.source[attr] = source
        if raw is None:
            # A default given as text is written as an operator would write it.
            setattr(args, attr, parse(default) if isinstance(default, str) else default)
            continue
        try:
            setattr(args, attr, parse(raw))
        except (ValueError, IndexError):
            raise BadInput("%s=%r is not %s" % (source, raw, parse.__doc__))
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


# --------------------------------------------------------------------------
# Logging: one line per event, key=value.

VERBOSITY = 1  # 0 quiet, 1 normal, 2 verbose


def log(event, level=1, **facts):
    if level > VERBOSITY:
        return
    words = ["trac-fcgi-launcher[%d]" % os.getpid(), "event=%s" % event]
    for key, value in facts.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = "%.3f" % value
        value = str(value)
        words.append("%s=%s" % (key, value if value and " " not in value else repr(value)))
    sys.stderr.write(" ".join(words) + "\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------
# The socket and the worker command: checked once, before anything starts.

SPAWN_FCGI_HINT = ("run me under spawn-fcgi (spawn-fcgi -n -s /run/trac.sock -- "
                   "trac-fcgi-launcher) or pass --bind unix:/run/trac.sock")


def listening_socket(bind, source="--bind"):
    if bind:
        try:
            return bind_socket(*bind)
        except BadInput as problem:
            raise BadInput("%s: %s" % (source, problem))
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS", "0") != "0":
        return check_listening(3, "systemd's fd 3 (LISTEN_FDS)")
    return check_listening(0, "fd 0")


def check_listening(fd, name):
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as error:
        reason = "is not open" if error.errno == errno.EBADF else "is not a socket"
        raise BadInput("%s %s: %s" % (name, reason, SPAWN_FCGI_HINT))
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise BadInput("%s is a socket but not a listening stream socket: %s" % (name, SPAWN_FCGI_HINT))
    return sock


def bind_socket(family, host, port):
    if family == socket.AF_UNIX:
        return bind_unix(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        raise BadInput("cannot bind %s port %d: %s; pick a free address" % (host, port, error.strerror))
    sock.listen(socket.SOMAXCONN)
    return sock


def bind_unix(path, mode):
    if os.path.exists(path):
        # Only a stale file is removed: a live launcher still answers on it.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise BadInput("unix:%s: something is listening there already; stop it or pick another path" % path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a umask that leaves no window in which the file is world-writable.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as error:
        raise BadInput("cannot bind unix:%s: %s; check the directory exists and is writable" % (path, error.strerror))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(socket.SOMAXCONN)
    return sock


def worker_command(command):
    if command:
        path = command[0] if "/" in command[0] else shutil.which(command[0])
        source, argv = "the command after --", command
    else:
        path = os.environ.get("WORKER_PATH")
        if not path:
            raise BadInput("no worker to run: set WORKER_PATH=/abs/path/to/trac-fcgi "
                           "or give a command after --, e.g. trac-fcgi-launcher -- /srv/trac/venv/bin/trac-fcgi")
        source, argv = "WORKER_PATH", [path]
        if not os.path.isabs(path):
            raise BadInput("WORKER_PATH=%r is not an absolute path: give the full path, e.g. "
                           "WORKER_PATH=/srv/trac/venv/bin/trac-fcgi" % path)
    if not path or not os.path.isfile(path):
        raise BadInput("%s names %r, which does not exist: give the full path to trac-fcgi"
                       % (source, command[0] if command else path))
    if not os.access(path, os.X_OK):
        raise BadInput("%s names %r, which is not executable: chmod +x it" % (source, path))
    return path, argv


# --------------------------------------------------------------------------
# Notify sockets: ours for the workers, and systemd's for us.

SO_PEERCRED_FORMAT = "3i"  # struct ucred: pid, uid, gid
NOTIFY_NAME = "trac-fcgi-launcher/%d"


def open_notify_socket():
    """An abstract-namespace datagram socket, so no file outlives a SIGKILL.

    Senders are identified by SO_PASSCRED credentials, which the kernel fills
    in, so a datagram cannot claim to come from a worker it is not.  O_ASYNC
    makes every datagram raise SIGIO, which lets one sigtimedwait() wait for
    signals and datagrams alike.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + NOTIFY_NAME % os.getpid())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    fcntl.fcntl(sock.fileno(), fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags | os.O_ASYNC | os.O_NONBLOCK)
    return sock


def read_notifications(sock):
    """Yield (sender pid, {key: value}) for every datagram waiting."""
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize(SO_PEERCRED_FORMAT)))
        except (BlockingIOError, InterruptedError):
            return
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack(SO_PEERCRED_FORMAT, payload[:12])[0]
        fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines() if line)
        yield pid, fields


class Systemd:
    """sd_notify() for the launcher itself, when systemd gave it a NOTIFY_SOCKET."""

    def __init__(self, address):
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None

    def notify(self, *lines):
        if self.sock:
            try:
                self.sock.sendto("\n".join(lines).encode(), self.address)
            except OSError as error:
                log("systemd-notify-failed", level=0, error=error.strerror)


# --------------------------------------------------------------------------
# The mold: one warm worker process that every other worker is forked from.
#
# Started like a worker but with /dev/null on fd 0 and TRAC_FCGI_MOLD_FD
# naming its end of a socket pair, it warms up, says MOLD=1 on the notify
# socket, and then forks a worker each time it is asked.  It never holds the
# listening socket: that travels with each request, so a worker command that
# ignores TRAC_FCGI_MOLD_FD (a stock trac.fcgi) has nothing to serve on, and
# the launcher goes on exec'ing it for each worker.

PR_SET_CHILD_SUBREAPER = 36
MOLD_FD = 3  # where the mold finds its end of the socket pair
# A fork takes milliseconds; a mold that has not answered in this long is
# treated as dead, and the worker is exec'd instead.
MOLD_REPLY_TIMEOUT_S = 2.0


def become_subreaper():
    """Adopt orphaned descendants, as init would: the mold double-forks each
    worker so that it ends up our child, reaped and signalled like any other."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


class Mold:
    """One mold process, from its start to its retirement.

    Until it says MOLD=1 it is `ready` False and nothing is asked of it.
    """

    def __init__(self, path, argv, environ):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Inheritable, in case it is fd 3 already (a dup2 onto itself keeps close-on-exec).
            os.set_inheritable(theirs.fileno(), True)
            self.pid = os.posix_spawn(
                path, argv, dict(environ, TRAC_FCGI_MOLD_FD=str(MOLD_FD)),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, theirs.fileno(), MOLD_FD)],
                setsigmask=(), setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.channel = ours
        self.channel.settimeout(MOLD_REPLY_TIMEOUT_S)
        self.started = time.monotonic()
        self.ready = False

    def fork(self, listener):
        """A new worker's pid, already our child; None if the mold did not answer.

        A mold that missed one answer could send it late, as if it answered
        the next request: the caller must kill it.
        """
        try:
            socket.send_fds(self.channel, [b"fork"], [listener.fileno()])
            reply = self.channel.recv(64)
        except OSError:  # socket.timeout included
            return None
        if reply.startswith(b"pid ") and reply[4:].isdigit():
            return int(reply[4:])
        return None

    def retire(self):
        """The mold exits when its end of the pair closes."""
        self.channel.close()

    def kill(self):
        self.channel.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# Workers and slots.

def resident_bytes(pid):
    try:
        with open("/proc/%d/statm" % pid) as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def smaps_rollup(pid):
    """(PSS, private) bytes of a live process, or (None, None).

    A worker forked from the mold shares most of its pages, which its RSS
    counts in full: PSS divides each shared page among its sharers, and
    private memory is what its exit gives back.
    """
    fields = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "Pss" not in fields:
        return None, None
    return fields["Pss"], fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def memory_available():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Worker:
    """One worker process.  Its role is the whole of its handoff state:

    warming  started as a replacement, not accepting yet as far as we know
    serving  the slot's accepting worker
    draining told to go (SIGHUP); its exit is expected, never a crash
    """

    def __init__(self, pid, slot, role):
        self.pid = pid
        self.slot = slot
        self.role = role
        self.started = time.monotonic()
        self.ready = False
        self.told_to_go = None     # monotonic time of the SIGHUP
        self.said_stopping = False  # sent STOPPING=1: it exits of its own accord
        self.memory = (None, None)  # (PSS, private) when told to go: a dead process has none

    def age(self):
        return time.monotonic() - self.started


class Slot:
    def __init__(self, number):
        self.number = number
        self.worker = None           # the serving worker
        self.replacement = None      # the warming worker, at most one
        self.crashes = 0
        self.not_before = 0.0        # backoff: no spawn for this slot before then
        self.retired = False         # removed by SIGTTOU; gone once its workers are


# --------------------------------------------------------------------------
# The launcher.

class Launcher:
    def __init__(self, settings, listener, path, argv):
        self.settings = settings
        self.listener = listener
        self.path, self.argv = path, argv
        self.slots = [Slot(n) for n in range(settings.workers)]
        self.workers = {}            # pid -> Worker, every child we have not reaped
        self.pending = []            # slots waiting for a make-before-break handoff
        self.rolling = False         # a rolling restart is under way (systemd RELOADING)
        self.stopping_since = None
        self.all_ready_told = False
        self.status = None
        self.workers_speak_notify = False
        # The mold: the one workers are forked from (starting until it says
        # MOLD=1), the one a SIGHUP replaced (retired once the restart is
        # done), every mold process not reaped yet, and why there is none.
        self.mold = None
        self.old_mold = None
        self.mold_pids = set()
        self.mold_unavailable = not settings.mold  # the worker command does not answer as a mold
        self.mold_crashes = 0
        self.mold_not_before = 0.0
        self.slots_wait_for_mold = False  # at start, slots wait for the first mold's answer
        self.restart_after_mold = None    # a SIGHUP's rolling restart, waiting for its new mold
        self.notify = open_notify_socket()
        self.systemd = Systemd(os.environ.get("NOTIFY_SOCKET"))
        self.environ = self.worker_environment()

    def worker_environment(self):
        environ = dict(os.environ)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(name, None)
        environ["LAUNCHER_PID"] = str(os.getpid())
        # Ours, never systemd's: the workers report to us, and we to systemd.
        environ["NOTIFY_SOCKET"] = "@" + NOTIFY_NAME % os.getpid()
        return environ

    # -- the main loop ----------------------------------------------------

    def run(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        close_inherited_fds(keep={self.listener.fileno(), self.notify.fileno()})
        log("start", workers=len(self.slots), socket=describe(self.listener), worker=" ".join(self.argv),
            mold="on" if self.settings.mold else "off")
        if not self.mold_unavailable:
            try:
                become_subreaper()
            except OSError as error:
                self.mold_unavailable = True
                log("mold-unavailable", level=0, reason="cannot become a child subreaper: %s" % error.strerror)
        if not self.mold_unavailable:
            # A mold warms up as long as a worker would: the slots wait for
            # its answer rather than warm up cold beside it.
            self.slots_wait_for_mold = True
            self.start_mold()
        while True:
            self.schedule()
            if self.stopping_since is not None and not self.workers and not self.mold_pids:
                break
            info = signal.sigtimedwait(HANDLED, self.seconds_to_next_deadline())
            if info is not None:
                self.dispatch(info)
        self.systemd.notify("STATUS=stopped")
        log("stop", status=0)
        return 0

    def dispatch(self, info):
        handler = {
            signal.SIGCHLD: self.handle_chld,
            signal.SIGIO: self.handle_io,
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGHUP: self.handle_hup,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGQUIT: self.handle_quit,
        }[info.si_signo]
        if info.si_signo not in (signal.SIGCHLD, signal.SIGIO):
            log("signal", level=2, signal=signal.Signals(info.si_signo).name, sender=info.si_pid)
        handler(info)

    # -- one method per signal: each is the whole policy for it -----------

    def handle_usr1(self, info):
        worker = self.workers.get(info.si_pid)
        if worker is None:
            self.rolling_restart("SIGUSR1 from pid %d" % info.si_pid)
        elif worker.role == "serving":
            # Standard signals coalesce, so two workers asking at once may
            # reach us as one: workers repeat the request until answered.
            self.request_handoff(worker.slot, "worker asked")

    def handle_hup(self, info):
        if self.settings.mold and self.stopping_since is None and not self.rolling and not self.restart_after_mold:
            # New code or configuration: a new mold first, then every worker
            # from it, make-before-break; the old mold goes last.
            self.mold_unavailable = False
            self.old_mold, self.mold = self.mold, None
            self.restart_after_mold = "SIGHUP"
            log("new-mold", reason="SIGHUP", old=self.old_mold and self.old_mold.pid)
            self.start_mold()
        else:
            self.rolling_restart("SIGHUP")

    def handle_ttin(self, info):
        if self.stopping_since is None:
            slot = Slot(max([s.number for s in self.slots], default=-1) + 1)
            self.slots.append(slot)
            log("slot-added", slot=slot.number, workers=len(self.slots))
            self.spawn(slot, "serving")

    def handle_ttou(self, info):
        if self.stopping_since is None and len(self.slots) > 1:
            slot = self.slots.pop()
            slot.retired = True
            if slot in self.pending:
                self.pending.remove(slot)
            log("slot-removed", slot=slot.number, workers=len(self.slots))
            for worker in (slot.replacement, slot.worker):
                if worker:
                    self.tell_to_go(worker, "slot removed")

    def handle_term(self, info):
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.pending.clear()
            self.systemd.notify("STOPPING=1")
            log("stopping", workers=len(self.workers), timeout_s=self.settings.stop_timeout)
            self.retire_molds()
            for worker in list(self.workers.values()):
                self.tell_to_go(worker, "launcher stopping")

    def handle_quit(self, info):
        self.systemd.notify("STOPPING=1")
        self.kill_all("SIGQUIT")
        self.stopping_since = self.stopping_since or time.monotonic()

    def handle_chld(self, info):
        # A worker says STOPPING=1 and then exits; SIGCHLD is the lower signal
        # number and comes out of sigtimedwait first, so read what it said
        # before judging its exit.
        self.handle_io(info)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.reaped(worker, status)
            elif pid in self.mold_pids:
                self.mold_exited(pid, status)

    def handle_io(self, info):
        for pid, fields in read_notifications(self.notify):
            worker = self.workers.get(pid)
            log("notify", level=2, pid=pid, fields=",".join(fields))
            if self.mold is not None and pid == self.mold.pid:
                self.mold_said(fields)
                continue
            if worker is None:
                continue  # not one of ours: credentials cannot be forged
            if fields.get("READY") == "1":
                self.workers_speak_notify = True
                self.became_ready(worker, "notify")
            if fields.get("STOPPING") == "1":
                worker.said_stopping = True

    # -- the handoff --------------------------------------------------------

    def rolling_restart(self, reason):
        if self.stopping_since is not None:
            return
        if self.rolling:
            # Coalesced into the restart under way: a burst costs nothing.
            return log("coalesced", level=2, reason=reason)
        log("rolling-restart", reason=reason, workers=len(self.slots))
        self.rolling = True
        self.systemd.notify("RELOADING=1", "STATUS=rolling restart")
        for slot in self.slots:
            self.request_handoff(slot, reason)

    def request_handoff(self, slot, reason):
        # Coalesced: a slot is in the queue at most once, and not at all while
        # its replacement warms up, so bursts of signals cost nothing.
        if self.stopping_since is None and slot.replacement is None and slot not in self.pending:
            log("replace", slot=slot.number, pid=slot.worker and slot.worker.pid, reason=reason)
            self.pending.append(slot)

    def start_next_handoff(self):
        """At most one replacement warms up at a time, across all slots.

        A slot whose previous worker is still draining waits for it to exit,
        so no slot ever has more than two processes, whatever the signals.
        """
        if self.stopping_since is not None or any(s.replacement for s in self.slots):
            return
        now = time.monotonic()
        draining = {w.slot for w in self.workers.values() if w.role == "draining"}
        for slot in self.pending:
            if slot.not_before <= now and slot not in draining:
                self.pending.remove(slot)
                break
        else:
            return
        if slot.worker is None:
            return  # its worker died meanwhile; schedule() respawns it
        rss = resident_bytes(slot.worker.pid)
        if self.settings.memory_reserve and memory_available() - rss < self.settings.memory_reserve:
            # Not enough memory for two workers side by side: break before make.
            log("stop-then-start", slot=slot.number, pid=slot.worker.pid, rss=rss,
                mem_available=memory_available(), reserve=self.settings.memory_reserve)
            self.tell_to_go(slot.worker, "memory headroom")
            slot.worker = None
            self.spawn(slot, "serving")
        else:
            self.spawn(slot, "warming")

    def became_ready(self, worker, how):
        if worker.ready:
            return
        worker.ready = True
        slot = worker.slot
        log("ready", slot=slot.number, pid=worker.pid, ready_s=worker.age(), by=how)
        if worker.role == "warming":
            old, slot.worker, slot.replacement = slot.worker, worker, None
            worker.role = "serving"
            if old is not None:
                self.tell_to_go(old, "replaced by pid %d" % worker.pid)
        self.report_status()

    def tell_to_go(self, worker, reason):
        if worker.told_to_go is None:
            worker.told_to_go = time.monotonic()
            worker.role = "draining"
            if worker.slot.worker is worker:
                worker.slot.worker = None
            if worker.slot.replacement is worker:
                worker.slot.replacement = None
            worker.memory = smaps_rollup(worker.pid)
            log("hup", slot=worker.slot.number, pid=worker.pid, reason=reason)
            os.kill(worker.pid, signal.SIGHUP)

    # -- births and deaths ------------------------------------------------

    def spawn(self, slot, role):
        pid, how = self.fork_from_mold(slot), "fork"
        if pid is None:
            pid, how = self.exec_worker(slot), "exec"
        if pid is None:
            return
        worker = Worker(pid, slot, role)
        self.workers[pid] = worker
        if role == "warming":
            slot.replacement = worker
        else:
            slot.worker = worker
        log("spawn", slot=slot.number, pid=pid, role=role, how=how)

    def exec_worker(self, slot):
        try:
            return os.posix_spawn(
                self.path, self.argv, self.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, self.listener.fileno(), 0)],
                # Signal masks and ignored dispositions cross exec: give the
                # worker a clean slate, or it could never see SIGHUP.
                setsigmask=(),
                setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
        except OSError as error:
            log("spawn-failed", level=0, slot=slot.number, error=error.strerror)
            self.back_off(slot)
            return None

    def reaped(self, worker, status):
        slot = worker.slot
        code = os.waitstatus_to_exitcode(status)
        how = {"status": code} if code >= 0 else {"signal": signal.Signals(-code).name}
        expected = worker.told_to_go is not None or (worker.said_stopping and code == 0)
        drain_s = time.monotonic() - worker.told_to_go if worker.told_to_go else None
        pss, private = worker.memory
        log("exit", slot=slot.number, pid=worker.pid, role=worker.role,
            age_s=worker.age(), drain_s=drain_s, pss=pss, private=private, **how)
        if worker.age() >= HEALTHY_S:
            slot.crashes = 0
        if slot.retired or self.stopping_since is not None:
            return
        if worker is slot.replacement:
            # The old worker keeps serving; try again later.
            slot.replacement = None
            self.back_off(slot)
            self.pending.append(slot)
        elif worker is slot.worker:
            slot.worker = None
            if slot.replacement is not None:
                # Its replacement is already warming: it takes over the slot.
                slot.worker, slot.replacement = slot.replacement, None
                slot.worker.role = "serving"
            elif not expected and worker.age() < CRASH_WINDOW_S:
                self.back_off(slot)
        # A worker that asked to be replaced and then exited on its own
        # (runaway memory) leaves no handoff to do.
        if slot in self.pending and slot.worker is None:
            self.pending.remove(slot)

    def back_off(self, slot):
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** slot.crashes)
        slot.crashes += 1
        slot.not_before = time.monotonic() + delay
        log("backoff", level=0, slot=slot.number, crashes=slot.crashes, delay_s=delay)

    # -- time -----------------------------------------------------------

    def schedule(self):
        """Do whatever is due now.  Called after every event."""
        now = time.monotonic()
        if self.stopping_since is not None:
            if now - self.stopping_since >= self.settings.stop_timeout and self.workers:
                self.kill_all("stop timeout")
            return
        self.schedule_mold(now)
        for slot in self.slots:
            if (slot.worker is None and slot.replacement is None and slot.not_before <= now
                    and not self.slots_wait_for_mold):
                self.spawn(slot, "serving")
        for worker in list(self.workers.values()):
            if not worker.ready and worker.age() >= self.settings.ready_timeout:
                self.ready_timed_out(worker)
        self.start_next_handoff()
        if self.rolling and not self.pending and not any(s.replacement for s in self.slots):
            self.rolling = False
            log("rolling-restart-done", workers=len(self.slots))
            self.all_ready_told = False
            if self.old_mold is not None:
                self.old_mold.retire()
                self.old_mold = None
        self.report_status()

    def ready_timed_out(self, worker):
        if worker.role == "draining":
            worker.ready = True  # nothing to promote
        elif self.workers_speak_notify and worker.role == "warming":
            # Earlier workers said READY=1, so this one's silence means trouble.
            slot = worker.slot
            log("ready-timeout", level=0, slot=slot.number, pid=worker.pid)
            self.tell_to_go(worker, "silent past --ready-timeout")
            os.kill(worker.pid, signal.SIGKILL)
            self.back_off(slot)
            self.pending.append(slot)
        else:
            # A stock trac.fcgi never speaks the notify protocol: alive is ready.
            self.became_ready(worker, "timeout")

    def seconds_to_next_deadline(self):
        now = time.monotonic()
        deadlines = [now + IDLE_WAKE_S]
        if self.stopping_since is not None:
            deadlines.append(self.stopping_since + self.settings.stop_timeout)
        else:
            deadlines += [s.not_before for s in self.slots if s.worker is None or s in self.pending]
            deadlines += [w.started + self.settings.ready_timeout
                          for w in self.workers.values() if not w.ready]
            if self.mold is not None and not self.mold.ready:
                deadlines.append(self.mold.started + self.settings.ready_timeout)
            elif self.mold is None and not self.mold_unavailable:
                deadlines.append(self.mold_not_before)
        return max(0.0, min(deadlines) - now)

    def kill_all(self, reason):
        for worker in self.workers.values():
            log("kill", slot=worker.slot.number, pid=worker.pid, reason=reason)
            os.kill(worker.pid, signal.SIGKILL)
        for pid in self.mold_pids:
            log("mold-kill", pid=pid, reason=reason)
            os.kill(pid, signal.SIGKILL)

    def report_status(self):
        ready = sum(1 for s in self.slots if s.worker is not None and s.worker.ready)
        status = "%d of %d workers ready, %d warming, %d draining" % (
            ready, len(self.slots), sum(1 for s in self.slots if s.replacement),
            sum(1 for w in self.workers.values() if w.role == "draining"))
        if status != self.status:
            self.status = status
            self.systemd.notify("STATUS=" + status)
        if ready == len(self.slots) and not self.rolling and not self.all_ready_told:
            self.all_ready_told = True
            log("all-ready", workers=ready)
            self.systemd.notify("READY=1")


    # -- the mold ---------------------------------------------------------
    #
    # Workers are forked from the mold when it is ready and exec'd otherwise,
    # so no slot ever waits on a mold but at start.  A process started as the
    # mold that exits, says READY=1 or stays silent past --ready-timeout
    # without ever saying MOLD=1 does not speak the mold protocol (a stock
    # trac.fcgi): it is killed, it never had the socket, and every worker is
    # exec'd until a SIGHUP (new code) tries again.  A mold that did say
    # MOLD=1 and then dies or fails to answer is restarted with backoff.

    def start_mold(self):
        try:
            mold = Mold(self.path, self.argv, self.environ)
        except OSError as error:
            log("mold-spawn-failed", level=0, error=error.strerror)
            return self.mold_failed(None, "spawn failed", unavailable=True)
        self.mold = mold
        self.mold_pids.add(mold.pid)
        log("mold-start", pid=mold.pid)

    def mold_said(self, fields):
        if fields.get("MOLD") == "1" and not self.mold.ready:
            self.mold.ready = True
            log("mold-ready", pid=self.mold.pid, ready_s=time.monotonic() - self.mold.started)
            self.mold_answered()
        elif fields.get("READY") == "1":
            self.mold_failed(self.mold, "said READY=1, not MOLD=1", unavailable=True)

    def fork_from_mold(self, slot):
        if self.mold is None or not self.mold.ready or self.stopping_since is not None:
            return None
        pid = self.mold.fork(self.listener)
        if pid is None:
            self.mold_failed(self.mold, "no answer to a fork request", unavailable=False)
        return pid

    def mold_exited(self, pid, status):
        self.mold_pids.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        how = {"status": code} if code >= 0 else {"signal": signal.Signals(-code).name}
        log("mold-exit", pid=pid, **how)
        if self.mold is not None and pid == self.mold.pid:
            self.mold_failed(self.mold, "exited", unavailable=not self.mold.ready)

    def mold_failed(self, mold, reason, unavailable):
        if mold is not None:
            if mold.ready and time.monotonic() - mold.started >= HEALTHY_S:
                self.mold_crashes = 0
            mold.kill()
        self.mold = None
        if unavailable:
            self.mold_unavailable = True
            log("mold-unavailable", level=0, pid=mold and mold.pid, reason=reason,
                hint="workers are exec'd; WORKER_PATH must be trac-fcgi to fork them from a mold")
        elif self.stopping_since is None:
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** self.mold_crashes)
            self.mold_crashes += 1
            self.mold_not_before = time.monotonic() + delay
            log("mold-failed", level=0, pid=mold and mold.pid, reason=reason, crashes=self.mold_crashes,
                delay_s=delay)
        self.mold_answered()

    def mold_answered(self):
        """The mold that slots or a SIGHUP waited for is ready, or there is none: go on."""
        self.slots_wait_for_mold = False
        if self.restart_after_mold:
            reason, self.restart_after_mold = self.restart_after_mold, None
            self.rolling_restart(reason)

    def schedule_mold(self, now):
        if self.mold is not None and not self.mold.ready and now - self.mold.started >= self.settings.ready_timeout:
            self.mold_failed(self.mold, "silent past --ready-timeout", unavailable=True)
        if self.mold is None and not self.mold_unavailable and now >= self.mold_not_before:
            self.start_mold()

    def retire_molds(self):
        for mold in (self.mold, self.old_mold):
            if mold is not None:
                mold.retire()
        self.mold = self.old_mold = None


def close_inherited_fds(keep):
    """Mark every inherited fd above 2 close-on-exec, so workers get only 0, 1 and 2."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


def describe(sock):
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix:" + (address.decode() if isinstance(address, bytes) else address)
    return ("[%s]:%d" if sock.family == socket.AF_INET6 else "%s:%d") % address[:2]


def main(argv=None):
    global VERBOSITY
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
        VERBOSITY = 0 if settings.quiet else 2 if settings.verbose else 1
        path, command = worker_command(settings.command)
        listener = listening_socket(settings.bind, settings.source["bind"])
    except BadInput as problem:
        sys.stderr.write("trac-fcgi-launcher: %s\n" % problem)
        return 2
    return Launcher(settings, listener, path, command).run()


if __name__ == "__main__":
    sys.exit(main())
