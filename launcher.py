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
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import time
import traceback

__version__ = "0.1.0"

# Backoff is for workers that cannot start: one that dies before READY=1 is
# a crash, and its slot waits BACKOFF_FIRST_S, doubling up to BACKOFF_MAX_S,
# until a worker of that slot says READY=1 again.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# A worker that was ready and then died unplanned (the OOM killer, a crashing
# plugin, kill -9) is respawned at once: it can start, and its slot is empty.
# Only a slot whose ready workers die more often than this is backed off, and
# never while no other slot serves (an empty site is worse than a busy spawn).
DEATHS_BEFORE_GUARD = 10
DEATH_WINDOW_S = 60.0
# Nothing scheduled: still wake now and then, so a lost signal costs at most this.
IDLE_WAKE_S = 60.0
# --metrics-file is written at least this often, so that ages and memory stay
# fresh while nothing happens; and after a change, at most this soon after
# the last write, so that a busy site (each worker reports every second)
# costs one write a second, not one per event.
METRICS_EVERY_S = 10.0
METRICS_COALESCE_S = 1.0
# After an unexpected exception in the loop, wait at least this long for the
# next event, so that a bug that recurs on every pass cannot become a spin.
LOOP_ERROR_PAUSE_S = 1.0
# A stale mold (MOLD_STALE=reason: trac.ini, plugins/ or the database changed
# under it) is replaced by at most one new mold in this long.  A plugin that
# rewrites trac.ini on every request would otherwise cost a mold's warm-up
# (about a second of CPU) per request; at this bound it costs at most two a
# minute, and forks come from a mold at most this much out of date.
MOLD_REFRESH_MIN_S = 30.0

SIGNALS = {
    # signal: (effect, for --help and the README's signals table)
    signal.SIGUSR1: "from a worker: replace that worker; from anyone else: replace every worker, one at a time",
    signal.SIGHUP: "new code or configuration: start a new mold first (--mold on), then replace every worker, "
                   "one at a time, each make-before-break (a rolling restart), then retire the old mold",
    signal.SIGTTIN: "add a slot (one more worker)",
    signal.SIGTTOU: "remove the last slot (its worker drains and exits)",
    signal.SIGTERM: "graceful stop: SIGHUP every worker, wait --stop-timeout for them to drain, SIGKILL the rest, exit 0",
    signal.SIGINT: "same as SIGTERM",
    signal.SIGQUIT: "immediate stop: SIGKILL every worker, exit 0",
    signal.SIGUSR2: "log what every worker is doing: passed to each worker that said READY=1 by notify, "
                    "which logs every thread's stack with its request; never to the mold",
}
# Faults of the launcher's own code keep their default action: blocking them
# would hide a crash, not prevent it.
FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS,
          signal.SIGABRT}
# Every other signal that can be caught (SIGALRM, SIGPIPE, SIGWINCH, the
# real-time ones ...) is waited for too, and ignored with a log line: by
# default most of them end a process, and a supervisor that a stray kill ends
# takes every worker with it.
WAITED = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP} - FAULTS
IGNORED_EFFECT = "ignored and logged; only SIGKILL ends the launcher unplanned"


def signal_name(number):
    """SIGTERM, SIGRTMIN+6, or the bare number: a name is never required."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number <= signal.SIGRTMAX:
            return "SIGRTMIN+%d" % (number - signal.SIGRTMIN)
        return str(number)


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


def seconds_or_off(text):
    """a number of seconds above 0, or 0 or off for none, e.g. 20"""
    if text in ("0", "off"):
        return None
    return positive_seconds(text)


def size_bytes(text):
    """a size in bytes: digits with an optional K, M or G suffix, e.g. 128M"""
    # Written the same in trac_fcgi.py; tests/test_settings.py feeds both one table.
    match = re.fullmatch(r"([0-9]+)([KMG]?)", text.strip().upper())
    if not match:
        raise ValueError
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def on_off(text):
    """on or off"""
    if text not in ("on", "off"):
        raise ValueError
    return text == "on"


def address(text):
    """an address: unix:/path[:mode], HOST:PORT or [v6]:PORT, e.g. unix:/run/trac/trac.sock"""
    # Written the same in trac_fcgi.py; tests/test_settings.py feeds both one table.
    if text.startswith("unix:"):
        path, mode = text[len("unix:"):], "660"
        match = re.fullmatch(r"(.*):([0-9]+)", path)
        if match:  # a trailing :digits is always the mode, so a bad mode is refused, not taken as a file name
            path, mode = match.groups()
        if not path.startswith("/") or "\0" in path or not re.fullmatch(r"0?[0-7]{3}", mode):
            raise ValueError
        return socket.AF_UNIX, path, int(mode, 8)
    match = (re.fullmatch(r"\[([^\[\]\s]+)\]:([0-9]{1,5})", text)
             or re.fullmatch(r"([^\[\]\s:]+):([0-9]{1,5})", text))
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError
    family = socket.AF_INET6 if text.startswith("[") else socket.AF_INET
    return family, match.group(1), int(match.group(2))


def metrics_path(text):
    """a file name ending in .prom, in a directory that exists and that we may write, e.g. /run/trac/trac.prom"""
    # node_exporter reads only *.prom; the suffix also keeps a typo from
    # replacing some other file by the rename.
    path = os.path.abspath(text)
    directory = os.path.dirname(path)
    if (not text.endswith(".prom") or os.path.isdir(path) or not os.path.isdir(directory)
            or not os.access(directory, os.W_OK | os.X_OK)):
        raise ValueError
    return path


# (flag, environment variable, parser, default, metavar, help)
SETTINGS = [
    ("--workers", "LAUNCHER_WORKERS", positive_int, 1, "N",
     "workers accepting on the socket; SIGTTIN and SIGTTOU change it at run time"),
    ("--ready-timeout", "LAUNCHER_READY_TIMEOUT", positive_seconds, 30.0, "SECONDS",
     "how long a replacement may warm up before READY=1; a worker that never "
     "speaks the notify protocol counts as ready once this passes and it is alive"),
    ("--stop-timeout", "LAUNCHER_STOP_TIMEOUT", positive_seconds, 30.0, "SECONDS",
     "how long SIGTERM waits for workers to drain before SIGKILL"),
    ("--watchdog-timeout", "LAUNCHER_WATCHDOG_TIMEOUT", seconds_or_off, 20.0, "SECONDS",
     "a worker or mold that has sent WATCHDOG=1 and then stays silent this long "
     "is unresponsive: it is replaced, and SIGKILLed once its replacement is ready "
     "(or after as long again without one); 0 or off: no watchdog"),
    ("--memory-reserve", "LAUNCHER_MEMORY_RESERVE", size_bytes, 0, "SIZE",
     "memory (K, M, G) to keep available; when the memory left (MemAvailable, or "
     "the launcher's cgroup limit minus its usage, whichever is less) minus one "
     "worker's RSS would fall below it, a handoff stops the old worker before "
     "starting the new one"),
    ("--mold", "LAUNCHER_MOLD", on_off, "on", "on|off",
     "on: start WORKER_PATH once as a warm mold and fork every worker from it, "
     "in milliseconds and sharing its memory; a worker command that does not "
     "answer as a mold is exec'd for each worker, as with off"),
    ("--bind", "LAUNCHER_BIND", address, None, "ADDR",
     "create the socket: unix:/path[:mode] (mode 0660 by default), HOST:PORT or "
     "[v6]:PORT; without it the socket is fd 0 (spawn-fcgi) or systemd's fd 3"),
    ("--metrics-file", "LAUNCHER_METRICS_FILE", metrics_path, None, "PATH",
     "write metrics here in Prometheus' text format (for node_exporter's textfile "
     "collector and `trac-fcgi-launcher status`), on every change and every %d s" % METRICS_EVERY_S),
]

EPILOG = """\
worker command:
  WORKER_PATH=/abs/path/to/trac-fcgi in the environment, or a command after --.
  It is run directly (no shell) with the socket on fd 0, stdout and stderr
  inherited, every other fd closed, an empty signal mask, default signal
  dispositions, and LAUNCHER_PID and NOTIFY_SOCKET in its environment.

signals:
%s

status:
  trac-fcgi-launcher status [PATH] prints the workers and recycles that the
  --metrics-file PATH (default $LAUNCHER_METRICS_FILE) holds, as a table.

examples:
  spawn-fcgi -n -s /run/trac/trac.sock -M 0660 -u www-data -- \\
      /usr/bin/env WORKER_PATH=/srv/trac/venv/bin/trac-fcgi trac-fcgi-launcher --workers 2
  trac-fcgi-launcher --bind unix:/run/trac/trac.sock --workers 2 -- /srv/trac/venv/bin/trac-fcgi
""" % "\n".join(["  %-8s %s" % (signal.Signals(s).name, effect) for s, effect in SIGNALS.items()]
                + ["  %-8s %s" % ("others", IGNORED_EFFECT)])


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

LOG_NAME, VERBOSITY = "trac-fcgi-launcher", 1  # 0 quiet, 1 normal, 2 verbose


def log(event, level=1, details=(), **facts):
    """One entry: `event=name key=value ...` on one line, then DETAILS (a stack's lines), each indented."""
    if level > VERBOSITY:
        return
    words = ["%s[%d]" % (LOG_NAME, os.getpid()), "event=%s" % event]
    for key, value in facts.items():
        if value is None:
            continue
        value = "%.3f" % value if isinstance(value, float) else str(value)
        # Quoted when it could be misread: a request's path is the client's
        # to choose, and a newline in it must not start a line of its own.
        words.append("%s=%s" % (key, value if value and value.isprintable() and " " not in value else repr(value)))
    # Indented, so that every line that starts with our name is an event.
    text = "".join([" ".join(words) + "\n"] + ["  %s\n" % line for line in details])
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # nobody reads our log any more (a closed pipe): no reason to die


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
        sock.close()
        raise BadInput("cannot bind %s port %d: %s; pick a free address"
                       % (host, port, error.strerror or error))
    sock.listen(socket.SOMAXCONN)
    return sock


def bind_unix(path, mode):
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes, and Python keeps one for a NUL
        raise BadInput("unix:%s is %d bytes long, more than the 107 a unix socket's path may have; "
                       "use a shorter path" % (path, len(os.fsencode(path))))
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a umask that leaves no window in which the file is world-writable.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as error:
        sock.close()
        raise BadInput("cannot bind unix:%s as user %s: %s; %s"
                       % (path, user_name(), error.strerror or error, socket_directory_fix(path, error)))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(socket.SOMAXCONN)
    return sock


def socket_directory_fix(path, error):
    """What to do when a unix socket cannot be made at PATH."""
    directory, user = os.path.dirname(os.path.abspath(path)), user_name()
    if directory in ("/run", "/var/run", "/tmp"):
        # Shared by every service: the socket gets a directory of its own.
        return "bind in a directory of its own that user %s may write, e.g. /run/trac" % user
    if error.errno == errno.ENOENT:
        boot = (" and, as /run is emptied at boot, a tmpfiles.d line 'd %s 0755 %s - -'" % (directory, user)
                if directory.startswith(("/run/", "/var/run/")) else "")
        return "make its directory: mkdir -p %s%s" % (directory, boot)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "let user %s write to %s, e.g. chown %s %s" % (user, directory, user, directory)
    return "pick another path"


def remove_stale_socket(path):
    """Make room for our socket at PATH: only a socket that nobody listens on is removed.

    Anything else there is refused and left as it was: a typo such as
    unix:/srv/trac/trac.ini must not cost that file, and a live socket
    belongs to a server that still answers on it.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there, or nothing we may look at: bind() says which
    if not stat.S_ISSOCK(mode):
        raise BadInput("unix:%s exists and is not a socket, so it was left as it is; "
                       "give the path where the socket should be, e.g. unix:/run/trac/trac.sock" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a listener with a full backlog must not hold us up
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Left by a server that is gone.  A server that binds the same path
        # between this probe and the unlink loses its file: a window of
        # microseconds, against one that lasts until an admin cleans up.
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # listening, with a full backlog
    except OSError as error:
        raise BadInput("unix:%s is a socket, and whether anything listens on it cannot be told (%s); "
                       "remove it if it is stale, or pick another path" % (path, error.strerror))
    finally:
        probe.close()
    raise BadInput("unix:%s: something is listening there already; stop it or pick another path" % path)


def worker_command(command):
    """The worker's absolute path and argv, from the command after -- or else WORKER_PATH.

    Both take the same forms, resolved once at start as a shell would: a
    name with a slash is a path (a relative one from the launcher's working
    directory), a name without one is looked up on PATH.  The absolute path
    is what every spawn runs, and what the log shows.
    """
    if command:
        source, argv = "the command after --", list(command)
    else:
        if not os.environ.get("WORKER_PATH"):
            raise BadInput("no worker to run: set WORKER_PATH=/srv/trac/venv/bin/trac-fcgi "
                           "or give a command after --, e.g. trac-fcgi-launcher -- /srv/trac/venv/bin/trac-fcgi")
        source, argv = "WORKER_PATH", [os.environ["WORKER_PATH"]]
    name, user = argv[0], user_name()
    found = name if "/" in name else shutil.which(name)
    if not found:
        raise BadInput("%s names %r, which is not on PATH: give its full path, e.g. /srv/trac/venv/bin/trac-fcgi"
                       % (source, name))
    path = os.path.abspath(found)
    try:
        mode = os.stat(path).st_mode
    except PermissionError:
        raise BadInput("%s names %s, which user %s cannot reach: a directory on the way is not searchable "
                       "by it; install the worker where %s can read it, e.g. /srv/trac/venv" % (source, path, user, user))
    except OSError:
        raise BadInput("%s names %s, which does not exist: give the full path to trac-fcgi" % (source, path))
    if not stat.S_ISREG(mode) or not os.access(path, os.X_OK):
        raise BadInput("%s names %s, which user %s cannot execute: chmod 755 it, or name the program itself"
                       % (source, path, user))
    interpreter = script_interpreter(path)
    if interpreter and not os.access(interpreter, os.X_OK):
        # Else every spawn would fail with a bare "Permission denied".
        raise BadInput("%s names %s, whose first line names %s, which user %s cannot run: make the virtualenv "
                       "from a Python that user can reach (not one under /root), e.g. /usr/bin/python3 -m venv"
                       % (source, path, interpreter, user))
    argv[0] = path
    return path, argv


def script_interpreter(path):
    """The program a script's #! line names, or None for a binary or an unreadable file."""
    try:
        with open(path, "rb") as script:
            first = script.readline(256)
    except OSError:
        return None
    words = first[2:].split() if first.startswith(b"#!") else []
    return os.fsdecode(words[0]) if words else None


def user_name():
    """Who the kernel checks file access against: the effective user, the one a message must name."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "uid %d" % os.geteuid()


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
# A fork takes milliseconds, but seconds on a machine starved of CPU; a mold
# that has not answered in this long is treated as dead, and the worker is
# exec'd instead (a worker it forks after all is told to go when it says READY=1).
MOLD_REPLY_TIMEOUT_S = 5.0


def can_adopt():
    """Become a child subreaper: adopt orphaned descendants, as init would.

    The mold double-forks each worker so that it ends up our child, reaped
    and signalled like any other.  Without that (not Linux), no mold.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as error:
        reason = str(error)
    log("mold-unavailable", level=0, reason="cannot become a child subreaper: %s" % reason)
    return False


class Mold:
    """The shell's end of one mold process: its pid and the socket pair to it.

    Whether it is ready, failed or retired is the core's to know (MoldProcess).
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

    def fork(self, listener, environ):
        """A new worker's pid, already our child; None if the mold did not answer.

        ENVIRON is what the worker sets in its environment, as an exec'd
        worker would have found it.  A mold that missed one answer could send
        it late, as if it answered the next request: the caller must kill it.
        """
        request = b"\n".join([b"fork"] + [("%s=%s" % item).encode() for item in environ.items()])
        try:
            socket.send_fds(self.channel, [request], [listener.fileno()])
            reply = self.channel.recv(64)
        except OSError:  # socket.timeout included
            return None
        if reply.startswith(b"pid ") and reply[4:].isdigit():
            return int(reply[4:])
        return None

    def retire(self):
        """The mold exits when its end of the pair closes."""
        self.channel.close()


# --------------------------------------------------------------------------
# Metrics: what the core counts.  Each metric is declared once, below; the
# metrics file, `trac-fcgi-launcher status` and the README's table all come
# from METRICS.  The file itself is written by the shell (see "The metrics file").

# (name, type, labels, meaning)
METRICS = [
    ("trac_fcgi_slots", "gauge", "",
     "slots the launcher keeps filled: --workers, changed at run time by SIGTTIN and SIGTTOU"),
    ("trac_fcgi_workers", "gauge", "", "slots whose worker is ready and serving"),
    ("trac_fcgi_worker_info", "gauge", "slot, pid, role",
     "1 for every live worker; role is warming, serving or draining"),
    ("trac_fcgi_worker_resident_bytes", "gauge", "slot, pid", "resident set size (RSS), from /proc/PID/statm"),
    ("trac_fcgi_worker_pss_bytes", "gauge", "slot, pid",
     "proportional set size: its private pages plus its share of the pages it shares with other "
     "processes, from /proc/PID/smaps_rollup; summed over workers, the memory they take together"),
    ("trac_fcgi_worker_private_bytes", "gauge", "slot, pid",
     "pages that no other process maps (Private_Clean + Private_Dirty): what its exit would free"),
    ("trac_fcgi_worker_age_seconds", "gauge", "slot, pid", "seconds since the worker was started"),
    ("trac_fcgi_worker_requests", "gauge", "slot, pid",
     "requests the worker has finished, as it last reported (at most once a second)"),
    ("trac_fcgi_requests_total", "counter", "", "requests finished by every worker, past and present"),
    ("trac_fcgi_slow_requests_total", "counter", "",
     "requests that ran past TRAC_FCGI_SLOW_REQUEST, as every worker past and present reported them (SLOW=n)"),
    ("trac_fcgi_stuck_requests_total", "counter", "",
     "requests that ran past TRAC_FCGI_REQUEST_TIMEOUT, as every worker past and present reported them (STUCK=n)"),
    ("trac_fcgi_recycles_total", "counter", "reason",
     "serving workers that left their slot, by reason (every reason is listed, from 0)"),
    ("trac_fcgi_crashes_total", "counter", "",
     "workers that died unasked: not told to go, and not exiting 0 after STOPPING=1; a replacement "
     "that dies while warming up counts too"),
    ("trac_fcgi_abandoned_requests_total", "counter", "",
     "accepted requests that draining workers gave up at TRAC_FCGI_DRAIN_TIMEOUT"),
    ("trac_fcgi_ready_timeouts_total", "counter", "",
     "replacements killed for staying silent past --ready-timeout (the old worker kept serving)"),
    ("trac_fcgi_stop_then_start_total", "counter", "",
     "handoffs made break-before-make, because --memory-reserve left no room for two workers"),
    ("trac_fcgi_unresponsive_kills_total", "counter", "",
     "workers and molds SIGKILLed for staying silent past --watchdog-timeout after a WATCHDOG=1"),
    ("trac_fcgi_stale_molds_total", "counter", "",
     "molds replaced because what they warmed no longer matched the disk (MOLD_STALE: trac.ini, plugins, upgrade)"),
    ("trac_fcgi_memory_available_bytes", "gauge", "",
     "MemAvailable from /proc/meminfo, when the file was written"),
    ("trac_fcgi_cgroup_memory_limit_bytes", "gauge", "",
     "the memory limit of the launcher's cgroup (v2 memory.max, v1 memory.limit_in_bytes); absent if none"),
    ("trac_fcgi_cgroup_memory_usage_bytes", "gauge", "",
     "the memory its cgroup uses (v2 memory.current, v1 memory.usage_in_bytes); absent if no limit"),
    ("trac_fcgi_handoff_seconds", "histogram", "",
     "from a replacement asked for to the old worker told to go (make before break: mostly the warm-up)"),
    ("trac_fcgi_drain_seconds", "histogram", "", "from a worker told to go to its exit"),
    ("trac_fcgi_listen_backlog", "gauge", "",
     "connections waiting in the listen backlog for a worker to accept them, when the file was written"),
    ("trac_fcgi_listen_backlog_limit", "gauge", "",
     "connections the backlog holds at most (listen()'s backlog, capped by net.core.somaxconn)"),
]

# Why a serving worker left its slot: the values of trac_fcgi_recycles_total's
# reason label.  Workers name the first five in RECYCLE=reason notify lines.
RECYCLE_REASONS = {
    "requests": "it reached TRAC_FCGI_MAX_REQUESTS and asked for its replacement",
    "rss": "it reached its soft memory mark (TRAC_FCGI_SOFT_RSS) and asked for its replacement",
    "age": "it reached TRAC_FCGI_MAX_LIFETIME and asked for its replacement",
    "max_rss": "it reached TRAC_FCGI_MAX_RSS before its replacement was ready, and stopped accepting at once",
    "stuck": "a request of its ran past TRAC_FCGI_REQUEST_TIMEOUT, and it asked for its replacement",
    "unresponsive": "it sent no WATCHDOG=1 for --watchdog-timeout: replaced, and SIGKILLed as it cannot drain",
    "asked": "it sent SIGUSR1 without saying why (a worker other than trac_fcgi.py)",
    "rolling": "a rolling restart: SIGHUP, or SIGUSR1 from a process that is not a worker",
    "slot-removed": "SIGTTOU removed its slot",
    "signal": "someone other than the launcher sent the worker SIGHUP, SIGTERM or SIGINT",
    "exit": "it said STOPPING=1 and exited 0 of its own accord, for no reason above",
    "crash": "it died unasked (see trac_fcgi_crashes_total)",
}

# A handoff is mostly a warm-up (about 0.5 s for Trac on an idle machine); a
# drain is as long as the slowest request in flight.
HISTOGRAM_BUCKETS = {
    "trac_fcgi_handoff_seconds": (0.25, 0.5, 1, 2, 5, 10, 30, 60),
    "trac_fcgi_drain_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
}




class Histogram:
    """A Prometheus histogram: counts per upper bound, their sum and their number."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * len(bounds)   # not cumulative; render_metrics() adds them up
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1


class Tally:
    """What the file counts over the launcher's whole life.

    Per-worker figures live on each Worker (what it last reported) and are
    read fresh for every write; only what outlives the workers is kept here.
    """

    def __init__(self):
        self.recycles = dict.fromkeys(RECYCLE_REASONS, 0)
        self.crashes = 0
        self.abandoned = 0
        self.ready_timeouts = 0
        self.stop_then_start = 0
        self.unresponsive_kills = 0
        self.stale_molds = 0
        self.requests_of_past_workers = 0
        self.slow_of_past_workers = 0
        self.stuck_of_past_workers = 0
        self.histograms = {name: Histogram(bounds) for name, bounds in HISTOGRAM_BUCKETS.items()}

    def recycled(self, reason):
        self.recycles[reason if reason in self.recycles else "asked"] += 1

    def observe(self, name, seconds):
        self.histograms[name].observe(seconds)


# --------------------------------------------------------------------------
# The core: every decision, over plain data, with the time passed in.
#
# Events go in as method calls (spawned, notified, exited, signalled), each
# with the time `now`.  Decisions come out as actions in `actions`, which the
# shell below carries out.  tick() does whatever is due and returns when
# something next will be: the code that decides what is due also decides when
# to wake.  Nothing here reads a clock, a file or a socket, so
# tests/test_core.py drives it through hours of signals in milliseconds.

SPAWN, SIGNAL, SYSTEMD = "spawn", "signal", "systemd"
START_MOLD, RETIRE_MOLD, STRAY = "start-mold", "retire-mold", "stray"


def silent(process, watchdog_timeout, now):
    """Whether PROCESS (a Worker or a MoldProcess) has broken its WATCHDOG=1 promise by NOW.

    One that never sent WATCHDOG=1 (a stock trac.fcgi) made no promise.
    """
    return watchdog_timeout is not None and process.heard is not None and now - process.heard >= watchdog_timeout


class Worker:
    """One worker process.  Its role is the whole of its handoff state:

    warming  started as a replacement for its slot's serving worker
    serving  the slot's accepting worker (or about to be, before READY=1)
    draining told to go (SIGHUP); its exit is expected, never a crash
    """

    def __init__(self, pid, slot, role, now):
        self.pid, self.slot, self.role = pid, slot, role
        self.started = now
        self.ready = False
        self.told_to_go = None      # when it was sent SIGHUP
        self.killed = False         # sent SIGKILL, which is never sent twice
        self.said_stopping = False  # sent STOPPING=1: it exits of its own accord
        self.memory = (None, None)  # (PSS, private) when told to go: a dead process has none
        self.requests = 0           # finished requests, as it last reported (REQUESTS=n)
        self.slow = self.stuck = 0  # its slow and stuck requests so far (SLOW=n, STUCK=n)
        self.recycle_reason = None  # why it leaves its slot, once known: a RECYCLE_REASONS key
        self.speaks_notify = False  # said READY=1 by notify: ours, so SIGUSR2 logs its stacks
        self.heard = None           # its last WATCHDOG=1; None: never sent one, the watchdog leaves it be
        self.unresponsive = None    # when the watchdog found it silent, until it speaks again

    def age(self, now):
        return now - self.started


class MoldProcess:
    """One mold: started until it says MOLD=1, then ready to be asked for workers."""

    def __init__(self, pid, now):
        self.pid, self.started = pid, now
        self.ready = False
        self.heard = None   # its last WATCHDOG=1, as a worker's
        self.stale = None   # MOLD_STALE's reason: what it warmed no longer matches the disk
        self.refresh_deferred = False  # its refresh waits for MOLD_REFRESH_MIN_S, as logged once


class Slot:
    """A place for one serving worker.  Which workers fill it is read off the
    workers themselves (Worker.slot and Worker.role), never stored here too."""

    def __init__(self, number):
        self.number = number
        self.retired = False        # removed by SIGTTOU; gone once its workers are
        self.handoff_asked = None   # when its replacement was asked for, until the old worker is told to go
        self.crashes = 0            # workers in a row that died before READY=1
        self.not_before = 0.0       # backoff: no spawn for this slot before then
        self.deaths = []            # when its ready workers died unplanned, within DEATH_WINDOW_S


class Molds:
    """The mold's life: every mold process, which one workers are forked from, and when to start another.

    Pure, as LauncherCore is: events come in with the time, actions go out
    through ACT, and tend() does what is due and returns its deadlines.  At
    most three molds live at once, each for a reason of its own: `current`,
    the one workers are forked from once it is ready; `retiring`, the one a
    SIGHUP replaced, kept until the rolling restart from the new one is done;
    and `next`, warming to replace a stale `current`, which forks meanwhile.

    Workers are forked from `current` while it is ready and exec'd otherwise,
    so no slot waits on a mold, but at start for the first one's answer.  A
    process started as the mold that exits, says READY=1 or stays silent past
    --ready-timeout without ever having said MOLD=1 does not speak the mold
    protocol (a stock trac.fcgi): it is killed (it never had the socket, so
    it served nobody) and every worker is exec'd until a SIGHUP, new code,
    tries again.  A mold that did say MOLD=1 and then dies, does not answer
    or goes silent past --watchdog-timeout is restarted with a backoff.

    A mold that says MOLD_STALE=reason (trac.ini, plugins/ or the database
    changed under what it warmed) is refreshed make-before-break, at most
    once per MOLD_REFRESH_MIN_S.  Serving workers reload their environment
    themselves; only new forks need a fresh mold, so this is no rolling restart.
    """

    def __init__(self, enabled, ready_timeout, watchdog_timeout, log, act, tally, answered):
        self.enabled = enabled                # --mold on, and we can adopt forked workers
        self.ready_timeout, self.watchdog_timeout = ready_timeout, watchdog_timeout
        self.log, self.act, self.tally = log, act, tally
        self.answered_hook = answered         # called with a SIGHUP's reason once its new mold answered
        self.current = self.retiring = self.next = None
        self.pids = set()                     # every mold process not reaped yet
        self.killed = set()                   # SIGKILL is sent once
        self.unavailable = not enabled        # the worker command does not answer as a mold
        self.crashes = 0
        self.not_before = 0.0
        self.slots_wait = enabled             # at start, slots wait for the first mold's answer
        self.restart_after = None             # a SIGHUP's rolling restart, waiting for its new mold
        self.refreshed = None                 # when a stale mold last had a new one started
        self.stopping = False

    # -- what the state says ----------------------------------------------------

    def fork_from(self):
        """The pid of the mold to ask for a worker, or None: exec it."""
        ready = self.current is not None and self.current.ready and not self.stopping
        return self.current.pid if ready else None

    def owns(self, pid):
        return pid in self.pids

    def speaking(self, pid):
        """The mold whose notify messages count, if PID is one: the current one or the next."""
        return next((m for m in (self.current, self.next) if m is not None and m.pid == pid), None)

    # -- events -------------------------------------------------------------------

    def started(self, pid, now):
        # A mold is started only when there is none, or to refresh a stale one.
        if self.current is None:
            self.current = MoldProcess(pid, now)
        else:
            self.next = MoldProcess(pid, now)
        self.pids.add(pid)
        self.log("mold-start", pid=pid)

    def start_failed(self, error, now):
        self.log("mold-spawn-failed", level=0, error=error)
        if self.current is not None:
            return self.log("mold-refresh-failed", level=0, pid=self.current.pid, reason="cannot start: %s" % error)
        self.gone(None, "cannot start: %s" % error, True, now)

    def said(self, mold, fields, now):
        if fields.get("WATCHDOG") == "1":
            mold.heard = now
        if fields.get("MOLD") == "1" and not mold.ready:
            mold.ready = True
            self.log("mold-ready", pid=mold.pid, ready_s=now - mold.started)
            if mold is self.next:
                self.log("mold-refreshed", pid=mold.pid, old=self.current.pid, reason=self.current.stale)
                self.act((RETIRE_MOLD, self.current.pid))
                self.current, self.next = mold, None
            else:
                self.answered(now)
        elif fields.get("READY") == "1" and not mold.ready:
            self.gone(mold, "said READY=1, not MOLD=1", True, now)
        if fields.get("MOLD_STALE") and mold is self.current and mold.ready and mold.stale is None:
            mold.stale = fields["MOLD_STALE"]
            self.log("mold-stale", pid=mold.pid, reason=mold.stale)

    def did_not_answer(self, now):
        self.gone(self.current, "no answer to a fork request", False, now)

    def exited(self, pid, how, now):
        self.pids.discard(pid)
        self.killed.discard(pid)
        self.log("mold-exit", pid=pid, **how)
        for mold in (self.current, self.next):
            if mold is not None and pid == mold.pid:
                self.gone(mold, "exited", not mold.ready, now)

    # -- policy ---------------------------------------------------------------------

    def hup(self, now):
        """SIGHUP: a new mold first, if there are molds; True if the rolling restart waits for it."""
        if not self.enabled or self.stopping or self.restart_after:
            return False
        # New code or configuration: a new mold first (tend() starts it),
        # then every worker from it, make-before-break; the old mold goes last.
        self.log("new-mold", reason="SIGHUP", old=self.current and self.current.pid)
        # A mold warming to replace a stale one may have imported the old code.
        self.drop_next("SIGHUP")
        self.retiring, self.current = self.current, None
        self.unavailable, self.not_before = False, 0.0
        self.restart_after = "SIGHUP"
        return True

    def rolling_done(self):
        if self.retiring is not None:
            self.act((RETIRE_MOLD, self.retiring.pid))
            self.retiring = None

    def stop(self):
        """A graceful stop: every mold is retired (it exits when its socket pair closes)."""
        self.stopping = True
        for mold in (self.current, self.retiring, self.next):
            if mold is not None:
                self.act((RETIRE_MOLD, mold.pid))
        self.current = self.retiring = self.next = None

    def kill_all(self, reason):
        self.stopping = True
        for pid in sorted(self.pids - self.killed):
            self.killed.add(pid)
            self.log("mold-kill", pid=pid, reason=reason)
            self.act((SIGNAL, pid, signal.SIGKILL))

    def drop_next(self, reason):
        """Give up on the mold warming to replace a stale one: the stale one goes on forking."""
        mold, self.next = self.next, None
        if mold is not None:
            self.log("mold-refresh-failed", level=0, pid=mold.pid, reason=reason)
            self.end(mold)

    def end(self, mold):
        self.act((RETIRE_MOLD, mold.pid))
        if mold.pid in self.pids and mold.pid not in self.killed:
            self.killed.add(mold.pid)
            self.act((SIGNAL, mold.pid, signal.SIGKILL))

    def gone(self, mold, reason, unavailable, now):
        """MOLD is no more use (None: it never started); UNAVAILABLE: it never answered as a mold."""
        if mold is not None and mold is self.next:
            # Its stale predecessor forks until the next try (see refresh()).
            return self.drop_next(reason)
        if mold is not None:
            if now - mold.started >= DEATH_WINDOW_S:
                self.crashes = 0
            self.end(mold)
        # A mold warming to refresh this one takes its place, ready or not.
        self.current, self.next = self.next, None
        if unavailable:
            self.unavailable = True
            self.log("mold-unavailable", level=0, pid=mold and mold.pid, reason=reason,
                     hint="workers are exec'd; a worker command that is trac-fcgi answers as a mold")
        elif not self.stopping:
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** self.crashes)
            self.crashes += 1
            self.not_before = now + delay
            self.log("mold-failed", level=0, pid=mold and mold.pid, reason=reason, crashes=self.crashes,
                     delay_s=delay)
        self.answered(now)

    def answered(self, now):
        """The mold that slots or a SIGHUP waited for is ready, or there is none: go on."""
        self.slots_wait = False
        if self.restart_after:
            reason, self.restart_after = self.restart_after, None
            self.answered_hook(reason, now)

    # -- time -------------------------------------------------------------------------

    def tend(self, now):
        """Start a mold when one is due, give up on a silent one, refresh a stale one; return the deadlines."""
        deadlines = []
        if self.next is not None and not self.next.ready:
            deadline = self.next.started + self.ready_timeout
            if now < deadline:
                deadlines.append(deadline)
            else:
                self.drop_next("silent past --ready-timeout")
        current = self.current
        if current is not None and current.ready and silent(current, self.watchdog_timeout, now):
            self.log("unresponsive", level=0, pid=current.pid, role="mold", silent_s=now - current.heard)
            self.tally.unresponsive_kills += 1
            self.gone(current, "unresponsive", False, now)
        elif current is not None and current.ready and self.watchdog_timeout and current.heard is not None:
            deadlines.append(current.heard + self.watchdog_timeout)
        if self.current is not None and not self.current.ready:
            deadline = self.current.started + self.ready_timeout
            if now < deadline:
                return deadlines + [deadline]
            self.gone(self.current, "silent past --ready-timeout", True, now)
        if self.current is None and not self.unavailable and not self.stopping:
            if now < self.not_before:
                return deadlines + [self.not_before]
            self.act((START_MOLD,))
            return deadlines
        return deadlines + self.refresh(now)

    def refresh(self, now):
        """Start a new mold for a stale one, at most one per MOLD_REFRESH_MIN_S; return the deadlines."""
        mold = self.current
        if mold is None or mold.stale is None or self.next is not None or self.restart_after or self.stopping:
            return []
        due = -float("inf") if self.refreshed is None else self.refreshed + MOLD_REFRESH_MIN_S
        if now < due:
            if not mold.refresh_deferred:
                mold.refresh_deferred = True
                self.log("mold-refresh-deferred", pid=mold.pid, reason=mold.stale, wait_s=due - now)
            return [due]
        self.refreshed = now
        self.tally.stale_molds += 1
        self.log("new-mold", reason=mold.stale, old=mold.pid)
        self.act((START_MOLD,))
        return []


class LauncherCore:
    def __init__(self, slots, ready_timeout, stop_timeout, log=log, memory_shortage=lambda pid: None,
                 mold=False, memory_of=lambda pid: (None, None), watchdog_timeout=None):
        self.slots = [Slot(number) for number in range(slots)]
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.watchdog_timeout = watchdog_timeout  # None: no watchdog
        self.log = log
        # None if a replacement fits in memory beside worker PID, else the facts of why not.
        self.memory_shortage = memory_shortage
        self.memory_of = memory_of   # (PSS, private) of a live process, for its exit line
        self.workers = {}            # pid -> Worker, every child not yet reaped
        self.actions = []            # (SPAWN, slot, role), (SIGNAL, pid, signum), (SYSTEMD, lines)
        self.rolling = False         # a rolling restart is under way (systemd RELOADING=1)
        self.stopping_since = None
        self.workers_speak_notify = False
        self.told_systemd_ready = False
        self.status = None
        self.tally = Tally()         # what --metrics-file counts over the launcher's life
        self.last_tick = None        # when tick() last ran: the watchdog's measure of our own absence
        self.molds = Molds(mold, ready_timeout, watchdog_timeout, log, self.act, self.tally,
                           answered=self.rolling_restart)

    def act(self, action):
        self.actions.append(action)  # looked up on each call: the shell takes the list and leaves a new one

    # -- what the state says, derived where it is needed --------------------

    def worker_of(self, slot, role):
        return next((w for w in self.workers.values() if w.slot is slot and w.role == role), None)

    def serves(self, slot):
        """Whether SLOT has a serving worker that has said READY=1."""
        worker = self.worker_of(slot, "serving")
        return worker is not None and worker.ready

    def vacated(self, slot):
        """Whether SLOT's worker was told to go with no successor (stop-then-start, a kill): it waits for its exit."""
        return (self.worker_of(slot, "draining") is not None and self.worker_of(slot, "serving") is None
                and self.worker_of(slot, "warming") is None)

    def ready_workers(self):
        return sum(1 for slot in self.slots if self.serves(slot))

    @property
    def finished(self):
        return self.stopping_since is not None and not self.workers and not self.molds.pids

    # -- events ---------------------------------------------------------------

    def signalled(self, signum, sender, now):
        """The whole policy for each signal, one line each."""
        policy = {
            signal.SIGUSR1: self.on_usr1,
            signal.SIGHUP: self.on_hup,
            signal.SIGTTIN: self.on_ttin,
            signal.SIGTTOU: self.on_ttou,
            signal.SIGTERM: self.on_term,
            signal.SIGINT: self.on_term,
            signal.SIGQUIT: self.on_quit,
            signal.SIGUSR2: self.on_usr2,
        }.get(signum)
        if policy is None:
            return self.log("ignored", signal=signal_name(signum), sender=sender)
        policy(sender, now)

    def spawned(self, slot, pid, role, now, how=None):
        """HOW: exec'd, or forked from the mold."""
        self.workers[pid] = Worker(pid, slot, role, now)
        self.log("spawn", slot=slot.number, pid=pid, role=role, how=how)

    def spawn_failed(self, slot, error, now):
        self.log("spawn-failed", level=0, slot=slot.number, error=error)
        self.back_off(slot, now)

    def notified(self, pid, fields, now):
        mold = self.molds.speaking(pid)
        if mold is not None:
            return self.molds.said(mold, fields, now)
        worker = self.workers.get(pid)
        if worker is None:
            if fields.get("READY") == "1" and self.molds.enabled:
                # A worker forked by a mold we gave up on while it forked: it
                # is our child, and would serve outside any slot.
                self.actions.append((STRAY, pid))
            return  # else not one of ours: the kernel vouches for the pid
        if fields.get("WATCHDOG") == "1":
            self.heard_from(worker, now)
        if fields.get("READY") == "1":
            self.workers_speak_notify = worker.speaks_notify = True
            self.became_ready(worker, "notify", now)
        if fields.get("STOPPING") == "1":
            worker.said_stopping = True
        # For the metrics: a worker's own word on its counts, on what it gave
        # up when it drained, and on why it asked to go (the latest wins).
        if fields.get("REQUESTS", "").isdigit():
            worker.requests = int(fields["REQUESTS"])
        if fields.get("SLOW", "").isdigit():
            worker.slow = int(fields["SLOW"])
        if fields.get("STUCK", "").isdigit():
            worker.stuck = int(fields["STUCK"])
        if fields.get("ABANDONED", "").isdigit():
            self.tally.abandoned += int(fields["ABANDONED"])
        if "RECYCLE" in fields:
            worker.recycle_reason = fields["RECYCLE"] if fields["RECYCLE"] in RECYCLE_REASONS else "asked"

    def exited(self, pid, code, now):
        """CODE is the exit status, or minus the signal number (os.waitstatus_to_exitcode)."""
        how = {"status": code} if code >= 0 else {"signal": signal_name(-code)}
        if self.molds.owns(pid):
            return self.molds.exited(pid, how, now)
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        slot = worker.slot
        drain_s = None if worker.told_to_go is None else now - worker.told_to_go
        pss, private = worker.memory
        self.log("exit", slot=slot.number, pid=pid, role=worker.role, age_s=worker.age(now), drain_s=drain_s,
                 pss=pss, private=private, **how)
        planned = worker.told_to_go is not None or (worker.said_stopping and code == 0)
        self.tally.requests_of_past_workers += worker.requests
        self.tally.slow_of_past_workers += worker.slow
        self.tally.stuck_of_past_workers += worker.stuck
        if drain_s is not None:
            self.tally.observe("trac_fcgi_drain_seconds", drain_s)
        if not planned and self.stopping_since is None:
            self.tally.crashes += 1
        if worker.role == "serving":
            self.left_service(worker, None, reason=(worker.recycle_reason or "exit") if planned else "crash")
            # Nothing is left to hand off; a replacement already warming takes over the slot.
            slot.handoff_asked = None
            replacement = self.worker_of(slot, "warming")
            if replacement is not None:
                replacement.role = "serving"
        if planned or slot.retired or self.stopping_since is not None:
            return
        if not worker.ready:
            self.back_off(slot, now)  # it cannot start: a crash, whatever its role
        elif worker.role == "serving":
            self.died_serving(slot, now)

    # -- one method per signal ------------------------------------------------

    def on_usr1(self, sender, now):
        worker = self.workers.get(sender)
        if worker is None:
            self.rolling_restart("SIGUSR1 from pid %s" % sender, now)
        elif worker.role == "serving":
            # Standard signals coalesce, so two workers asking at once may
            # reach us as one: workers repeat the request until answered.
            self.ask_for_handoff(worker.slot, "worker asked", now)

    def on_hup(self, sender, now):
        # With molds, the rolling restart waits for a new one (Molds.hup).
        if self.stopping_since is not None or self.rolling or not self.molds.hup(now):
            self.rolling_restart("SIGHUP", now)

    def on_ttin(self, sender, now):
        if self.stopping_since is None:
            slot = Slot(max([s.number for s in self.slots], default=-1) + 1)
            self.slots.append(slot)
            self.log("slot-added", slot=slot.number, workers=len(self.slots))

    def on_ttou(self, sender, now):
        if self.stopping_since is None and len(self.slots) > 1:
            slot = self.slots.pop()
            slot.retired = True
            self.log("slot-removed", slot=slot.number, workers=len(self.slots))
            for worker in [w for w in self.workers.values() if w.slot is slot]:
                worker.recycle_reason = worker.recycle_reason or "slot-removed"
                self.tell_to_go(worker, "slot removed", now)

    def on_term(self, sender, now):
        if self.stopping_since is None:
            self.stopping_since = now
            self.actions.append((SYSTEMD, ("STOPPING=1",)))
            self.log("stopping", workers=len(self.workers), timeout_s=self.stop_timeout)
            for worker in list(self.workers.values()):
                self.tell_to_go(worker, "launcher stopping", now)
            self.molds.stop()

    def on_quit(self, sender, now):
        if self.stopping_since is None:
            self.stopping_since = now
            self.actions.append((SYSTEMD, ("STOPPING=1",)))
        for worker in list(self.workers.values()):
            self.kill(worker, "SIGQUIT")
        self.molds.kill_all("SIGQUIT")

    def on_usr2(self, sender, now):
        # Only ours handle it: a stock trac.fcgi would die of SIGUSR2, and the
        # mold, which serves nobody, has no requests to show.
        asked = sorted(pid for pid, worker in self.workers.items() if worker.speaks_notify and not worker.killed)
        self.log("stacks-asked", workers=len(asked))
        for pid in asked:
            self.actions.append((SIGNAL, pid, signal.SIGUSR2))

    # -- the handoff ------------------------------------------------------------

    def rolling_restart(self, reason, now):
        if self.stopping_since is not None:
            return
        if self.rolling:
            return self.log("coalesced", level=2, reason=reason)  # a burst costs nothing
        self.log("rolling-restart", reason=reason, workers=len(self.slots))
        self.rolling = True
        self.actions.append((SYSTEMD, ("RELOADING=1", "STATUS=rolling restart")))
        for slot in self.slots:
            self.ask_for_handoff(slot, reason, now)
        for worker in self.workers.values():
            if worker.role == "serving":
                worker.recycle_reason = worker.recycle_reason or "rolling"

    def ask_for_handoff(self, slot, reason, now):
        # Coalesced: a slot already waiting or warming is not asked again.
        serving = self.worker_of(slot, "serving")
        if self.stopping_since is None and slot.handoff_asked is None and serving is not None:
            self.log("replace", slot=slot.number, pid=serving.pid, reason=reason)
            slot.handoff_asked = now

    def start_next_handoff(self, now):
        """Start at most one replacement at a time, across all slots; return the deadlines it waits on.

        A slot whose previous worker still drains waits for its exit, so no
        slot ever has more than two processes, whatever the signals.  Only a
        wait on the clock (backoff) is a deadline: a wait on a warming or a
        draining worker ends with an event (READY=1, an exit), and the loop
        sleeps until then instead of spinning.
        """
        # One start at a time: a replacement warming up, a stop-then-start
        # whose old worker still drains, a worker just asked for or one not
        # ready yet.  A worker still starting has not grown to its size, so
        # the memory left beside it would be misread, and two handoffs at
        # once could both find room for one.
        if (any(not w.ready and w.role != "draining" for w in self.workers.values())
                or any(self.vacated(slot) for slot in self.slots)
                or any(action[0] == SPAWN for action in self.actions)):  # a start asked for in this pass
            return []
        deadlines = []
        for slot in sorted((s for s in self.slots if s.handoff_asked is not None), key=lambda s: s.handoff_asked):
            if any(w.slot is slot and w.role == "draining" for w in self.workers.values()):
                continue
            if slot.not_before > now:
                deadlines.append(slot.not_before)
                continue
            serving = self.worker_of(slot, "serving")
            shortage = self.memory_shortage(serving.pid)
            if shortage:
                # Not enough memory for two workers side by side: break before
                # make.  Its replacement starts once it has exited (tick()),
                # not while its memory is still in use: under a cgroup's limit
                # the two would meet the OOM killer, which picks whom it likes.
                self.log("stop-then-start", slot=slot.number, pid=serving.pid, **shortage)
                self.tally.stop_then_start += 1
                asked, slot.handoff_asked = slot.handoff_asked, None
                self.tell_to_go(serving, "memory headroom", now, handoff_s=now - asked)
            else:
                self.actions.append((SPAWN, slot, "warming"))
            return []
        return deadlines

    def became_ready(self, worker, how, now):
        if worker.ready:
            return
        worker.ready = True
        slot = worker.slot
        slot.crashes = 0
        self.log("ready", slot=slot.number, pid=worker.pid, ready_s=worker.age(now), by=how)
        if worker.role == "warming":
            old = self.worker_of(slot, "serving")
            worker.role = "serving"
            if old is not None:
                asked, slot.handoff_asked = slot.handoff_asked, None
                self.tell_to_go(old, "replaced by pid %d" % worker.pid, now,
                                handoff_s=None if asked is None else now - asked)

    def tell_to_go(self, worker, reason, now, handoff_s=None):
        if worker.told_to_go is None:
            if worker.role == "serving":
                self.left_service(worker, handoff_s)
            worker.told_to_go = now
            worker.role = "draining"
            worker.memory = self.memory_of(worker.pid)
            if silent(worker, self.watchdog_timeout, now):
                # Its loop does not run, so a SIGHUP would wait for a handler
                # that never comes: it cannot drain, and only SIGKILL frees its slot.
                return self.kill_unresponsive(worker, "unresponsive; %s" % reason)
            self.log("hup", slot=worker.slot.number, pid=worker.pid, reason=reason, handoff_s=handoff_s)
            self.actions.append((SIGNAL, worker.pid, signal.SIGHUP))

    def left_service(self, worker, handoff_s, reason=None):
        """A serving worker stops serving, told to go or by dying: count why, and its handoff's time.

        A launcher that is stopping replaces nobody: that is no recycle.
        """
        if self.stopping_since is None:
            self.tally.recycled(reason or worker.recycle_reason or "asked")
            if handoff_s is not None:
                self.tally.observe("trac_fcgi_handoff_seconds", handoff_s)

    def kill(self, worker, reason):
        if not worker.killed:
            worker.killed = True
            self.log("kill", slot=worker.slot.number, pid=worker.pid, reason=reason)
            self.actions.append((SIGNAL, worker.pid, signal.SIGKILL))

    # -- the watchdog -------------------------------------------------------------
    #
    # A worker that has sent WATCHDOG=1 promises one every quarter of
    # --watchdog-timeout (systemd's contract); one that never did (a stock
    # trac.fcgi) is left be.  Silent past the timeout, it is unresponsive:
    # frozen (SIGSTOP), deadlocked, or held by a C call that keeps the GIL.
    # Its slot is replaced make-before-break, and the silent one is SIGKILLed
    # once the replacement is ready; if none is ready after as long again
    # (its replacement keeps failing), it is SIGKILLed anyway so that the slot
    # can respawn.  Requests it held are lost either way: it was not serving them.

    def heard_from(self, worker, now):
        worker.heard = now
        if worker.unresponsive is not None:
            # Its replacement, asked for already, goes on; it drains as any worker would.
            self.log("responsive", slot=worker.slot.number, pid=worker.pid, silent_s=now - worker.unresponsive)
            worker.unresponsive = None

    def forgive_if_away(self, now):
        """After an absence of our own, start every watched process's count anew; return the deadlines.

        A launcher that was suspended, stopped or starved of CPU comes back to
        find everyone "silent" and datagrams still queued that it has not read:
        their silence is ours.  While anything is watched the loop wakes every
        quarter of the timeout (datagrams wake it that often anyway), so a gap
        of half the timeout between two passes can only be our own.
        """
        last, self.last_tick = self.last_tick, now
        if self.watchdog_timeout is None:
            return []
        watched = [p for p in list(self.workers.values()) + [self.molds.current] if p is not None and p.heard]
        if last is not None and now - last > self.watchdog_timeout / 2 and watched:
            self.log("watchdog-restarted", level=0, away_s=now - last, watched=len(watched),
                     reason="the launcher itself did not run: suspended, stopped or starved")
            for process in watched:
                process.heard = max(process.heard, now)
        return [now + self.watchdog_timeout / 4] if watched else []

    def watch(self, now):
        """Find the workers that went silent, and act on them; return the deadlines."""
        if self.watchdog_timeout is None:
            return []
        deadlines = []
        for worker in list(self.workers.values()):
            if worker.heard is None or worker.killed:
                continue
            if not silent(worker, self.watchdog_timeout, now):
                deadlines.append(worker.heard + self.watchdog_timeout)
                continue
            if worker.unresponsive is None:
                worker.unresponsive = now
                self.log("unresponsive", level=0, slot=worker.slot.number, pid=worker.pid, role=worker.role,
                         silent_s=now - worker.heard)
                if worker.role != "serving":
                    # Draining, or a replacement that went quiet: nothing waits for it.
                    self.tell_to_go(worker, "unresponsive", now)
                    self.kill_unresponsive(worker, "unresponsive while %s" % worker.role)
                    continue
                worker.recycle_reason = "unresponsive"
                self.ask_for_handoff(worker.slot, "unresponsive", now)
            if worker.role == "serving":
                give_up = worker.unresponsive + self.watchdog_timeout
                if now < give_up:
                    deadlines.append(give_up)
                    continue
                # No replacement got ready in as long again: free the slot, so it can respawn.
                slot = worker.slot
                asked, slot.handoff_asked = slot.handoff_asked, None
                self.tell_to_go(worker, "no replacement ready within --watchdog-timeout", now,
                                handoff_s=None if asked is None else now - asked)
        return deadlines

    def kill_unresponsive(self, worker, reason):
        if not worker.killed:
            self.tally.unresponsive_kills += 1
            self.kill(worker, reason)

    # -- births and deaths --------------------------------------------------------

    def died_serving(self, slot, now):
        """A ready worker died unplanned: respawn at once, unless its slot's workers keep dying."""
        slot.deaths = [t for t in slot.deaths if now - t < DEATH_WINDOW_S] + [now]
        others_serve = any(self.serves(other) for other in self.slots if other is not slot)
        if len(slot.deaths) > DEATHS_BEFORE_GUARD and others_serve:
            self.back_off(slot, now)

    def back_off(self, slot, now):
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** slot.crashes)
        slot.crashes += 1
        slot.not_before = now + delay
        self.log("backoff", level=0, slot=slot.number, crashes=slot.crashes, delay_s=delay)

    # -- time ---------------------------------------------------------------------

    def tick(self, now):
        """Do whatever is due at NOW; return when something next will be.

        The shell carries out `actions` before it calls tick() again.
        """
        wake = [now + IDLE_WAKE_S]
        if self.stopping_since is not None:
            deadline = self.stopping_since + self.stop_timeout
            if now < deadline:
                return min(deadline, now + IDLE_WAKE_S)
            for worker in list(self.workers.values()):
                self.kill(worker, "stop timeout")
            self.molds.kill_all("stop timeout")
            return min(wake)
        wake += self.forgive_if_away(now)
        wake += self.molds.tend(now)
        for slot in self.slots:
            if self.worker_of(slot, "serving") is None and self.worker_of(slot, "warming") is None:
                if self.molds.slots_wait:
                    pass  # Molds.tend() wakes us when the mold is due to have answered
                elif self.vacated(slot):
                    pass  # its exit wakes us
                elif slot.not_before <= now:
                    self.actions.append((SPAWN, slot, "serving"))
                else:
                    wake.append(slot.not_before)
        for worker in list(self.workers.values()):
            if not worker.ready and worker.role != "draining":
                deadline = worker.started + self.ready_timeout
                if now >= deadline:
                    self.ready_timed_out(worker, now)
                else:
                    wake.append(deadline)
        wake += self.watch(now)
        wake += self.start_next_handoff(now)
        if self.rolling and all(slot.handoff_asked is None for slot in self.slots):
            self.rolling = False
            self.told_systemd_ready = False
            self.log("rolling-restart-done", workers=len(self.slots))
            self.molds.rolling_done()
        self.report_status()
        return min(wake)

    def ready_timed_out(self, worker, now):
        if self.workers_speak_notify and worker.role == "warming":
            # Earlier workers said READY=1, so this one's silence means trouble;
            # its slot stays asked for and is retried after the backoff.
            self.log("ready-timeout", level=0, slot=worker.slot.number, pid=worker.pid)
            self.tally.ready_timeouts += 1
            self.tell_to_go(worker, "silent past --ready-timeout", now)
            self.kill(worker, "silent past --ready-timeout")
            self.back_off(worker.slot, now)
        else:
            # A stock trac.fcgi never speaks the notify protocol: alive is ready.
            self.became_ready(worker, "timeout", now)

    def report_status(self):
        ready = self.ready_workers()
        roles = [w.role for w in self.workers.values()]
        status = "%d of %d workers ready, %d warming, %d draining" % (
            ready, len(self.slots), roles.count("warming"), roles.count("draining"))
        if status != self.status:
            self.status = status
            self.actions.append((SYSTEMD, ("STATUS=" + status,)))
        if ready == len(self.slots) and not self.rolling and not self.told_systemd_ready:
            self.told_systemd_ready = True
            self.log("all-ready", workers=ready)
            self.actions.append((SYSTEMD, ("READY=1",)))


# --------------------------------------------------------------------------
# The shell: signals and datagrams in, processes and signals out.

class Launcher:
    def __init__(self, settings, listener, path, argv):
        self.settings = settings
        self.listener = listener
        self.path, self.argv = path, argv
        self.core = LauncherCore(settings.workers, settings.ready_timeout, settings.stop_timeout,
                                 memory_shortage=self.memory_shortage, mold=settings.mold and can_adopt(),
                                 memory_of=shared_memory, watchdog_timeout=settings.watchdog_timeout)
        self.channels = {}           # pid -> Mold, each mold's socket pair until it is retired
        self.notify = open_notify_socket()
        self.systemd = Systemd(os.environ.get("NOTIFY_SOCKET"))
        self.environ = self.worker_environment()
        self.errors_seen = set()
        self.metrics_written = None   # when --metrics-file was last written; None: never
        self.metrics_changed = False  # an event since then
        self.metrics_failure = None   # the last write's error, logged once until a write succeeds

    def worker_environment(self):
        environ = dict(os.environ)
        # WATCHDOG_PID was systemd's, for us: a worker must not think it is watched by pid.
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC"):
            environ.pop(name, None)
        if self.settings.watchdog_timeout is not None:
            # systemd's own contract (sd_watchdog_enabled): WATCHDOG=1 every quarter of this.
            environ["WATCHDOG_USEC"] = str(int(self.settings.watchdog_timeout * 1e6))
        environ["LAUNCHER_PID"] = str(os.getpid())
        # Ours, never systemd's: the workers report to us, and we to systemd.
        environ["NOTIFY_SOCKET"] = "@" + NOTIFY_NAME % os.getpid()
        return environ

    def run(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
        close_inherited_fds(keep={self.listener.fileno(), self.notify.fileno()})
        log("start", workers=len(self.core.slots), socket=describe(self.listener), worker=" ".join(self.argv),
            mold="on" if self.core.molds.enabled else "off")
        pause = 0.0
        while True:
            try:
                wake_at = self.settle(time.monotonic())
                wake_at = min(wake_at, self.write_metrics(time.monotonic()))
                if self.core.finished:
                    break
                info = signal.sigtimedwait(WAITED, max(pause, wake_at - time.monotonic(), 0.0))
                pause = 0.0
                if info is not None:
                    self.dispatch(info)
                    self.metrics_changed = True
            except Exception as error:  # noqa: BLE001 - the loop outlives its bugs
                # As unicorn's "master loop error": one bug must not take the
                # socket and every worker with it.  Log, pause, go on.
                self.loop_error(error)
                pause = LOOP_ERROR_PAUSE_S
        self.write_metrics(time.monotonic(), final=True)
        self.systemd.notify("STATUS=stopped")
        log("stop", status=0)
        return 0

    def settle(self, now):
        """Let the core do what is due and carry out its actions, until it has no more for now."""
        for _ in range(8):  # each pass only acts on what the one before changed
            wake_at = self.core.tick(now)
            actions, self.core.actions = self.core.actions, []
            if not actions:
                break
            for action in actions:
                self.perform(action, now)
        return wake_at

    def perform(self, action, now):
        kind, *args = action
        if kind == SPAWN:
            self.spawn(*args, now)
        elif kind == SIGNAL:
            try:
                os.kill(*args)
            except ProcessLookupError:
                pass  # it died meanwhile; its SIGCHLD is on its way
        elif kind == SYSTEMD:
            self.systemd.notify(*args[0])
        elif kind == START_MOLD:
            self.start_mold(now)
        elif kind == RETIRE_MOLD:
            mold = self.channels.pop(args[0], None)
            if mold is not None:
                mold.retire()
        elif kind == STRAY and parent_of(args[0]) == os.getpid():
            # Told to go like any worker: it drains what it may have accepted.
            log("stray", level=0, pid=args[0], reason="forked after its mold was given up on")
            os.kill(args[0], signal.SIGHUP)

    def dispatch(self, info):
        now = time.monotonic()
        if info.si_signo == signal.SIGCHLD:
            self.reap(now)
        elif info.si_signo == signal.SIGIO:
            self.read_notifications(now)
        else:
            log("signal", level=2, signal=signal_name(info.si_signo), sender=info.si_pid)
            self.core.signalled(info.si_signo, info.si_pid, now)

    def reap(self, now):
        # A worker says STOPPING=1 and then exits; SIGCHLD is the lower signal
        # number and comes out of sigtimedwait first, so read what it said
        # before judging its exit.
        self.read_notifications(now)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.core.exited(pid, os.waitstatus_to_exitcode(status), now)

    def read_notifications(self, now):
        for pid, fields in read_notifications(self.notify):
            log("notify", level=2, pid=pid, fields=",".join(fields))
            self.core.notified(pid, fields, now)

    def spawn(self, slot, role, now):
        told = {"LAUNCHER_READY_WORKERS": str(self.core.ready_workers())}
        mold = self.core.molds.fork_from()
        if mold is not None:
            pid = self.channels[mold].fork(self.listener, told)
            if pid is not None:
                return self.core.spawned(slot, pid, role, now, how="fork")
            self.core.molds.did_not_answer(now)
        environ = dict(self.environ, **told)
        try:
            pid = os.posix_spawn(
                self.path, self.argv, environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, self.listener.fileno(), 0)],
                # Signal masks and ignored dispositions cross exec: give the
                # worker a clean slate, or it could never see SIGHUP.
                setsigmask=(),
                setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
        except OSError as error:
            return self.core.spawn_failed(slot, error.strerror, now)
        self.core.spawned(slot, pid, role, now, how="exec")

    def start_mold(self, now):
        # Read by a warm-up that fails, to say whether the site is served meanwhile.
        told = {"LAUNCHER_READY_WORKERS": str(self.core.ready_workers())}
        try:
            mold = Mold(self.path, self.argv, dict(self.environ, **told))
        except OSError as error:
            return self.core.molds.start_failed(error.strerror, now)
        self.channels[mold.pid] = mold
        self.core.molds.started(mold.pid, now)

    def write_metrics(self, now, final=False):
        """Write --metrics-file if it is due (see METRICS_EVERY_S); return when it next will be."""
        if not self.settings.metrics_file:
            return float("inf")
        due = 0.0 if self.metrics_written is None else self.metrics_written + (
            METRICS_COALESCE_S if self.metrics_changed else METRICS_EVERY_S)
        if now < due and not final:
            return due
        self.metrics_written, self.metrics_changed = now, False
        core = self.core
        workers = [(w.slot.number, w.pid, w.role, w.age(now), w.requests) for w in core.workers.values()]
        slow, stuck = (sum(getattr(w, name) for w in core.workers.values()) for name in ("slow", "stuck"))
        try:
            write_atomically(self.settings.metrics_file, render_metrics(
                metrics_values(core.tally, len(core.slots), core.ready_workers(), workers, self.listener,
                               slow=slow, stuck=stuck)))
        except OSError as error:
            if error.strerror != self.metrics_failure:
                log("metrics-write-failed", level=0, path=self.settings.metrics_file, error=error.strerror)
            self.metrics_failure = error.strerror
        else:
            if self.metrics_failure is not None:
                log("metrics-written", path=self.settings.metrics_file)
            self.metrics_failure = None
        return now + METRICS_EVERY_S

    def memory_shortage(self, pid):
        """None if a replacement fits beside worker PID, else the facts of why not, and which limit decided."""
        reserve = self.settings.memory_reserve
        if not reserve:
            return None
        rss, available, cgroup = resident_bytes(pid), memory_available(), cgroup_memory()
        left, limit = available, "MemAvailable"
        if cgroup and cgroup[0] - cgroup[1] < available:
            left, limit = cgroup[0] - cgroup[1], "cgroup"
        if left - rss >= reserve:
            return None
        return {"limit": limit, "rss": rss, "mem_available": available, "cgroup_limit": cgroup and cgroup[0],
                "cgroup_usage": cgroup and cgroup[1], "reserve": reserve}

    def loop_error(self, error):
        # The traceback once per place it comes from; after that, one line.
        frame = traceback.extract_tb(error.__traceback__)[-1:] or [None]
        where = (type(error).__name__, frame[0] and (frame[0].filename, frame[0].lineno))
        first = where not in self.errors_seen
        self.errors_seen.add(where)
        log("loop-error", level=0, error="%s: %s" % (type(error).__name__, error),
            traceback="follows" if first else "logged before")
        if first:
            try:
                traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
            except (OSError, ValueError):
                pass


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


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


# --------------------------------------------------------------------------
# Reading what the kernel knows: memory, the cgroup's limit, the listen backlog.

def resident_bytes(pid):
    try:
        with open("/proc/%d/statm" % pid) as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_available():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# cgroup v1 writes "no limit" as the largest multiple of the page size below 2**63.
CGROUP_NO_LIMIT = 1 << 60


def cgroup_memory():
    """(limit, usage) bytes of the tightest memory-limited cgroup we are in, or None if none limits us.

    The kernel enforces the cgroup's limit, not the host's MemAvailable: under
    systemd's MemoryMax= or in a container a handoff that fits the host can
    still meet the cgroup's OOM killer.  Each level from ours up to the
    hierarchy's root may have a limit, and the one with the least room left
    decides.  Usage leaves out the inactive file cache (memory.stat), which
    the kernel reclaims before it kills: the "working set" that kubelet and
    docker compare with the limit too.
    """
    try:
        with open("/proc/self/cgroup") as lines:
            memberships = [line.rstrip("\n").split(":", 2) for line in lines]
        with open("/proc/self/mountinfo") as lines:
            mounts = [line.split() for line in lines]
    except OSError:
        return None
    v1 = [path for _, controllers, path in memberships if "memory" in controllers.split(",")]
    v2 = [path for hierarchy, controllers, path in memberships if hierarchy == "0" and not controllers]
    for fstype, path, limit_name, usage_name, cache_name in (
            ("cgroup", v1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
            ("cgroup2", v2, "memory.max", "memory.current", "inactive_file")):
        if not path:
            continue
        for fields in mounts:
            # mountinfo: ID PARENT DEV ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPEROPTIONS
            dash = fields.index("-") if "-" in fields else len(fields)
            if dash + 1 >= len(fields) or fields[dash + 1] != fstype:
                continue
            if fstype == "cgroup" and "memory" not in fields[-1].split(","):
                continue
            root, mountpoint = fields[3], fields[4]
            relative = os.path.relpath(path[0], root)
            if relative.startswith(".."):
                continue  # our cgroup is not under what this mount shows
            tightest = None
            directory = os.path.normpath(os.path.join(mountpoint, relative))
            while True:
                room = cgroup_level(directory, limit_name, usage_name, cache_name)
                if room and (tightest is None or room[0] - room[1] < tightest[0] - tightest[1]):
                    tightest = room
                if directory == mountpoint or len(directory) <= len(mountpoint):
                    break
                directory = os.path.dirname(directory)
            if tightest:
                return tightest
    return None


def cgroup_level(directory, limit_name, usage_name, cache_name):
    """(limit, usage) of one cgroup directory, or None if it sets no limit or cannot be read."""
    try:
        with open(os.path.join(directory, limit_name)) as source:
            text = source.read().strip()
        if text == "max" or int(text) >= CGROUP_NO_LIMIT:
            return None
        with open(os.path.join(directory, usage_name)) as source:
            usage = int(source.read())
        cache = 0
        with open(os.path.join(directory, "memory.stat")) as stat_lines:
            for line in stat_lines:
                key, _, value = line.partition(" ")
                if key == cache_name:
                    cache = int(value)
        return int(text), max(0, usage - cache)
    except (OSError, ValueError):
        return None


def shared_memory(pid):
    """(PSS, private) bytes of PID from /proc/PID/smaps_rollup, or (None, None) if it cannot be read.

    smaps_rollup walks the page tables once (about a millisecond for a Trac
    worker); the per-mapping /proc/PID/smaps costs many times that.
    """
    fields = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None, None
    if "Pss" not in fields:
        return None, None
    return fields["Pss"], fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3
TCP_LISTEN = 10
UDIAG_SHOW_RQLEN, UNIX_DIAG_RQLEN = 0x10, 4
NO_COOKIE = 0xFFFFFFFF


def listen_backlog(sock):
    """(connections waiting, most it holds) in SOCK's accept queue, or (None, None).

    Asked of the kernel's sock_diag netlink interface, which `ss -l` uses and
    which needs no privilege: for a listening socket, TCP's "receive queue" is
    the accept queue, and a unix socket reports its own under UNIX_DIAG_RQLEN
    (/proc/net/unix has no such column).  One round trip, well under a
    millisecond.
    """
    inode = os.fstat(sock.fileno()).st_ino
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)  # the kernel answers at once; never hang the launcher on it
            if sock.family == socket.AF_UNIX:
                # unix_diag_req: one socket, looked up by its inode.
                request = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, inode,
                                      UDIAG_SHOW_RQLEN, NO_COOKIE, NO_COOKIE)
                for message in netlink_exchange(diag, request, NLM_F_REQUEST):
                    # unix_diag_msg (16 bytes), then attributes.
                    offset = 16
                    while offset + 4 <= len(message):
                        length, kind = struct.unpack_from("=HH", message, offset)
                        if kind == UNIX_DIAG_RQLEN:
                            return struct.unpack_from("=II", message, offset + 4)
                        offset += max(4, (length + 3) & ~3)
            else:
                # inet_diag_req_v2 for every listening TCP socket of this family;
                # ours is the one with our inode.
                request = struct.pack("=BBBBI48x", sock.family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
                for message in netlink_exchange(diag, request, NLM_F_REQUEST | NLM_F_DUMP):
                    # inet_diag_msg: rqueue, wqueue, uid, inode after 4 + 48 + 4 bytes.
                    waiting, limit, _, found = struct.unpack_from("=IIII", message, 56)
                    if found == inode:
                        return waiting, limit
    except (OSError, struct.error):
        pass
    return None, None


def netlink_exchange(diag, request, flags):
    """Send one sock_diag request; yield the payload of every answer until the last."""
    diag.send(struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + request)
    while True:
        data = diag.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "sock_diag")
            yield data[offset + 16:offset + length]
            offset += (length + 3) & ~3
        if not flags & NLM_F_DUMP:
            return


# --------------------------------------------------------------------------
# The metrics file: Prometheus' text format, for node_exporter's textfile
# collector and for `trac-fcgi-launcher status`.

def render_metrics(values):
    """Prometheus text exposition of VALUES: {metric name: figure}.

    A figure is a number; {label values tuple: number} for a labelled metric;
    a Histogram; or None for a metric that cannot be read here (left out).
    """
    out = []
    for name, kind, labels, meaning in METRICS:
        figure = values.get(name)
        if figure is None:
            continue
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, meaning.replace("\\", r"\\"), name, kind))
        if kind == "histogram":
            cumulative = 0
            for bound, count in zip(figure.bounds, figure.counts):
                cumulative += count
                out.append('%s_bucket{le="%s"} %d\n' % (name, bound, cumulative))
            out.append('%s_bucket{le="+Inf"} %d\n' % (name, figure.count))
            out.append("%s_sum %s\n%s_count %d\n" % (name, number(figure.sum), name, figure.count))
        elif labels:
            names = labels.split(", ")
            for label_values, value in figure.items():
                pairs = ",".join('%s="%s"' % (label, escape_label(str(v))) for label, v in zip(names, label_values))
                out.append("%s{%s} %s\n" % (name, pairs, number(value)))
        else:
            out.append("%s %s\n" % (name, number(figure)))
    return "".join(out)


def number(value):
    return "%d" % value if isinstance(value, int) else "%.6f" % value


def escape_label(text):
    return text.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def write_atomically(path, text):
    """Replace PATH by TEXT so that a reader sees the old file or the new one, never half of either.

    The temporary name does not end in .prom, so node_exporter never reads it.
    It is made afresh (O_EXCL, O_NOFOLLOW): a symlink planted under that name
    in a shared directory is removed, never written through.  Mode 0644
    whatever the umask: node_exporter runs as another user, and there is
    nothing secret here.  No fsync: after a power cut a stale or empty
    metrics file is harmless and the next write mends it.
    """
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        try:
            os.unlink(temporary)  # left by a launcher that died mid-write
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w") as out:
            os.fchmod(fd, 0o644)
            out.write(text)
        os.rename(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def metrics_values(tally, slots, ready, workers, listener, slow=0, stuck=0):
    """The figures for one write.  WORKERS: (slot, pid, role, age_s, requests) of each live worker;
    SLOW and STUCK: the live workers' own counts, summed.

    Memory and the backlog are read now, from /proc and the kernel.
    """
    limit = cgroup_memory()
    values = {"trac_fcgi_slots": slots, "trac_fcgi_workers": ready,
              "trac_fcgi_requests_total": tally.requests_of_past_workers + sum(w[4] for w in workers),
              "trac_fcgi_slow_requests_total": tally.slow_of_past_workers + slow,
              "trac_fcgi_stuck_requests_total": tally.stuck_of_past_workers + stuck,
              "trac_fcgi_unresponsive_kills_total": tally.unresponsive_kills,
              "trac_fcgi_stale_molds_total": tally.stale_molds,
              "trac_fcgi_memory_available_bytes": memory_available(),
              "trac_fcgi_cgroup_memory_limit_bytes": limit and limit[0],
              "trac_fcgi_cgroup_memory_usage_bytes": limit and limit[1],
              "trac_fcgi_recycles_total": {(reason,): count for reason, count in tally.recycles.items()},
              "trac_fcgi_crashes_total": tally.crashes,
              "trac_fcgi_abandoned_requests_total": tally.abandoned,
              "trac_fcgi_ready_timeouts_total": tally.ready_timeouts,
              "trac_fcgi_stop_then_start_total": tally.stop_then_start}
    values.update(tally.histograms)
    per_worker = {name: {} for name in ("trac_fcgi_worker_info", "trac_fcgi_worker_resident_bytes",
                                        "trac_fcgi_worker_pss_bytes", "trac_fcgi_worker_private_bytes",
                                        "trac_fcgi_worker_age_seconds", "trac_fcgi_worker_requests")}
    for slot, pid, role, age, requests in sorted(workers):
        pss, private = shared_memory(pid)
        per_worker["trac_fcgi_worker_info"][(slot, pid, role)] = 1
        for name, value in (("trac_fcgi_worker_resident_bytes", resident_bytes(pid)),
                            ("trac_fcgi_worker_pss_bytes", pss), ("trac_fcgi_worker_private_bytes", private),
                            ("trac_fcgi_worker_age_seconds", age), ("trac_fcgi_worker_requests", requests)):
            if value is not None:
                per_worker[name][(slot, pid)] = value
    values.update(per_worker)
    values["trac_fcgi_listen_backlog"], values["trac_fcgi_listen_backlog_limit"] = listen_backlog(listener)
    return values


# --------------------------------------------------------------------------
# `trac-fcgi-launcher status [PATH]`: the metrics file as a table for a person.

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def read_metrics(text):
    """{name: {labels dict as a sorted tuple of pairs: value}} from text render_metrics() wrote."""
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = tuple(sorted((k, v.replace(r"\"", '"').replace(r"\n", "\n").replace(r"\\", "\\"))
                             for k, v in _LABEL.findall(labels)))
        found.setdefault(name, {})[pairs] = float(value)
    return found


def status_table(text, written_s_ago):
    """The table `status` prints: one row per worker, then the totals and recycles by reason."""
    metrics = read_metrics(text)
    one = lambda name: next(iter(metrics.get(name, {}).values()), None)
    rows = {}  # (slot, pid) -> {column: value}
    for pairs, _ in metrics.get("trac_fcgi_worker_info", {}).items():
        labels = dict(pairs)
        rows[(int(labels["slot"]), int(labels["pid"]))] = {"role": labels["role"]}
    for column, name in (("age", "trac_fcgi_worker_age_seconds"), ("requests", "trac_fcgi_worker_requests"),
                         ("rss", "trac_fcgi_worker_resident_bytes"), ("pss", "trac_fcgi_worker_pss_bytes"),
                         ("private", "trac_fcgi_worker_private_bytes")):
        for pairs, value in metrics.get(name, {}).items():
            labels = dict(pairs)
            rows.setdefault((int(labels["slot"]), int(labels["pid"])), {"role": "?"})[column] = value
    lines = ["%-4s %-7s %-8s %8s %8s %8s %8s %8s" % ("slot", "pid", "role", "age", "requests", "RSS", "PSS",
                                                      "private")]
    for (slot, pid), row in sorted(rows.items()):
        lines.append("%-4d %-7d %-8s %8s %8s %8s %8s %8s" % (
            slot, pid, row["role"], duration(row.get("age")),
            "-" if row.get("requests") is None else "%d" % row["requests"],
            mebibytes(row.get("rss")), mebibytes(row.get("pss")), mebibytes(row.get("private"))))
    backlog = one("trac_fcgi_listen_backlog")
    lines.append("")
    lines.append("%s of %s slots ready; %d requests; %d crashes; %d abandoned requests; backlog %s" % (
        "%d" % (one("trac_fcgi_workers") or 0), "%d" % (one("trac_fcgi_slots") or 0),
        one("trac_fcgi_requests_total") or 0, one("trac_fcgi_crashes_total") or 0,
        one("trac_fcgi_abandoned_requests_total") or 0,
        "unknown" if backlog is None else "%d of %d" % (backlog, one("trac_fcgi_listen_backlog_limit") or 0)))
    lines.append("%d slow requests; %d stuck requests; %d unresponsive kills; %d stale molds replaced" % (
        one("trac_fcgi_slow_requests_total") or 0, one("trac_fcgi_stuck_requests_total") or 0,
        one("trac_fcgi_unresponsive_kills_total") or 0, one("trac_fcgi_stale_molds_total") or 0))
    limit = one("trac_fcgi_cgroup_memory_limit_bytes")
    if limit is not None:
        lines.append("cgroup memory: %s used of %s" % (mebibytes(one("trac_fcgi_cgroup_memory_usage_bytes")),
                                                       mebibytes(limit)))
    recycles = {dict(pairs)["reason"]: value for pairs, value in metrics.get("trac_fcgi_recycles_total", {}).items()}
    lines.append("recycles: " + (", ".join("%s %d" % (reason, count) for reason, count in
                                           sorted(recycles.items(), key=lambda item: -item[1]) if count)
                                 or "none"))
    if written_s_ago > 3 * METRICS_EVERY_S:
        lines.append("written %s ago: is the launcher still running?" % duration(written_s_ago))
    return "\n".join(lines) + "\n"


def duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 60:
        return "%.1fs" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(int(seconds), 60)
    return "%dh%02dm" % divmod(int(seconds) // 60, 60)


def mebibytes(value):
    return "-" if value is None else "%.1fM" % (value / (1 << 20))


def status_main(argv):
    """trac-fcgi-launcher status [PATH]: the metrics file as a table for a person."""
    if len(argv) > 1 or argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write("usage: trac-fcgi-launcher status [PATH]\n\nPrint the workers and recycles that "
                         "the launcher's --metrics-file PATH (default $LAUNCHER_METRICS_FILE) holds.\n")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    path = argv[0] if argv else os.environ.get("LAUNCHER_METRICS_FILE")
    if not path:
        sys.stderr.write("trac-fcgi-launcher: status needs the metrics file: give its path, e.g. "
                         "trac-fcgi-launcher status /var/lib/prometheus/node-exporter/trac.prom, "
                         "or set LAUNCHER_METRICS_FILE\n")
        return 2
    try:
        with open(path) as source:
            text = source.read()
            written_s_ago = time.time() - os.fstat(source.fileno()).st_mtime
        table = status_table(text, written_s_ago)
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as error:
        sys.stderr.write("trac-fcgi-launcher: status: cannot read %s (%s): give the path the launcher's "
                         "--metrics-file writes\n" % (path, getattr(error, "strerror", None) or error))
        return 2
    sys.stdout.write(table)
    return 0


# --------------------------------------------------------------------------
# The command line.

def main(argv=None):
    global VERBOSITY
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    try:
        settings = parse_settings(argv)
        VERBOSITY = 0 if settings.quiet else 2 if settings.verbose else 1
        path, command = worker_command(settings.command)
        listener = listening_socket(settings.bind, settings.source["bind"])
    except BadInput as problem:
        sys.stderr.write("trac-fcgi-launcher: %s\n" % problem)
        return 2
    return Launcher(settings, listener, path, command).run()


if __name__ == "__main__":
    sys.exit(main())
