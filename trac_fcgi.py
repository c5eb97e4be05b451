#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""trac_fcgi.py: a drop-in trac.fcgi that bounds its memory and never drops a request.

Copy it over the cgi-bin/trac.fcgi that `trac-admin ENV deploy DIR` wrote, or
run it as the launcher's WORKER_PATH.  It serves Trac (or any WSGI app) with
flup's threaded FastCGI server, measures its resident memory, request count
and age, and when one crosses its limit it asks its launcher for a
replacement (SIGUSR1), keeps serving until the launcher says go (SIGHUP), then
stops accepting and finishes every request it has accepted.  Without a
launcher (spawn-fcgi, mod_fcgid), it re-executes itself in place instead,
while a forked copy of it serves.  It also
freezes Trac's long-lived objects out of the garbage collector's reach, which
Trac otherwise walks in full after every request ("Freezing the warm set").

The settings are environment variables, listed below with their defaults;
`trac_fcgi.py --help` prints the same table.  Edit DEFAULT_TRAC_ENV as you
would edit the trac.fcgi that trac-admin writes.
"""

import os

# Used when neither TRAC_ENV nor TRAC_ENV_PARENT_DIR is set, like the
# `os.environ['TRAC_ENV'] = ...` line of the trac.fcgi that trac-admin writes
# (`trac_fcgi.py --replace` copies that line's path here).  Set the second
# instead to serve every environment in a directory.
DEFAULT_TRAC_ENV = "/var/lib/trac/project"
DEFAULT_TRAC_ENV_PARENT_DIR = None

import ast
import collections
import ctypes
import errno
import fcntl
import gc
import hashlib
import importlib
import io
import logging
import pwd
import random
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import struct
import sys
import textwrap
import threading
import time
import traceback
import warnings

# Trac 1.6 imports pkg_resources, whose deprecation warning would open every
# worker's log; setup.cfg pins setuptools<81, which still ships it.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

__version__ = "0.1.0"

# How often the main loop looks at the clock, its parent and its memory when
# no connection arrives.  Also bounds how long a lost signal goes unnoticed.
PERIOD_S = 0.5
# A worker whose SIGUSR1 went unanswered asks again this often: standard
# signals coalesce, so two workers asking at once can reach the launcher as one.
REASK_S = 5.0
# Under a launcher, the request count is reported on the notify socket when
# it changes, but no more often than this: the launcher's metrics need no more.
REPORT_EVERY_S = 1.0
# After EMFILE, leave the backlog alone this long instead of spinning on it.
ACCEPT_PAUSE_S = 0.1
# Closing a connection, read what the client still sends for at most this
# long, so that a request it wrote meanwhile cannot make the kernel reset the
# connection before it has read our answer; as Apache's lingering close.
LINGER_S = 2.0
# A kept-alive connection idle this long may be closed to free its thread for
# a connection waiting in the backlog; nginx is unlikely to be reusing it.
RELEASE_IDLE_S = 1.0


# --------------------------------------------------------------------------
# Settings: declared once; this table feeds parsing, validation and --help.

class BadInput(Exception):
    """A setting the operator can fix: printed as one line, exit status 2."""


def size(text):
    """a size in bytes: digits with an optional K, M or G suffix, e.g. 128M"""
    # Written the same in launcher.py; tests/test_settings.py feeds both one table.
    match = re.fullmatch(r"([0-9]+)([KMG]?)", text.strip().upper())
    if not match:
        raise ValueError
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def count(text):
    """a whole number, 0 or more"""
    if not text.strip().isdigit():
        raise ValueError
    return int(text)


def positive_count(text):
    """a whole number, 1 or more"""
    value = count(text)
    if value < 1:
        raise ValueError
    return value


def seconds(text):
    """a number of seconds, 0 or more"""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError
    return value


def positive_seconds(text):
    """a number of seconds above 0"""
    value = seconds(text)
    if value == 0:
        raise ValueError
    return value


def fraction(text):
    """a fraction from 0 to 0.5"""
    value = float(text)
    if not 0 <= value <= 0.5:
        raise ValueError
    return value


def warmup_path(text):
    """a URL path starting with /, several separated by commas, or the word off"""
    if text != "off" and not all(path.startswith("/") for path in text.split(",")):
        raise ValueError
    return None if text == "off" else text


def on_off(text):
    """on or off"""
    if text not in ("on", "off"):
        raise ValueError
    return text == "on"


def app_spec(text):
    """module:callable"""
    module, sep, name = text.partition(":")
    if not module or not sep or not name:
        raise ValueError
    return text


def address(text):
    """an address: unix:/path[:mode], HOST:PORT or [v6]:PORT, e.g. unix:/run/trac/trac.sock"""
    # Written the same in launcher.py; tests/test_settings.py feeds both one table.
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


# (environment variable, parser, default, meaning)
SETTINGS = [
    ("TRAC_FCGI_MAX_RSS", size, "128M",
     "resident memory limit, a promise: past it the worker stops accepting at once; 0 turns it off"),
    ("TRAC_FCGI_SOFT_RSS", size, None,
     "resident memory at which the worker asks for its replacement (default 90% of MAX_RSS)"),
    ("TRAC_FCGI_MAX_REQUESTS", count, "0", "requests after which the worker is replaced; 0 is off"),
    ("TRAC_FCGI_MAX_LIFETIME", seconds, "0", "seconds after which the worker is replaced; 0 is off"),
    ("TRAC_FCGI_JITTER", fraction, "0.1",
     "each worker draws its request, age and soft memory limits within +-this "
     "fraction, so workers do not recycle in lockstep (MAX_RSS is never raised)"),
    ("TRAC_FCGI_DRAIN_TIMEOUT", positive_seconds, "30",
     "seconds to finish accepted requests once told to go; what is left is abandoned and logged"),
    ("TRAC_FCGI_MAX_THREADS", positive_count, "15",
     "worker threads; a connection is accepted only when one is free, the rest wait in the backlog"),
    ("TRAC_FCGI_TURN", seconds, "0.05",
     "seconds a request runs the application alone before the next one may start beside it: requests take "
     "turns, first come first served, which serves more pages than every thread at once (Python runs one at a "
     "time); one that waits or runs longer only delays the next this long; 0 runs them all at once, as flup does"),
    ("TRAC_FCGI_SLOW_REQUEST", seconds, "10",
     "seconds after which a request still running is logged once, with its thread's stack (event=slow); 0 is off"),
    ("TRAC_FCGI_REQUEST_TIMEOUT", seconds, "60",
     "seconds after which a request still running is stuck: logged with its stack (event=stuck), and the worker "
     "is replaced, its healthy requests finished and only the stuck ones abandoned; 0 is off"),
    ("TRAC_FCGI_IDLE_TIMEOUT", positive_seconds, "60",
     "seconds within which each request must arrive whole; a client silent or trickling longer is closed"),
    ("TRAC_FCGI_WARMUP", warmup_path, "/",
     "path requested in-process before READY=1, so the first real request finds the worker warm; several, "
     "comma-separated, warm more pages (in the mold, once for every worker); off skips it"),
    ("TRAC_FCGI_APP", app_spec, "trac.web.main:dispatch_request", "the WSGI application, as module:callable"),
    ("TRAC_FCGI_GC_FREEZE", on_off, "on",
     "freeze the warm set out of the garbage collector's reach (gc.freeze) after the warm-up and again as the "
     "worker warms further, so Trac's collection after every request walks only that request's objects"),
]

# Read by Trac or flup themselves; listed in --help so that one page tells all.
PASSED_THROUGH = [
    ("TRAC_ENV", "the Trac environment to serve (default DEFAULT_TRAC_ENV, at the top of this file)"),
    ("TRAC_ENV_PARENT_DIR", "serve every Trac environment in this directory instead (default "
                            "DEFAULT_TRAC_ENV_PARENT_DIR, unset)"),
    ("PYTHON_EGG_CACHE", "where plugin eggs are unpacked (default TRAC_ENV/.egg-cache)"),
    ("FCGI_WEB_SERVER_ADDRS", "comma-separated web server addresses allowed on a TCP socket"),
    ("FCGI_FORCE_CGI", "Y serves one CGI request, as flup does"),
    ("LAUNCHER_PID, NOTIFY_SOCKET", "set by trac-fcgi-launcher; see its --help"),
    ("LAUNCHER_READY_WORKERS", "set by trac-fcgi-launcher: how many other workers served when this one "
                               "started, which a failed warm-up reports"),
    ("TRAC_FCGI_MOLD_FD", "set by trac-fcgi-launcher when it starts this process as the mold its workers are forked from"),
]

HELP = """\
usage: trac_fcgi.py [--check | --bind ADDR | --replace FILE | --help | --version]

A drop-in trac.fcgi: serves Trac over FastCGI on fd 0 and replaces itself
before its memory, request count or age pass their limits.

  with spawn-fcgi:  spawn-fcgi -n -s /run/trac/trac.sock -- /srv/trac/cgi-bin/trac.fcgi
  with a launcher:  trac-fcgi-launcher --bind unix:/run/trac/trac.sock -- /srv/trac/cgi-bin/trac.fcgi
  to test a deploy: trac_fcgi.py --check   open the environment, serve one request
                    in-process, print what it found; exit 0, or 1 with the reason
  by hand:          trac_fcgi.py --bind 127.0.0.1:9000   (or unix:/path[:mode], mode 0660 by default)
  to install:       trac_fcgi.py --replace DIR/cgi-bin/trac.fcgi   write this file over
                    the one trac-admin deploy wrote, keeping its Python and TRAC_ENV
  as a CGI script:  serves the one request its CGI variables (REQUEST_METHOD...) describe

settings (environment variables):
%s

also read:
%s

signals:
  SIGHUP   stop accepting, finish every accepted request, exit 0 (under a
           launcher), or re-execute in place (without one: spawn-fcgi,
           mod_fcgid), one process of a pool at a time, while a forked
           stand-in serves; a signal that arrives while the new image starts
           is acted on once it serves
  SIGTERM  stop accepting, finish every accepted request, exit 0
  SIGINT   same as SIGTERM
  SIGUSR2  log every thread's stack with the request it serves (event=stacks),
           and serve on
"""


def help_text():
    def row(name, meaning):
        return textwrap.fill(meaning, 79, initial_indent="  %-24s " % name, subsequent_indent=" " * 27,
                             break_on_hyphens=False)
    rows = [row(name, meaning if default is None else "%s (default %s)" % (meaning, default))
            for name, _, default, meaning in SETTINGS]
    passed = [row(name, meaning) for name, meaning in PASSED_THROUGH]
    return HELP % ("\n".join(rows), "\n".join(passed))


def answered_without_serving(argv):
    """--help and --version: answered before anything is imported, so that they work without flup."""
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(help_text())
    elif argv == ["--version"]:
        sys.stdout.write("%s\n" % __version__)
    else:
        return False
    return True


class Limits:
    """Every setting, parsed and checked once at start, and this worker's draw of the jittered ones."""

    def __init__(self, environ):
        self.raw = {}  # each setting as given (or its default), for the lines that name it
        for name, parse, default, _ in SETTINGS:
            raw = self.raw[name] = environ.get(name, default)
            attribute = name[len("TRAC_FCGI_"):].lower()
            if raw is None:
                setattr(self, attribute, None)
                continue
            try:
                setattr(self, attribute, parse(raw))
            except ValueError:
                raise BadInput("%s=%r is not %s; fix or unset it (default %s)"
                                 % (name, raw, parse.__doc__, default))
        if self.soft_rss is None:
            self.soft_rss = self.max_rss * 9 // 10
        elif self.max_rss and self.soft_rss > self.max_rss:
            raise BadInput("TRAC_FCGI_SOFT_RSS=%s is above TRAC_FCGI_MAX_RSS=%s; set it lower"
                             % (self.raw["TRAC_FCGI_SOFT_RSS"], self.raw["TRAC_FCGI_MAX_RSS"]))
        # The lowest soft mark any worker can draw, for check_headroom().
        self.lowest_soft_rss = int(self.soft_rss * (1 - self.jitter))
        # Drawn once per worker, so that N workers started together spread out.
        draw = lambda limit: limit * random.uniform(1 - self.jitter, 1 + self.jitter)
        # A limit that is on stays on: a draw never rounds it down to 0 (off).
        self.max_requests = self.max_requests and max(1, round(draw(self.max_requests)))
        self.max_lifetime = self.max_lifetime and draw(self.max_lifetime)
        # The soft mark moves, the hard limit never: MAX_RSS is the promise.
        self.soft_rss = min(int(draw(self.soft_rss)), self.max_rss or sys.maxsize)

    def check_headroom(self, warm_rss):
        """Refuse to serve when a worker this big once warm could never serve for long.

        Past the soft mark, a worker asks for its replacement as soon as it is
        ready, and so would that one: workers would be replaced without end.
        Checked against the lowest mark any worker may draw, so that the answer
        does not depend on the draw.
        """
        if not self.max_rss or warm_rss < self.lowest_soft_rss:
            return
        source = "TRAC_FCGI_SOFT_RSS" if self.raw["TRAC_FCGI_SOFT_RSS"] is not None else "TRAC_FCGI_MAX_RSS"
        raise BadInput("%s=%s leaves no headroom: a worker already holds %d MiB once warm, past the %d MiB "
                         "at which it asks for its replacement; set TRAC_FCGI_MAX_RSS to about twice the warm "
                         "size, e.g. %dM" % (source, self.raw[source], warm_rss >> 20,
                                              self.lowest_soft_rss >> 20, 2 * (warm_rss >> 20) + 1))


# --------------------------------------------------------------------------
# Logging: one line per event, key=value, on stderr.

# Written the same in launcher.py (tests/test_twins.py holds them equal);
# the worker logs at the normal level always.
LOG_NAME, VERBOSITY = "trac-fcgi", 1  # 0 quiet, 1 normal, 2 verbose


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
# Starting: what a run of this file does, from the command line to the worker's exit.

def main(argv=None):
    """The command line: a tool (--help, --version, --replace, --check), or a FastCGI server until told to go."""
    argv = sys.argv[1:] if argv is None else argv
    if answered_without_serving(argv):
        return 0
    if argv[:1] == ["--replace"]:
        return replace_command(argv[1:])
    if argv == ["--check"]:
        return check()
    try:
        started = start(argv)
    except BadInput as problem:
        sys.stderr.write("trac-fcgi: %s\n" % problem)
        return 2
    except OSError as error:
        if error.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        sys.stderr.write("trac-fcgi: out of file descriptors while starting (%s): raise the open-files "
                         "limit (ulimit -n)\n" % error.strerror)
        return 2
    if started is None:
        sys.stderr.write(BY_HAND % {"prog": os.path.basename(sys.argv[0]), "version": __version__})
        return 2
    limits, application, mold, opened, warm = started
    if not warmed(limits, *warm):
        return 1
    if mold is not None:
        exit_status = mold.serve_forks(limits.gc_freeze)
        if exit_status is not None:
            return exit_status
        # A worker forked from the mold: its own draw of the jittered limits,
        # its own server and threads.
        limits = Limits(os.environ)
        opened = open_server(application, limits, None, forked=True)
    serve(*opened)


def start(argv):
    """Everything that can be refused in one line: the arguments, settings, application, socket and warm-up.

    Returns None when a person ran us by hand; else the limits, the
    application, the mold (or None), the server and its socket (or None in
    a mold), and the warm-up's (status, error, seconds, rss, objects frozen).
    """
    bind = None
    if argv[:1] == ["--bind"] and len(argv) == 2:
        bind = parse_bind(argv[1])
    elif argv:
        raise BadInput("unknown arguments %s: the options are --check, --bind ADDR, --replace FILE, "
                       "--help and --version" % " ".join(argv))
    elif started_by_hand():
        return None
    limits = Limits(os.environ)
    application = load_application(limits.app)
    mold = Mold.from_environment()
    opened = open_server(application, limits, bind) if mold is None else None
    started = time.monotonic()
    status, error = warm_up(application, limits.warmup) if limits.warmup else (None, None)
    # The mold freezes once its database connections are closed (Mold.make_pristine).
    frozen = None if mold is not None else freeze_warm_set() if limits.gc_freeze else 0
    warm_s, warm_rss = time.monotonic() - started, ResidentMemory.once()
    # Before the warm line: a refusal stays the one line on stderr.
    limits.check_headroom(warm_rss)
    return limits, application, mold, opened, (status, error, warm_s, warm_rss, frozen)


def warmed(limits, status, error, warm_s, warm_rss, frozen):
    """Log the warm-up; False, with why, if it failed: a replacement that fails must not take over."""
    if status is None:
        return True  # TRAC_FCGI_WARMUP=off
    log("warm", path=limits.warmup, status=status, warm_s=warm_s, rss=warm_rss, frozen=frozen)
    if status >= 500:
        warm_failed(limits, status, error)
        return False
    return True


def serve(server, sock):
    """Say READY=1, serve until told to go, hand over as the succession says, and leave; never returns."""
    # Once we have said READY=1, a SIGHUP, SIGTERM or SIGUSR2 is meant for a
    # serving worker: held until run() has installed the handlers, never
    # left to the default action, which would end us at once.
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    sd_notify(server.watchdog.first("READY=1"))
    server.succession.ready()
    leave(0, abandoned=server.run(sock))


def parse_bind(text):
    try:
        return address(text)
    except ValueError:
        raise BadInput("--bind %r is not %s" % (text, address.__doc__))


def open_server(application, limits, bind, forked=False):
    """The server and its listening socket: fd 0, or a new one for --bind.  FORKED: from the mold."""
    server = RecyclingWSGIServer(application, limits, succession_for(os.environ, bind), bindAddress=bind,
                                 first_freeze_at=FORKED_FIRST_FREEZE if forked else 1)
    return server, server._setupSocket()


LEAVE_TIMEOUT_S = 5


def leave(status, abandoned=0):
    """End a worker that has stopped serving, without the interpreter's teardown; never returns.

    Python's own exit frees every object one by one, which in a worker
    forked from the mold writes to nearly every page it still shares, and
    the kernel copies each one first (README.md, "Forking from a mold").  What that
    teardown did that matters is done here: database connections closed,
    log handlers and stdio flushed.  With ABANDONED requests still running,
    their threads may hold a connection mid-query, Trac's environment lock
    or a log handler's lock, so the worker leaves at once instead; should
    anything else hold it up, SIGALRM's default action ends it within
    LEAVE_TIMEOUT_S.
    """
    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(LEAVE_TIMEOUT_S)
        if not abandoned:
            close_trac_databases()
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except Exception:
        pass  # nothing more to save: leaving is all that is left
    finally:
        os._exit(status)


# --------------------------------------------------------------------------
# The application.

def fd0_mode():
    try:
        return os.fstat(0).st_mode
    except OSError:
        raise BadInput("fd 0 is closed: start me under spawn-fcgi or trac-fcgi-launcher, "
                         "or use --bind ADDR")


def prepare_trac_environment():
    """The environment that Trac's deploy template sets up."""
    for name in ("TRAC_ENV", "TRAC_ENV_PARENT_DIR"):
        if os.environ.get(name) == "":
            raise BadInput("%s is set but empty: give it a path, or unset it to use DEFAULT_TRAC_ENV" % name)
    if "TRAC_ENV" not in os.environ and "TRAC_ENV_PARENT_DIR" not in os.environ:
        if DEFAULT_TRAC_ENV_PARENT_DIR:
            os.environ["TRAC_ENV_PARENT_DIR"] = DEFAULT_TRAC_ENV_PARENT_DIR
        else:
            os.environ["TRAC_ENV"] = DEFAULT_TRAC_ENV
    if "PYTHON_EGG_CACHE" not in os.environ:
        base = os.environ.get("TRAC_ENV") or os.environ["TRAC_ENV_PARENT_DIR"]
        os.environ["PYTHON_EGG_CACHE"] = os.path.join(base, ".egg-cache")
    env_path = os.environ.get("TRAC_ENV")
    try:
        env_path and os.stat(os.path.join(env_path, "VERSION"))
    except PermissionError:
        raise BadInput("TRAC_ENV=%r: user %s cannot read it; let that user read and write the "
                         "environment, e.g. chown -R %s %s" % (env_path, user_name(), user_name(), env_path))
    except OSError:
        raise BadInput("TRAC_ENV=%r is not a Trac environment (no VERSION file): point it at "
                         "one made by trac-admin PATH initenv, or edit DEFAULT_TRAC_ENV" % env_path)
    parent = os.environ.get("TRAC_ENV_PARENT_DIR")
    if not env_path and not os.path.isdir(parent):
        raise BadInput("TRAC_ENV_PARENT_DIR=%r is not a directory: point it at the directory "
                         "that holds your Trac environments" % parent)


def load_application(spec):
    module_name, _, name = spec.partition(":")
    if module_name.split(".")[0] == "trac":
        prepare_trac_environment()
    try:
        module = importlib.import_module(module_name)
        application = getattr(module, name)
    except Exception as error:  # an app that fails to import is a setting to fix
        raise BadInput("TRAC_FCGI_APP=%s cannot be loaded by %s (%s: %s): install it into that Python "
                         "or fix the name" % (spec, sys.executable, type(error).__name__, error))
    return application


def warm_up(application, paths):
    """Serve one request in-process for each of PATHS (comma-separated), so the first real ones find
    templates compiled: in a mold, compiled once for every worker forked from it.

    Returns the HTTP status of the first that failed, or of the last.
    """
    for path in paths.split(","):
        status, error = serve_in_process(application, path)
        if status >= 500:
            break
    return status, error


def serve_in_process(application, path):
    """Serve one request in-process.

    Returns the HTTP status and the exception behind a failure, if the app
    reported one (through start_response's exc_info, as Trac does) or raised
    one.  A replacement whose warm-up fails with a server error must not take
    over from a worker that serves.
    """
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    status, errors = [], []

    def start_response(line, headers, exc_info=None):
        status.append(line)
        if exc_info:
            errors.append(exc_info[1])
        return lambda data: None

    try:
        result = application(environ, start_response)
        try:
            for _ in result:
                pass
        finally:
            if hasattr(result, "close"):
                result.close()
    except Exception as error:  # the app's own bug: reported below, as flup reports one in a request
        traceback.print_exc()
        return 500, error
    return (int(status[-1].split()[0]) if status else 500), (errors[-1] if errors else None)


def unwritable(env_path):
    """Why this user cannot serve ENV_PATH for long, or None: Trac writes to its database, log and files."""
    for place in (env_path, os.path.join(env_path, "conf", "trac.ini"), os.path.join(env_path, "db"),
                  os.path.join(env_path, "db", "trac.db"), os.path.join(env_path, "log"),
                  os.path.join(env_path, "files")):
        if os.path.exists(place) and not os.access(place, os.R_OK | os.W_OK):
            return ("user %s cannot write %s: let it read and write the whole environment, e.g. chown -R %s %s"
                    % (user_name(), place, user_name(), env_path))
    return None


def explain_failed_warmup(spec, error):
    """Why a warm-up request failed, in one line, or None when nothing says.

    For Trac, first a part of the environment this user cannot write, naming
    the user and the chown (Trac's own words name neither).  Then the
    exception behind the failure, when the app reported or raised one; else
    what opening the environment raises, in Trac's words.
    """
    env_path = os.environ.get("TRAC_ENV")
    trac = spec.partition(":")[0].split(".")[0] == "trac" and env_path
    cannot_write = trac and unwritable(env_path)
    if cannot_write:
        return cannot_write
    if error is not None:
        return " ".join(("%s: %s" % (type(error).__name__, error)).split())
    if not trac:
        return None
    try:
        from trac.env import open_environment
        open_environment(env_path, use_cache=True)
    except Exception as problem:  # Trac's own words are the explanation: a TracError or the OS's
        return "TRAC_ENV=%s: %s" % (env_path, " ".join(str(problem).split()))
    return None


def others_serving():
    """How many other workers serve while this one starts: 0 without a launcher, None if it did not say."""
    if launcher_pid() is None:
        return 0  # plain spawn-fcgi re-executes this very process: nobody else serves
    count = os.environ.get("LAUNCHER_READY_WORKERS", "")
    return int(count) if count.isdigit() else None


def warm_failed(limits, status, error):
    """Log why the warm-up failed, what fixes it, and whether the site is served meanwhile."""
    reason = explain_failed_warmup(limits.app, error)
    # Trac refuses to open an environment whose database is older than its
    # code (after an install pulled in a newer Trac) and names the command.
    upgrade = re.search(r'trac-admin\s+"([^"]+)"\s+upgrade', reason or "")
    fix = ('run trac-admin "%s" upgrade' % upgrade.group(1) if upgrade
           else "fix the app or set TRAC_FCGI_WARMUP")
    others = others_serving()
    meanwhile = ("nothing serves this site until then" if others == 0
                 else "1 other worker serves meanwhile" if others == 1
                 else "%d other workers serve meanwhile" % others if others
                 else "the launcher retries with backoff")
    rest = ("trac.log has the rest" if limits.app.startswith("trac.")
            else "the traceback is above" if error is not None and error.__traceback__ is not None
            else None)
    log("warm-failed", path=limits.warmup, status=status, error=reason, serving=others,
        hint="; ".join(part for part in (fix, meanwhile, rest) if part))


# --------------------------------------------------------------------------
# Measuring and talking to the launcher.

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ResidentMemory:
    """Current (not peak) resident size, from one pread of a kept-open /proc/self/statm."""

    def __init__(self):
        self.fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    def __call__(self):
        return int(os.pread(self.fd, 128, 0).split()[1]) * PAGE_SIZE

    @classmethod
    def once(cls):
        """One reading, with no descriptor left open: /proc/self opened before a
        fork would go on naming the process that opened it."""
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE


def sd_notify(message):
    """Send one sd_notify datagram, if someone gave us a NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as error:
            log("notify-failed", message=message, error=error.strerror)


def launcher_pid():
    """The launcher that started us, or None (plain spawn-fcgi, a terminal)."""
    pid = os.environ.get("LAUNCHER_PID", "")
    return int(pid) if pid.isdigit() else None


PR_SET_PDEATHSIG = 1


def hup_when_parent_dies(signum=signal.SIGHUP):
    """Have the kernel send SIGHUP the moment our launcher dies, even by SIGKILL.

    The getppid() check in the main loop covers systems where prctl is not
    to be had, and the race in which the launcher died before this call.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def smaps_rollup(pid="self"):
    """(PSS, private) bytes of a process, or (None, None) where the kernel has no smaps_rollup.

    RSS counts every page a process maps; a worker forked from the mold
    shares most of its pages with the mold and its siblings, so its RSS
    says little of what it costs.  PSS divides each shared page among its
    sharers; private memory is what its exit gives back.
    """
    fields = {}
    try:
        with open("/proc/%s/smaps_rollup" % pid) as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None, None
    if "Pss" not in fields:
        return None, None
    return fields["Pss"], fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


# --------------------------------------------------------------------------
# --replace: this file written over the trac.fcgi that trac-admin deploy wrote.

# What the Python on the replaced file's first line must have; asked of it.
PYTHON_PROBE = """import sys
sys.stdout.write("%d.%d\\n" % sys.version_info[:2])
from importlib.metadata import version
import trac, flup.server.fcgi
sys.stdout.write(version("Trac") + "\\n" + version("flup") + "\\n")
"""


def replace_trac_fcgi(target):
    """Write this file over TARGET, keeping its #! line and its environment path.

    The old file is kept as TARGET.orig; nothing is written unless the Python
    on its first line has what this file needs.
    """
    try:
        with open(target) as old_file:
            old = old_file.read()
        old_mode = os.stat(target)
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput("--replace %s: cannot read it (%s): give the path of the trac.fcgi that "
                         "trac-admin ENV deploy DIR wrote, DIR/cgi-bin/trac.fcgi"
                         % (target, getattr(error, "strerror", None) or error))
    first_line = old.split("\n", 1)[0]
    if not first_line.startswith("#!"):
        raise BadInput("--replace %s: its first line is not #! and the Python that runs it: "
                         "give the trac.fcgi that trac-admin deploy wrote" % target)
    python = first_line[2:].strip()
    check_python(python, target)
    found = environment_assignments(old, target)
    with open(os.path.abspath(__file__)) as own:
        new = own.read()
    new = first_line + "\n" + new.split("\n", 1)[1]
    for name, value in found.items():
        new = re.sub(r"^DEFAULT_%s = .*$" % name, lambda _: "DEFAULT_%s = %r" % (name, value), new,
                     count=1, flags=re.MULTILINE)
    backup = target + ".orig"
    ours = "DEFAULT_TRAC_ENV =" in old
    if not ours:
        if os.path.exists(backup):
            raise BadInput("--replace %s: %s exists already; move it away first, so that neither "
                             "old file is lost" % (target, backup))
        shutil.copy2(target, backup)
    making = target + ".new"
    with open(making, "w") as new_file:
        new_file.write(new)
    os.chmod(making, stat.S_IMODE(old_mode.st_mode) | stat.S_IXUSR)
    if os.geteuid() == 0:
        os.chown(making, old_mode.st_uid, old_mode.st_gid)
    os.replace(making, target)
    if found:
        said = ", ".join("%s=%s (from its %s line)" % (n, v, n) for n, v in found.items())
    else:
        said = ("no TRAC_ENV line found in it: set TRAC_ENV in its environment, or edit DEFAULT_TRAC_ENV "
                "at its top")
    sys.stdout.write("trac-fcgi: replaced %s%s; Python %s (its first line); %s\n"
                     "test it as the user that runs it: %s --check\n"
                     % (target, "" if ours else " (the old one is %s)" % backup, python, said, target))
    return 0


def check_python(python, target):
    """Refuse, naming the fix, unless PYTHON runs Trac 1.6 and flup 1.0.3 on Python 3.9+."""
    try:
        probe = subprocess.run(shlex.split(python) + ["-c", PYTHON_PROBE], capture_output=True, text=True,
                               timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BadInput("--replace %s: its first line names %s, which cannot be run (%s): fix that line"
                         % (target, python, getattr(error, "strerror", None) or error))
    lines = probe.stdout.split()
    pip = "%s -m pip install 'Trac>=1.6,<1.7' flup==1.0.3 'setuptools<81'" % python
    if not lines or tuple(int(n) for n in lines[0].split(".")) < (3, 9):
        raise BadInput("--replace %s: its first line names %s, which is Python %s; Trac 1.6 needs "
                         "Python 3.9 or newer (Trac 1.4 on Python 2 is not supported): make a virtualenv "
                         "with python3 -m venv, install Trac 1.6 there, and put its python on that line"
                         % (target, python, lines[0] if lines else "2 or unknown"))
    if probe.returncode or len(lines) < 3:
        missing = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise BadInput("--replace %s: its first line names %s, which cannot import Trac and flup (%s): %s"
                         % (target, python, missing, pip))
    if not lines[1].startswith("1.6") or lines[2] != "1.0.3":
        raise BadInput("--replace %s: its first line names %s, which has Trac %s and flup %s; this file "
                         "needs Trac 1.6 and flup 1.0.3: %s" % (target, python, lines[1], lines[2], pip))


def environment_assignments(text, target):
    """{"TRAC_ENV" or "TRAC_ENV_PARENT_DIR": path} that a trac.fcgi sets, as trac-admin writes it
    (os.environ['TRAC_ENV'] = '...'), as an admin may (os.environ.setdefault), or as this file does."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        raise BadInput("--replace %s: it is not Python 3 (Trac 1.4 on Python 2 is not supported); "
                         "give the trac.fcgi that Trac 1.6's trac-admin deploy wrote" % target)
    names = ("TRAC_ENV", "TRAC_ENV_PARENT_DIR")
    found = {}

    def text_of(node):
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target_node, value = node.targets[0], text_of(node.value)
            if isinstance(target_node, ast.Subscript) and ast.unparse(target_node.value) == "os.environ":
                key = text_of(target_node.slice)
            elif isinstance(target_node, ast.Name) and target_node.id.startswith("DEFAULT_"):
                key = target_node.id[len("DEFAULT_"):]
            else:
                continue
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "os.environ.setdefault" \
                and len(node.args) == 2:
            key, value = text_of(node.args[0]), text_of(node.args[1])
        else:
            continue
        if key in names and value:
            found[key] = value
    return found


def replace_command(args):
    try:
        if len(args) != 1:
            raise BadInput("--replace takes one path: trac_fcgi.py --replace DIR/cgi-bin/trac.fcgi")
        return replace_trac_fcgi(args[0])
    except BadInput as problem:
        sys.stderr.write("trac-fcgi: %s\n" % problem)
        return 2


# Before flup is imported: --replace runs under any Python 3, since the Python
# that must have flup is the one on the replaced file's first line.
if __name__ == "__main__" and sys.argv[1:2] == ["--replace"]:
    sys.exit(replace_command(sys.argv[2:]))


# --------------------------------------------------------------------------
# The server.

try:
    from flup.server import fcgi_base  # noqa: E402  (after the settings an admin edits)
    from flup.server.fcgi import WSGIServer  # noqa: E402
    from flup.server.threadpool import ThreadPool  # noqa: E402
except ImportError as missing:
    # Run as a script by a Python that lacks flup (`./trac_fcgi.py` finds the
    # first python3 on PATH): say which Python, and how to give it flup.
    flup_missing = ("%s cannot import flup (%s): install what this file needs with %s -m pip install "
                    "flup==1.0.3 'Trac>=1.6,<1.7' 'setuptools<81', or run it with a Python that has them"
                    % (sys.executable, missing, sys.executable))
    if __name__ != "__main__":
        raise ImportError(flup_missing) from missing  # imported: the importer decides what to say
    if answered_without_serving(sys.argv[1:]):
        sys.exit(0)
    sys.stderr.write("trac-fcgi: %s\n" % flup_missing)
    sys.exit(2)


class QueueingThreadPool(ThreadPool):
    """flup's pool, told never to refuse a job.

    Stock flup closes a connection when no thread is idle, which nginx
    turns into a 502.  The server below accepts only when one of its threads
    is free, so a job handed in here always finds a thread; queueing only
    covers the instant between a thread finishing a request and flup marking
    it idle.
    """

    def addJob(self, job, allowQueuing=True):
        return ThreadPool.addJob(self, job, allowQueuing=True)

    def _worker(self):
        # Only the main thread takes the stop signals.  A signal that a pool
        # thread took just before a re-exec would be lost with the old image.
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        ThreadPool._worker(self)


def web_server_gone(sock):
    """Has the web server closed its end of this connection?  Unread data does not hide it.

    On a unix socket the kernel reports a full close as POLLHUP, and a mere
    shutdown of the sending side as POLLRDHUP alone, so only a real close
    counts.  TCP cannot tell the two apart until we write, and web servers
    do half-close: lighttpd shuts down its sending side once the request is
    written, on unix sockets and loopback TCP alike.  So on TCP nothing
    counts as gone, and the request runs, as it always did.
    """
    if sock.family != socket.AF_UNIX:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    events = poller.poll(0)
    return bool(events and events[0][1] & select.POLLHUP)


def request_start(header):
    """X-Request-Start, as nginx sends it (t=${msec}): when the web server began on the request.

    Seconds since the epoch, or milli- or microseconds as some proxies write it; 0 if absent or unreadable.
    """
    try:
        value = float(header.strip().removeprefix("t="))
    except ValueError:
        return 0.0
    if not 0 < value < 1e17:  # nan, inf and nonsense say nothing
        return 0.0
    while value > 1e11:  # milli- or microseconds
        value /= 1000
    return value


class DeadlineSocket:
    """A client socket on which the whole of each request must arrive within one deadline.

    flup reads with no time limit, so a client that sends nothing, stops
    mid-record, or trickles a byte a second would pin a thread for good.
    A per-recv() timeout stops only the first two; a deadline for the
    request stops all three.
    """

    def __init__(self, sock, seconds):
        self._sock, self.seconds = sock, seconds
        self.expired = False
        self.restart()

    def restart(self):
        self.deadline = time.monotonic() + self.seconds

    def recv(self, size):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.expired = True
            raise socket.timeout("the request took longer than TRAC_FCGI_IDLE_TIMEOUT to arrive")
        self._sock.settimeout(remaining)
        return self._sock.recv(size)

    def send(self, data):
        # Writing is bounded on its own: a slow reader gets the full timeout.
        self._sock.settimeout(self.seconds)
        return self._sock.send(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


# What flup's record decoding raises on bytes that are not FastCGI (a
# name-value pair longer than its record, a BEGIN_REQUEST body of the wrong
# size): the client's fault, not ours, when flup's own code raises it.
MALFORMED_RECORD = (IndexError, struct.error)


class CountedConnection(fcgi_base.Connection):
    """A FastCGI connection counted from the moment it is accepted until it is closed.

    Counting from accept, not from when a thread picks the job up, closes the
    "accepted but not started" gap: flup's shutdown() drops a queued job,
    and we never call it while the count is above zero.
    """

    # Far above what nginx sends (its request headers fit in 32 KiB by
    # default), far below what would move a worker's memory.
    MAX_PARAMS_BYTES = 1 << 20

    def __init__(self, sock, addr, server, timeout):
        fcgi_base.Connection.__init__(self, DeadlineSocket(sock, server.limits.idle_timeout), addr,
                                      server, timeout)
        server.connections.opened(self)
        self.params_bytes = 0
        self.cut_off = False
        self.kept_alive = False  # has served a request and stays open for more
        self.answered_at = None  # when its last request's end went out
        # Since when the next request has waited for us: from accept for the
        # first, from its first record for a later one on a kept-alive
        # connection (idle time between requests is nobody's wait).
        self.waiting_since = time.monotonic()
        self.request = None  # the request the application is running, for the drain's log

    def run(self):
        try:
            fcgi_base.Connection.run(self)
        except OSError:
            pass  # the client went away, or took too long: the connection ends, nothing to fix here
        except Exception as error:
            self.report(error)  # ends this connection only, and is never swallowed
        finally:
            if self._sock.expired:
                self.server.idle_connection_closed(self._addr)
            self._sock.close()  # again, for a connection that ended in an exception
            self.server.connections.closed(self)

    def report(self, error):
        """One line for a client's malformed records; for a bug of ours, the line and its traceback."""
        peer = self._addr or "unix"
        where = traceback.extract_tb(error.__traceback__)[-1:]
        line = traceback.format_exception_only(type(error), error)[-1].strip()
        if isinstance(error, MALFORMED_RECORD) and where and where[0].filename == fcgi_base.__file__:
            log("bad-request", reason="malformed record (%s)" % line, peer=peer)
            return
        at = "%s:%d" % (os.path.basename(where[0].filename), where[0].lineno) if where else None
        log("connection-error", error=line, at=at, peer=peer)
        traceback.print_exception(type(error), error, error.__traceback__)  # 3 arguments, as Python 3.9 wants

    def process_input(self):
        # flup waits for the next record in 1 s selects for as long as the
        # connection is open.  Three reasons to stop waiting: the request is
        # taking too long to arrive; or the connection is between requests
        # (kept alive by nginx, which retries a request that finds a cached
        # connection closed) and we are draining, or the server has released
        # it to free its thread for a connection waiting in the backlog.
        between_requests = self.kept_alive and not self._requests
        if between_requests:
            self.server.connections.now_idle(self)
        try:
            while self._keepGoing:
                ready, _, _ = select.select([self._sock], [], [], PERIOD_S)
                if ready:
                    break
                if self.server.draining and not self._requests:
                    raise EOFError
                if time.monotonic() > self._sock.deadline:
                    self._sock.expired = self.cut_off = True
                    raise EOFError
        finally:
            if between_requests and self.server.connections.now_busy(self):
                # Whatever nginx may have just written is left unread: nginx
                # retries it on another connection, and it never runs twice.
                self.cut_off = True
                raise EOFError
        return fcgi_base.Connection.process_input(self)

    def _start_request(self, req):
        # flup runs a request as soon as its parameters are in.  A web server
        # that gave up on it meanwhile (its client left, or its read timeout
        # passed while the request waited in the backlog) has closed the
        # connection: running it now would change the site for nobody to
        # see the answer, and nginx may even have said 504 already.
        req.arrived(self.waiting_since)
        if web_server_gone(self._sock):
            log("dropped", reason="the web server closed the connection before the request ran",
                **req.facts())
            self.cut_off = True
            raise EOFError
        self.request = req
        req.thread = threading.get_ident()
        try:
            req.run()
        finally:
            self.request = None

    def writeRecord(self, rec):
        req = self._requests.get(rec.requestId)
        try:
            fcgi_base.Connection.writeRecord(self, rec)
        except OSError as error:
            if req is not None and not req.undelivered:
                req.undelivered = True
                log("undelivered", error=errno.errorcode.get(error.errno, type(error).__name__),
                    bytes_sent=req.bytes_sent, **req.facts())
            raise
        if req is not None and rec.type == fcgi_base.FCGI_STDOUT:
            req.bytes_sent += rec.contentLength

    def _do_begin_request(self, inrec):
        self.waiting_since = self.waiting_since or time.monotonic()
        fcgi_base.Connection._do_begin_request(self, inrec)

    def _do_params(self, inrec):
        self.params_bytes += inrec.contentLength
        if self.params_bytes > self.MAX_PARAMS_BYTES:
            log("bad-request", reason="params over %d bytes" % self.MAX_PARAMS_BYTES, peer=self._addr or "unix")
            self.cut_off = True
            raise EOFError
        fcgi_base.Connection._do_params(self, inrec)

    def end_request(self, req, appStatus=0, protocolStatus=fcgi_base.FCGI_REQUEST_COMPLETE, remove=True):
        # Taken before the client can learn the request is over: how long a
        # kept-alive connection has been idle is never confused by how soon
        # its thread got back to wait (see Connections.release_idle).
        self.answered_at = time.monotonic()
        fcgi_base.Connection.end_request(self, req, appStatus, protocolStatus, remove)
        # The next request on a kept-alive connection gets its own deadline.
        self._sock.restart()
        self.kept_alive = True
        self.params_bytes = 0
        self.waiting_since = None
        # On a draining worker a kept-alive connection ends with its current
        # request.  Under steady load nginx reuses it at once, so waiting for
        # it to fall idle would keep the drain going until its timeout, and
        # then cut off whatever was running (found by the signal-storm test).
        # For the same reason, a connection gives its thread up here to one
        # waiting in the backlog.
        if not self._requests and (self.server.draining or self.server.connections.give_thread_up(self)):
            self._keepGoing = False

    def _cleanupSocket(self):
        # flup lingers until the client closes, with no time limit, holding
        # its thread.  We linger as Apache does, a couple of seconds at most
        # (nginx closes at once), and not at all for a client we cut off.
        if not self.cut_off:
            self._sock.deadline = time.monotonic() + LINGER_S
            try:
                self._sock.shutdown(socket.SHUT_WR)
                while self._sock.recv(4096):
                    pass
            except OSError:
                pass
            # A client slow to close after its answer was not an idle one.
            self._sock.expired = False
        self._sock.close()


class CountedRequest(fcgi_base.Request):
    """Counts requests and measures memory after each one, before its client learns it is over.

    Measured before FCGI_END_REQUEST goes out, the client's next request can
    only arrive once the main loop can know we are past the limit.  It also
    knows enough about itself to name itself in a log line.
    """

    counted = False
    undelivered = False  # a write of its answer failed, and was logged
    bytes_sent = 0       # of its answer (FCGI_STDOUT: headers and body)
    started = None       # when its parameters were in, and it was due to run
    thread = None        # the thread running it, for its stack
    late = None          # "slow" or "stuck" once named so (see LateRequests)
    waited_s = None

    def arrived(self, waiting_since):
        """Called once its parameters are in: how long it waited to get here."""
        self.started = time.monotonic()
        queued = request_start(self.params.get("HTTP_X_REQUEST_START", ""))
        self.waited_s = max(0.0, time.time() - queued if queued else self.started - waiting_since)

    def facts(self):
        """What a log line says about this request."""
        params = self.params
        return {"method": params.get("REQUEST_METHOD"),
                "path": params.get("SCRIPT_NAME", "") + params.get("PATH_INFO", ""),
                "client": params.get("REMOTE_ADDR"),
                "waited_s": self.waited_s}

    def _end(self, appStatus=0, protocolStatus=fcgi_base.FCGI_REQUEST_COMPLETE):
        self.count()
        fcgi_base.Request._end(self, appStatus, protocolStatus)

    def run(self):
        turn = self.server.request_turns.take()
        try:
            self.server.refreezer.request_starting()
            try:
                fcgi_base.Request.run(self)
            finally:
                self.count()  # also a request whose client went away before its end
        finally:
            self.server.request_turns.done(turn)

    def count(self):
        if not self.counted:
            self.counted = True
            self.server.request_finished()
            # The application's objects are gone by now (flup dropped its
            # response before ending the request).  Done before the client
            # learns the request is over, its next one finds a freeze due.
            self.server.refreezer.request_done(self.server.requests)


class RequestTurns:
    """Requests take turns to run the application, first come first served; one whose turn is over
    (TRAC_FCGI_TURN) lets the next one start beside it.

    Python runs one thread at a time, and Trac's work is nearly all Python.
    Eight requests at once hand the interpreter over at every database call
    and every switch interval, and each page then costs more than it does
    alone: on /wiki/WikiStart a worker serves about a third more pages when
    its requests take turns (bench/results/turns.md has the figures and the
    command).  The threads stay, for what is not Python's work: connections
    kept alive by nginx, requests arriving, answers going out.  A request
    that waits on something else (a database lock, a repository, another
    site) or simply runs long keeps the next one out for its turn only, so
    that a stuck request never holds the worker up; the slow and stuck
    checks (LateRequests) see it as before.
    """

    def __init__(self, turn_s):
        self.turn_s = turn_s
        self.lock = threading.Lock()
        self.waiting = collections.deque()  # an Event per request waiting for its turn, first come first
        self.latest = None                  # the Event of the request that started last, until it is done
        self.latest_started = None

    def take(self):
        """Wait for this request's turn; returns what done() takes back."""
        mine = threading.Event()
        if not self.turn_s:
            return mine
        with self.lock:
            self.waiting.append(mine)
        try:
            while True:
                with self.lock:
                    now = time.monotonic()
                    wait = self.wait_s(mine, now)
                    if wait == 0:
                        self.waiting.popleft()
                        self.latest, self.latest_started = mine, now
                        self.wake_first()  # it times its wait from now
                        return mine
                    mine.clear()
                mine.wait(wait)
        except BaseException:
            with self.lock:
                if mine in self.waiting:
                    self.waiting.remove(mine)
                    self.wake_first()
            raise

    def wait_s(self, mine, now):
        """0 if MINE may start now; else how long to wait before asking again, None for until woken.

        Only the first in line may start, once the request that started last
        is done or its turn is over.  Every request that started before it
        had had its turn by then, so the one that started last is the only
        one to wait for.
        """
        if self.waiting[0] is not mine:
            return None
        if self.latest is None:
            return 0
        return max(0.0, self.latest_started + self.turn_s - now)

    def done(self, mine):
        with self.lock:
            if self.latest is mine:
                self.latest = None
                self.wake_first()

    def wake_first(self):
        if self.waiting:
            self.waiting[0].set()


class Connections:
    """Every accepted connection until it closes (see CountedConnection), and which kept-alive one gives its
    thread up.

    nginx keeps connections open between requests (fastcgi_keep_conn), and
    each holds one of our threads while it waits for its next request.  With
    every thread held so, a connection in the backlog would wait until nginx
    gave up on it with a 504, however idle the kept ones are.  So when one
    waits, a kept-alive connection gives its thread up: preferably at the
    end of its request, where nginx learns of it with the response; else,
    once it has been idle a while, which nginx's most-recently-used cache
    makes the least likely to be reused next.  One at a time: each frees a
    thread.
    """

    def __init__(self, max_threads, wake):
        self.max_threads, self.wake = max_threads, wake
        self.lock = threading.Lock()
        self.open = set()
        # Kept-alive connections holding a thread while they wait for their
        # next request (each knows when its last answer went out); whether
        # a connection waits in the backlog for a thread; and the connection
        # closing to give it one.
        self.idle = set()
        self.backlog_waiting = False
        self.releasing = None
        self.draining = False  # set once, as the worker stops accepting

    def __len__(self):
        return len(self.open)

    def opened(self, connection):
        with self.lock:
            self.open.add(connection)

    def closed(self, connection):
        with self.lock:
            self.open.discard(connection)
            was_full = len(self.open) == self.max_threads - 1
            if self.releasing is connection:
                self.releasing = None
            self.backlog_waiting = False  # a thread is free: the main loop accepts again
        if was_full or self.draining:
            self.wake()

    def requests(self):
        """The requests the application is running now."""
        with self.lock:
            return [connection.request for connection in self.open if connection.request is not None]

    def give_thread_up(self, connection):
        """Called at the end of a request: True if this connection should close."""
        with self.lock:
            if not self.backlog_waiting or self.releasing is not None:
                return False
            self.releasing = connection
            return True

    def now_idle(self, connection):
        with self.lock:
            self.idle.add(connection)

    def now_busy(self, connection):
        """Called as an idle connection wakes: True if the server released it meanwhile."""
        with self.lock:
            self.idle.discard(connection)
            return self.releasing is connection

    def release_idle(self):
        with self.lock:
            if not self.backlog_waiting or self.releasing is not None or not self.idle:
                return
            # The one idle longest, by its last answer: the order in which
            # threads got back to wait is the scheduler's, not nginx's.
            connection = min(self.idle, key=lambda idle: idle.answered_at)
            if time.monotonic() - connection.answered_at < RELEASE_IDLE_S:
                return
            self.idle.remove(connection)
            self.releasing = connection
        try:
            connection._sock.shutdown(socket.SHUT_RD)  # wakes its thread's select()
        except OSError:
            pass  # the client closed it first: its thread is on its way out


# --------------------------------------------------------------------------
# The server: connections, accept, signals and the drain; the mode is its succession's.

class RecyclingWSGIServer(WSGIServer):
    """flup's threaded FastCGI server that replaces itself before it grows too big.

    flup's own main loop (ThreadedServer.run) cannot keep our promises through
    its hooks, so _serve() below replaces it, and says why at each point.
    _mainloopPeriodic() is still called on every pass, as in flup.
    """

    request_class = CountedRequest

    def __init__(self, application, limits, succession, bindAddress=None, first_freeze_at=1):
        # ThreadedServer.__init__ would start a stock pool's threads only for
        # us to replace it, so only the FastCGI half is initialised here.
        fcgi_base.BaseFCGIServer.__init__(self, application, multithreaded=True, multiprocess=True,
                                          bindAddress=bindAddress, multiplexed=False)
        # Every thread is started up front and none dies off, so "a thread is
        # free" is simply "fewer connections than threads".
        self._threadPool = QueueingThreadPool(minSpare=1, maxSpare=limits.max_threads,
                                              maxThreads=limits.max_threads)
        self.limits = limits
        self.succession = succession
        self.rss = ResidentMemory()
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.requests = 0
        self.stopped_because = None  # why we stopped accepting; None while we accept
        self.stacks_asked = False    # SIGUSR2 came
        self.accept_paused_until = 0.0
        self.reported = ("REQUESTS=0", 0.0)  # the counts last told the launcher, and when
        # Threads and signal handlers wake the main loop through this pipe.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.connections = Connections(limits.max_threads, self.wake)
        self.refreezer = Refreezer(limits.gc_freeze, self.wake, first_at=first_freeze_at)
        self.request_turns = RequestTurns(limits.turn)
        self.late = LateRequests(limits)
        self.watchdog = Watchdog(os.environ)

    @property
    def draining(self):
        return self.connections.draining

    # -- called from connection threads ---------------------------------------

    def request_finished(self):
        with self.lock:
            self.requests += 1
        # Measured after every request, so the hard limit is overshot by at
        # most what the requests in flight allocate: one each.
        if self.limits.max_rss and self.rss() >= self.limits.max_rss and not self.draining:
            self.wake()

    def idle_connection_closed(self, addr):
        log("idle-closed", peer=addr or "unix", idle_timeout_s=self.limits.idle_timeout)

    def wake(self):
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake

    # -- the main loop -----------------------------------------------------

    def _serve(self, sock):
        """Accept only with a thread free; never block in accept(); wake at once on a signal."""
        # O_NONBLOCK lives on the open file description that the launcher and
        # every worker share.  We set it knowingly: a worker that loses the race
        # for a connection must get EAGAIN, not sleep in accept(): Python
        # retries a call that a signal interrupts, so the loop would not see
        # the signal until a connection came.
        sock.setblocking(False)
        while not self.draining:
            watch = [self.wake_r]
            # With every thread busy, the backlog is watched only to learn
            # that a connection waits there (see Connections).
            if not self.connections.backlog_waiting and time.monotonic() >= self.accept_paused_until:
                watch.append(sock)
            ready, _, _ = select.select(watch, [], [], PERIOD_S)
            if self.wake_r in ready:
                self.drain_pipe()
            self.refreezer.poll(self.requests)
            # The limits first: a connection is never accepted past MAX_RSS.
            self._mainloopPeriodic()
            if sock in ready and not self.draining:
                if len(self.connections) < self.limits.max_threads:
                    self.accept(sock)
                else:
                    self.connections.backlog_waiting = True
            self.connections.release_idle()

    def accept(self, sock):
        try:
            client, addr = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays in the backlog for a worker that can
                # take it; pausing keeps select() from spinning on it.
                if time.monotonic() - self.accept_paused_until > 10:
                    log("accept-failed", error=error.strerror, connections=len(self.connections),
                        hint="raise the open-files limit (ulimit -n) or lower TRAC_FCGI_MAX_THREADS")
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            raise
        client.setblocking(True)
        if not self._isClientAllowed(addr):
            log("refused-peer", peer=addr[0], allowed=",".join(self._web_server_addrs))
            client.close()
            return
        self._threadPool.addJob(CountedConnection(client, addr, self, None))

    def _isClientAllowed(self, addr):
        # FCGI_WEB_SERVER_ADDRS names IP addresses; it says nothing about unix
        # sockets, whose peers have no address (flup would refuse them all).
        if not isinstance(addr, tuple) or self._web_server_addrs is None:
            return True
        return addr[0] in self._web_server_addrs

    def drain_pipe(self):
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _mainloopPeriodic(self):
        """Called on every pass of the main loop: what is due, asked of the policy and the succession."""
        now = time.monotonic()
        self.look_after(now)
        if self.draining:
            return
        self.report()
        reason = self.succession.may_stop()
        if reason is None:
            rss = self.rss()
            crossed = crossed_limit(self.limits, rss, self.requests, now - self.started, self.late.stuck_in_flight)
            if crossed == HARD_LIMIT:
                reason = self.succession.hard_limit(crossed)
            elif crossed:
                reason = self.succession.limit_crossed(crossed, requests=self.requests, rss=rss,
                                                       age_s=now - self.started)
        if reason:
            self.stop_accepting(reason)

    def look_after(self, now):
        """What the main loop does while serving and while draining alike: beat, name late requests, stacks."""
        self.watchdog.beat(now)
        frames = None
        for event, request in self.late.check(self.connections.requests(), now):
            frames = frames or sys._current_frames()
            log(event, details=thread_stack(request.thread, frames), running_s=now - request.started,
                **request.facts())
        if self.stacks_asked:
            self.stacks_asked = False
            self.log_stacks(now)

    def log_stacks(self, now):
        """SIGUSR2: every thread's stack, each with the request it serves, as one entry."""
        serving = {request.thread: request for request in self.connections.requests()}
        lines, frames = [], sys._current_frames()
        for thread in threading.enumerate():
            request = serving.get(thread.ident)
            facts = " ".join("%s=%s" % (key, "%.3f" % value if isinstance(value, float) else value)
                             for key, value in dict(request.facts(), running_s=now - request.started).items()
                             if value is not None) if request else "idle"
            lines.append("thread=%s %s" % (thread.name.replace(" ", ""), facts))
            lines.extend("  " + line for line in thread_stack(thread.ident, frames))
        log("stacks", details=lines, threads=threading.active_count(), in_flight=len(serving))

    def stop_accepting(self, reason):
        self.stopped_because = reason
        self.connections.draining = True
        self.refreezer.stop()
        log("drain", reason=reason, connections=len(self.connections), requests=self.requests, rss=self.rss())

    # -- signals -------------------------------------------------------------

    def _hupHandler(self, signum, frame):
        self.succession.on_hup()

    def _intHandler(self, signum, frame):
        self.succession.on_stop(signal.Signals(signum).name)

    def _usr2Handler(self, signum, frame):
        self.stacks_asked = True  # logged by the main loop: a handler may interrupt a lock's holder

    def _installSignalHandlers(self):
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum, handler in ((signal.SIGHUP, self._hupHandler), (signal.SIGTERM, self._intHandler),
                                (signal.SIGINT, self._intHandler), (signal.SIGUSR2, self._usr2Handler)):
            signal.signal(signum, handler)
        # Held since our previous image's exec or READY=1 (see HELD_SIGNALS):
        # what arrived during our start-up is delivered here, to the handlers.
        held = sorted(s.name for s in signal.sigpending() & HELD_SIGNALS)
        if held:
            log("held-signals", signals=",".join(held))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)

    # -- the request's environment ---------------------------------------------

    def _sanitizeEnv(self, environ):
        """PATH_INFO exactly as the web server sent it, as stock trac.fcgi takes it.

        Web servers decode PATH_INFO, as CGI says, and Trac's default FastCGI
        server (trac.web._fcgi) uses it as it comes.  flup instead rebuilds an
        empty one from the still-quoted REQUEST_URI, which is why Trac's
        TRAC_USE_FLUP mode unquotes every PATH_INFO again: a page named
        "Odd%41Name" would then be served as "OddAName".  So this is stock's
        version, not flup's.
        """
        environ.setdefault("SCRIPT_NAME", "")
        environ.setdefault("PATH_INFO", "")
        for name, default in (("REQUEST_METHOD", "GET"), ("SERVER_NAME", "localhost"),
                              ("SERVER_PORT", "80"), ("SERVER_PROTOCOL", "HTTP/1.0")):
            environ.setdefault(name, default)

    # -- start and finish ------------------------------------------------------

    def _setupSocket(self):
        """--bind's socket, or flup's: fd 0, or one CGI request and exit outside FastCGI.

        flup wraps fd 0 as AF_INET whatever it is; we rewrap it with its real
        family, so unix peers are told apart from TCP ones, and check that it
        listens: accept() on anything else would fail on every pass.
        """
        if self._bindAddress is not None:
            # Ours, not flup's: flup unlinks whatever is at a unix path first.
            try:
                return bind_socket(*self._bindAddress)
            except BadInput as problem:
                raise BadInput("--bind: %s" % problem)
        if not stat.S_ISSOCK(fd0_mode()):
            # flup tells CGI from FastCGI by wrapping fd 0 as a socket, which
            # Python 3 refuses for a non-socket before flup can look.
            self.forceCGI = True
        try:
            sock = WSGIServer._setupSocket(self)
            real = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as error:
            hint = ("raise the open-files limit (ulimit -n)" if error.errno in (errno.EMFILE, errno.ENFILE)
                    else "start me under spawn-fcgi or trac-fcgi-launcher, or use --bind ADDR")
            raise BadInput("fd 0 cannot be used as the listening socket: %s; %s"
                           % (error.strerror or error, hint))
        sock.close()
        if not real.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise BadInput("fd 0 is a socket but not a listening one: start me under spawn-fcgi "
                           "or trac-fcgi-launcher, or use --bind ADDR")
        return real

    def run(self, sock):
        """Serve until told to go, drain, and hand over as the succession says; the requests abandoned."""
        self._web_server_addrs = os.environ.get("FCGI_WEB_SERVER_ADDRS")
        if self._web_server_addrs is not None:
            self._web_server_addrs = [a.strip() for a in self._web_server_addrs.split(",")]
        self._installSignalHandlers()
        self._serve(sock)
        # Stop accepting: close our handle.  fd 0 itself stays open, for the
        # re-exec and because the launcher holds the socket anyway.
        sock.close()
        abandoned = self.finish_accepted()
        self.succession.drained(self, self.stopped_because, abandoned)
        return abandoned

    def finish_accepted(self):
        """Wait, up to the drain timeout, until every accepted connection is closed or holds a stuck request.

        A stuck request will not finish in any drain timeout: waiting for it
        would only keep this worker's memory and its healthy neighbours' exit.
        """
        started = time.monotonic()
        deadline = started + self.limits.drain_timeout
        while time.monotonic() < deadline:
            self.look_after(time.monotonic())
            if len(self.connections) <= self.late.stuck_in_flight:
                break
            select.select([self.wake_r], [], [], min(PERIOD_S, max(0, deadline - time.monotonic())))
            self.drain_pipe()
        abandoned = len(self.connections)
        self.log_abandoned()
        log("drained", drain_s=time.monotonic() - started, abandoned=abandoned, requests=self.requests,
            rss=self.rss())
        return abandoned

    # -- reporting -------------------------------------------------------------

    def counts(self):
        """REQUESTS=, and SLOW= and STUCK= once above 0: this worker's counts since it started."""
        lines = ["REQUESTS=%d" % self.requests]
        lines += ["%s=%d" % (event.upper(), n) for event, n in self.late.counts.items() if n]
        return "\n".join(lines)

    def report(self):
        """The counts when they changed, at most once every REPORT_EVERY_S (only a launcher listens)."""
        now, counts = time.monotonic(), self.counts()
        if counts != self.reported[0] and now - self.reported[1] >= REPORT_EVERY_S:
            self.reported = (counts, now)
            self.succession.report(counts)

    def log_abandoned(self):
        """One line for each request still running as the drain ends: what its client loses."""
        now = time.monotonic()
        for request in self.connections.requests():
            log("abandoned", running_s=now - request.started, bytes_sent=request.bytes_sent,
                stuck=request.late == "stuck" or None, **request.facts())


# --------------------------------------------------------------------------
# The recycling policy: plain decisions over plain numbers (tests/test_policy.py).

HARD_LIMIT = "max_rss"


def crossed_limit(limits, rss, requests, age_s, stuck):
    """The limit this worker has crossed, or None.

    MAX_RSS is the hard one, a promise: past it the worker stops accepting
    at once.  The others are soft: the worker asks for its replacement and
    serves on until it comes.  A stuck request (STUCK of them in flight)
    comes first among those, as the one that holds a thread for good.
    """
    if limits.max_rss and rss >= limits.max_rss:
        return HARD_LIMIT
    if stuck:
        return "stuck"
    if limits.soft_rss and rss >= limits.soft_rss:
        return "rss"
    if limits.max_requests and requests >= limits.max_requests:
        return "requests"
    if limits.max_lifetime and age_s >= limits.max_lifetime:
        return "age"
    return None


def lateness(limits, running_s):
    """'stuck' past TRAC_FCGI_REQUEST_TIMEOUT, 'slow' past TRAC_FCGI_SLOW_REQUEST, else None (0 turns either off)."""
    if limits.request_timeout and running_s >= limits.request_timeout:
        return "stuck"
    if limits.slow_request and running_s >= limits.slow_request:
        return "slow"
    return None


class LateRequests:
    """Names each request in flight once as it turns slow and once as it turns stuck, and counts them.

    Run by the main loop alone, over the requests in flight (at most
    MAX_THREADS of them): it needs no free thread, so a worker whose every
    thread is stuck still notices.
    """

    ORDER = (None, "slow", "stuck")

    def __init__(self, limits):
        self.limits = limits
        self.counts = {"slow": 0, "stuck": 0}  # since start, for the launcher's metrics
        self.stuck_in_flight = 0

    def check(self, in_flight, now):
        """The (event, request) pairs newly due, slow before stuck; IN_FLIGHT are requests with .started."""
        due, stuck = [], 0
        for request in in_flight:
            reached = lateness(self.limits, now - request.started)
            named = getattr(request, "late", None)
            for event in self.ORDER[self.ORDER.index(named) + 1:self.ORDER.index(reached) + 1]:
                if event == "slow" and not self.limits.slow_request:
                    continue  # slow-request entries are off; stuck ones are not
                self.counts[event] += 1
                due.append((event, request))
            request.late = reached if self.ORDER.index(reached) > self.ORDER.index(named) else named
            stuck += request.late == "stuck"
        self.stuck_in_flight = stuck
        return due


def thread_stack(thread_id, frames):
    """The Python stack of one thread, as lines, innermost last (as a traceback reads).

    A request's stack starts with a dozen frames of threading, flup and
    this file, the same for every request: they are left out up to the
    application's first, so what is read is where it hangs.
    """
    frame = frames.get(thread_id)
    if frame is None:
        return ["(no Python stack)"]
    stack = traceback.extract_stack(frame)
    ours = (threading.__file__, fcgi_base.__file__, sys.modules["flup.server.threadpool"].__file__, __file__)
    first = next((n for n, entry in enumerate(stack) if entry.filename not in ours), 0)
    return [line for entry in traceback.format_list(stack[first:]) for line in entry.rstrip("\n").split("\n")]


class Watchdog:
    """systemd's watchdog contract (sd_watchdog_enabled): WATCHDOG=1 every quarter of WATCHDOG_USEC.

    Sent from the main loop and the drain, the code that stops when the
    worker freezes, never from a thread of its own, which would go on
    beating for a worker that serves nobody.
    """

    def __init__(self, environ):
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())  # set by systemd for its main process alone
        self.period = int(usec) / 4e6 if usec.isdigit() and int(usec) and mine else None
        self.last = 0.0

    def first(self, message):
        """MESSAGE (READY=1, or the mold's MOLD=1) with the first beat, so the watching begins as the serving does."""
        if self.period is None:
            return message
        self.last = time.monotonic()
        return message + "\nWATCHDOG=1"

    def due(self):
        """When the next beat is due (infinity with no watchdog), for a loop that waits on something else."""
        return float("inf") if self.period is None else self.last + self.period

    def beat(self, now):
        if now >= self.due():
            self.last = now
            sd_notify("WATCHDOG=1")


# --------------------------------------------------------------------------
# Succession: how a worker hands over to the one after it, one object per mode.
#
# Chosen once at start (succession_for), each answers the same questions,
# and the server asks them without knowing the mode: a signal came
# (on_hup, on_stop); may I stop accepting now (may_stop); a soft limit was
# crossed (limit_crossed); the hard limit was reached (hard_limit); what
# the launcher's metrics hear (report); I have drained, what next (drained).
# Each returns the reason to stop accepting now, or None to serve on.

class UnderLauncher:
    """Started by trac-fcgi-launcher: ask it for a replacement, go when it says (SIGHUP)."""

    def __init__(self, launcher):
        self.launcher = launcher
        hup_when_parent_dies()
        self.told = None           # the signal that told us to go
        self.asked = None          # when we last asked for a replacement
        self.asked_for = None      # and for which reason

    def on_hup(self):
        # The launcher's "go": our replacement serves (or we are being stopped).
        self.told = self.told or "SIGHUP"

    def on_stop(self, name):
        self.told = name

    def may_stop(self):
        if self.told:
            return self.told
        if os.getppid() != self.launcher:
            return "launcher gone"
        return None

    def hard_limit(self, reason, **facts):
        return reason  # the promise: stop now, replacement ready or not; connections wait in the backlog

    def limit_crossed(self, reason, requests, **facts):
        # Standard signals coalesce: two workers asking at once can reach the
        # launcher as one, so an unanswered ask is repeated every REASK_S.
        now = time.monotonic()
        # Told again only of a request stuck since the first ask: the launcher counts why.
        news = self.asked_for is None or (reason == "stuck" != self.asked_for)
        if not news and now - self.asked < REASK_S:
            return None
        if news:
            self.asked_for = reason
            pss, private = smaps_rollup()
            log("recycle", reason=reason, pss=pss, private=private, requests=requests, next="ask launcher",
                **facts)
            sd_notify("RECYCLE=%s" % reason)
        self.asked = now
        # Only our own launcher, never init or spawn-fcgi (may_stop stops us if it is gone).
        if os.getppid() == self.launcher:
            os.kill(self.launcher, signal.SIGUSR1)
        return None

    def report(self, counts):
        sd_notify(counts)

    def ready(self):
        pass  # the launcher saw READY=1 and does the rest

    def drained(self, server, reason, abandoned):
        if os.getppid() != self.launcher:
            return  # a launcher that is gone has nobody listening
        # The final counts and what was abandoned, for the launcher's metrics;
        # and why we stopped, if the launcher cannot know it (it did not tell us to go).
        own = "max_rss" if reason == HARD_LIMIT else "signal" if reason.startswith("SIG") else None
        sd_notify("STOPPING=1\n%s\nABANDONED=%d%s" % (server.counts(), abandoned,
                                                      "\nRECYCLE=%s" % own if own else ""))


class InPlace:
    """Plain spawn-fcgi, mod_fcgid, lighttpd: nobody to ask.  Drain, then exec in place, while a stand-in serves.

    fd 0 survives exec, so new connections wait in the backlog.  Until our
    reload turn comes, we keep serving.  With --bind there is nothing to
    exec onto: the process drains and exits.
    """

    def __init__(self, environ, can_reexec):
        self.turn = ReloadTurn(environ)
        self.can_reexec = can_reexec
        self.told = None
        self.reexec = False
        self.waiting_for_turn = False
        # Stand-ins that served while this image started (see drained()).
        self.stand_ins = [int(pid) for pid in environ.pop(STAND_IN_VARIABLE, "").split(",") if pid.isdigit()]

    def on_hup(self):
        # A graceful reload: drain, then exec.  Never turns a SIGTERM into one.
        if self.told is None:
            self.told, self.reexec = "SIGHUP", True

    def on_stop(self, name):
        self.told, self.reexec = name, False

    def may_stop(self):
        self.reap_stand_ins()
        if self.told and (not self.reexec or self.turn_to_reload(self.told)):
            return self.told
        return None

    def hard_limit(self, reason, **facts):
        # Turn or no turn: the limit is a promise.
        self.reexec = True
        self.turn.take()
        return reason

    def limit_crossed(self, reason, requests, **facts):
        pss, private = smaps_rollup()
        if self.turn_to_reload(reason, requests=requests, pss=pss, private=private, **facts):
            self.reexec = True
            return reason
        return None

    def turn_to_reload(self, reason, **facts):
        """True once this process may reload: no other process of its pool is reloading."""
        if self.turn.take():
            log("recycle", reason=reason, next="re-exec", **facts)
            return True
        if not self.waiting_for_turn:
            self.waiting_for_turn = True
            log("recycle", reason=reason, next="wait for turn", **facts)
        return False

    def report(self, counts):
        pass  # nobody gathers metrics

    def ready(self):
        """Our new image serves: the stand-ins that served while it started may go, and so may the turn."""
        for pid in self.stand_ins:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
        if self.turn.release():
            log("reloaded")  # our pool's next process may take its turn

    def reap_stand_ins(self):
        for pid in list(self.stand_ins):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.stand_ins.remove(pid)

    def drained(self, server, reason, abandoned):
        sd_notify("STOPPING=1")
        if not (self.reexec and self.can_reexec):
            return
        # Re-executing leaves nobody on the socket while the new image
        # imports Trac and warms up; under mod_fcgid, which hands each
        # process its own socket, one request waits that long at every
        # reload.  So a copy of us serves meanwhile: warm at once (a fork),
        # it holds the old image's memory only until the new one is ready.
        # Not when requests were abandoned (stuck, or past the drain
        # timeout): their threads may hold Trac's environment lock, a
        # database connection mid-query or a log handler's lock, and a fork
        # has those locks held by threads it does not have; its first request
        # could wait on them for good.  The new image comes up from the
        # backlog instead, and exec ends the stuck threads.  Nor past
        # MAX_RSS: a copy would be as big, and serve past the promise.
        if not abandoned and reason != HARD_LIMIT:
            self.fork_stand_in(server)
        self.turn.keep_across_exec()
        reexec()

    def fork_stand_in(self, server):
        close_trac_databases()  # an SQLite (or any) connection must not be used on both sides of a fork
        pid = os.fork()
        if pid:
            self.stand_ins.append(pid)
            os.environ[STAND_IN_VARIABLE] = ",".join(map(str, self.stand_ins))
            return
        status, abandoned = 1, 0
        try:
            parent = os.getppid()
            hup_when_parent_dies()  # also if the new image dies starting up
            self.turn.forget()      # our copy only: the parent holds the turn
            # The fork has only this thread: a fresh server, pool and locks,
            # as a newly started worker has, and our own /proc/self.
            stand_in = RecyclingWSGIServer(server.application, server.limits, StandIn(parent),
                                           first_freeze_at=FORKED_FIRST_FREEZE)
            log("stand-in", serves_for=parent, requests=server.requests, rss=stand_in.rss())
            abandoned = stand_in.run(socket.socket(fileno=os.dup(0)))
            status = 0
        finally:
            leave(status, abandoned=abandoned)


class StandIn:
    """A fork of a worker about to re-exec, serving while the new image starts; it goes when that one serves."""

    def __init__(self, parent):
        self.parent = parent
        self.told = None

    def on_hup(self):
        self.told = self.told or "SIGHUP"  # from our parent's new image: it serves

    def on_stop(self, name):
        self.told = name

    def may_stop(self):
        if self.told:
            return self.told
        if os.getppid() != self.parent:
            return "parent gone"
        return None

    def hard_limit(self, reason, **facts):
        return reason

    def limit_crossed(self, reason, requests, **facts):
        return None  # a stand-in never recycles: it goes once its parent's new image serves

    def report(self, counts):
        pass

    def ready(self):
        pass

    def drained(self, server, reason, abandoned):
        pass  # a stand-in's going is no news


def succession_for(environ, bind):
    """The mode, chosen once: under our launcher, or in place (re-exec only where fd 0 is the socket)."""
    launcher = launcher_pid()
    return UnderLauncher(launcher) if launcher is not None else InPlace(environ, can_reexec=bind is None)


# --------------------------------------------------------------------------
# Reloading in place (no launcher): signals held across exec, one process of a pool at a time.

# The signals a worker acts on.  Before its handlers are in, each would have
# its default effect and kill it; so they stay blocked from just before a
# re-exec (or READY=1) until the new image has installed its handlers.  The
# mask survives exec, and what arrived meanwhile is acted on once it serves.
HELD_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2}
# The reload turn's file crosses exec under this fd number, and the stand-in
# serving meanwhile is named by its pid (internal, never settings).
TURN_FD_VARIABLE = "TRAC_FCGI_RELOAD_TURN_FD"
STAND_IN_VARIABLE = "TRAC_FCGI_STAND_IN_PID"


class ReloadTurn:
    """One re-exec at a time among the processes that serve one site without a launcher.

    mod_fcgid, lighttpd with max-procs above 1, or spawn-fcgi -F N start
    several copies of this script that share no parent of ours; with the same
    limits they would cross them together and all reload at once, leaving
    nobody to serve.  The turn is an flock on a file in a directory that only
    this user may write, so only this user's processes can hold it (an
    abstract socket name, which any local user could bind first, would turn
    recycling off for the whole pool).  The kernel frees it when its holder
    dies, however it dies; the holder keeps it across exec and gives it up
    once its new image serves.  Where no such file can be had, each process
    reloads without waiting for a turn, and says so once: a pool that may
    reload together is better than one that never reloads.
    """

    def __init__(self, environ):
        self.file_name = self.file_name_for(sys.argv[0], environ)
        self.fd = None
        self.unavailable = False
        fd = environ.pop(TURN_FD_VARIABLE, "")
        if fd.isdigit():
            try:  # handed over by our previous image
                os.set_inheritable(int(fd), False)
                self.fd = int(fd)
            except OSError:
                pass

    @staticmethod
    def directory():
        """$XDG_RUNTIME_DIR, or /tmp/trac-fcgi-UID as tmux makes its own: ours, and closed to others."""
        directory = os.environ.get("XDG_RUNTIME_DIR") or "/tmp/trac-fcgi-%d" % os.geteuid()
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PermissionError(errno.EPERM, "not a directory of user %s's alone" % user_name(), directory)
        return directory

    @staticmethod
    def file_name_for(script, environ):
        """The same script and Trac environment: the processes of one pool (the directory is the user's)."""
        site = "\0".join([os.path.realpath(script), environ.get("TRAC_ENV", ""),
                          environ.get("TRAC_ENV_PARENT_DIR", "")])
        return "reload-%s.lock" % hashlib.sha256(site.encode()).hexdigest()[:24]

    def take(self):
        """True if we hold the turn (now or already), or if no turn can be had."""
        if self.fd is not None or self.unavailable:
            return True
        try:
            path = os.path.join(self.directory(), self.file_name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as error:
            self.unavailable = True
            log("reload-turn-unavailable", path=error.filename, error=error.strerror,
                hint="each process of the pool reloads without waiting for the others; set XDG_RUNTIME_DIR "
                     "to a directory only this user may write")
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # another process of the pool is reloading
        self.fd = fd
        return True

    def keep_across_exec(self):
        if self.fd is not None:
            os.set_inheritable(self.fd, True)
            os.environ[TURN_FD_VARIABLE] = str(self.fd)

    def forget(self):
        """In a stand-in: close our copy only.  The lock belongs to the open file, which the parent still holds."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self):
        if self.fd is not None:
            # Unlocked before closing: a stand-in forked while we held it may
            # still have its copy of the file open.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.forget()
            return True
        return False


def reexec():
    """Exec ourselves in place: fd 0, the listening socket, survives, and so does the turn.

    Exec ends every other thread, also one stuck in a request for good.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    log("re-exec")
    os.execv(sys.executable, [sys.executable] + sys.argv)


def close_trac_databases():
    """Close every Trac environment's pooled database connections: before a fork, and on leaving.

    An SQLite (or any) connection must not be used on both sides of a fork;
    the process that forks is about to exec, and the stand-in opens its own.
    """
    env_module = sys.modules.get("trac.env")
    if env_module is None:
        return  # not Trac
    from trac.db.api import DatabaseManager
    with env_module.env_cache_lock:
        for env in list(env_module.env_cache.values()):
            try:
                DatabaseManager(env).shutdown()
            except Exception as error:  # a plugin's database; the stand-in reconnects
                log("db-shutdown-failed", error=error)


# --------------------------------------------------------------------------
# Freezing the warm set.
#
# Trac ends every request with a full gc.collect() (in the finally of
# trac.web.main.dispatch_request).  In a warm worker that collection walks
# some 50,000 objects (Trac's modules, components, caches and compiled
# templates, which live as long as the worker) to find the few hundred the
# request left behind: most of a page's CPU time.  gc.freeze() moves every
# live object into a generation the collector never walks, so that
# collection walks only what came after.  The cost: cyclic garbage among
# frozen objects is never collected.  Only what was live at a freeze can
# leak so, once; recycling bounds it like any other growth.  (The CGI
# fallback serves its one request inside _setupSocket and exits: it never
# gets as far as freezing.)

# How long new requests may wait for the requests in flight to finish, so
# that a freeze finds none.  Past it they go ahead and the freeze waits for
# the next point of the schedule: a slow report must not stall the site.
FREEZE_WAIT_S = 1.0
# The first freeze of a worker forked from the mold (or of a stand-in, forked
# from a worker).  The mold froze what its warm-up made and every template it
# compiled, so the early doublings (after requests 1, 2, 4 ... 32) catch
# almost nothing there, and each closes the gate until the requests in
# flight are done: in a worker replaced every 50 requests they made most of
# the slowest requests while recycling (bench/results/recycle-tail.md).  A
# worker exec'd cold still starts at 1.
FORKED_FIRST_FREEZE = 64


def freeze_warm_set():
    """Collect, then freeze every object still alive; return how many are frozen.

    Collecting first keeps garbage out of the frozen set, where it would
    never be collected.  Call it only with no request in flight: a request's
    objects frozen mid-way would leak the same way.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class Refreezer:
    """Freezes again as the worker warms further, at a moment when no request is in flight.

    Trac keeps making long-lived objects after the warm-up (templates,
    environments, cache entries), and each one left unfrozen is walked by
    every request's collection, so the worker freezes again after requests
    1, 2, 4, 8 and so on (64, 128 ... in a worker forked from the mold, see
    FORKED_FIRST_FREEZE), without end: a cap would leave Trac's still
    growing set walked for good, and a threshold would need the young
    objects counted at every request (README.md, "Freezing the warm set",
    has the measurements).  gc.freeze() is global, so a freeze must not
    catch a request half-way: when one is due the gate closes, arriving
    requests wait in request_starting() until those in flight are done
    (see CountedRequest.count), and the main loop, which runs no request,
    freezes and opens the gate; or, past wait_s, postpones it.
    """

    def __init__(self, enabled, wake, wait_s=FREEZE_WAIT_S, first_at=1):
        self.enabled = enabled
        self.wake = wake              # wakes the main loop, which polls us
        self.wait_s = wait_s
        self.lock = threading.Condition()
        self.in_flight = 0
        self.next_at = first_at       # the request count at which to freeze next
        self.closed_at = None         # when the gate closed; None while it is open
        self.freezing = False

    # -- from connection threads --------------------------------------------

    def request_starting(self):
        """Called before the application runs: wait while a freeze is due or under way."""
        with self.lock:
            while self.freezing or (self.closed_at is not None and not self.slow_in_flight()):
                self.lock.wait(None if self.freezing or not self.in_flight
                               else self.closed_at + self.wait_s - time.monotonic())
            self.in_flight += 1

    def slow_in_flight(self):
        """Whether requests in flight have kept a due freeze waiting too long: it is postponed (see poll).

        With none in flight the main loop, woken, is about to freeze: wait
        for it, however slow the machine.  The main loop polls for as long
        as it serves, and stop() opens the gate when it stops.
        """
        return self.in_flight > 0 and time.monotonic() >= self.closed_at + self.wait_s

    def request_done(self, requests):
        """Called once the application and its response are done; REQUESTS counts this one."""
        with self.lock:
            self.in_flight -= 1
            if self.enabled and self.closed_at is None and requests >= self.next_at:
                self.closed_at = time.monotonic()
                while self.next_at <= requests:
                    self.next_at *= 2
            ready = self.closed_at is not None and not self.in_flight
        if ready:
            self.wake()

    # -- from the main loop ------------------------------------------------------

    def poll(self, requests):
        """Freeze if the gate is closed and no request is in flight; postpone if they take too long."""
        with self.lock:
            if self.closed_at is None or (self.in_flight and not self.slow_in_flight()):
                return
            waited, in_flight = time.monotonic() - self.closed_at, self.in_flight
            postponed = in_flight > 0
            if postponed:
                self.closed_at = None
                self.lock.notify_all()
            else:
                self.freezing = True
        if postponed:
            log("freeze-postponed", in_flight=in_flight, waited_s=waited, next_at=self.next_at)
            return
        try:
            frozen = freeze_warm_set()
        finally:
            with self.lock:
                self.freezing = False
                self.closed_at = None
                # Under load the requests in flight when the gate closed end
                # before the freeze: the next one is due only at the next
                # doubling past them, not at once.
                while self.next_at <= requests:
                    self.next_at *= 2
                self.lock.notify_all()
        log("freeze", frozen=frozen, requests=requests, waited_s=waited)

    def stop(self):
        """No more freezing: a draining worker only finishes what it has accepted, with no gate."""
        with self.lock:
            self.enabled = False
            self.closed_at = None
            self.lock.notify_all()


# --------------------------------------------------------------------------
# --bind: the listening socket, made without destroying anything.
# Written the same in launcher.py, whose --bind reads the same addresses;
# tests/test_twins.py holds each pair equal.

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


# Written the same in launcher.py too.
def user_name():
    """Who the kernel checks file access against: the effective user, the one a message must name."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "uid %d" % os.geteuid()


# --------------------------------------------------------------------------
# Run by hand: a test, not a server.

BY_HAND = """\
%(prog)s is a drop-in trac.fcgi (trac-fcgi %(version)s): a FastCGI server for Trac.
spawn-fcgi, trac-fcgi-launcher or a web server starts it with a listening
socket on fd 0.  Here fd 0 is not a socket and no CGI variables are set, so
there is nothing to serve.  To test it, as the user that runs Trac:

  TRAC_ENV=/path/to/env %(prog)s --check
      opens the environment, serves one request in-process, prints the status,
      time, memory and settings; exits 0, or 1 with the reason
  TRAC_ENV=/path/to/env %(prog)s --bind 127.0.0.1:9000
      serves FastCGI there; then ask it for a page:
      REQUEST_METHOD=GET SERVER_NAME=localhost SERVER_PORT=80 SERVER_PROTOCOL=HTTP/1.1 \\
          PATH_INFO=/ cgi-fcgi -bind -connect 127.0.0.1:9000

%(prog)s --help lists its settings and signals.
"""


def versions(*distributions):
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for name in distributions:
        try:
            found.append("%s %s" % (name, version(name)))
        except PackageNotFoundError:
            found.append("%s (version unknown)" % name)
    return ", ".join(found)


def started_by_hand():
    """No socket on fd 0 and no CGI request described: a person ran us, in a terminal or a script.

    A mold has /dev/null on fd 0 too, and its channel to the launcher instead.
    """
    if any(name in os.environ for name in ("REQUEST_METHOD", "GATEWAY_INTERFACE", "FCGI_FORCE_CGI", MOLD_FD)):
        return False
    try:
        return not stat.S_ISSOCK(os.fstat(0).st_mode)
    except OSError:
        return False  # fd 0 closed: fd0_mode() says so


def check():
    """--check: would this worker serve?  Prints what it found; 0 if it would, 1 with the reason if not."""
    out = sys.stdout.write
    given = set(os.environ)  # before DEFAULT_TRAC_ENV and the egg cache are filled in
    out("trac-fcgi --check: %s as user %s (uid %d)\n" % (os.path.abspath(sys.argv[0]), user_name(), os.geteuid()))
    out("  python       %s: Python %s, %s\n" % (sys.executable, sys.version.split()[0], versions("Trac", "flup")))
    try:
        limits = Limits(os.environ)
        path = limits.warmup or "/"
        started = time.monotonic()
        application = load_application(limits.app)
        for name in ("TRAC_ENV", "TRAC_ENV_PARENT_DIR", "PYTHON_EGG_CACHE"):
            if name in os.environ:
                default = "default" if name == "PYTHON_EGG_CACHE" else "DEFAULT_%s, at the top of the file" % name
                out("  %-12s %s=%s%s\n" % ("environment" if name.startswith("TRAC") else "egg cache", name,
                                           os.environ[name], "" if name in given else " (%s)" % default))
        status, error = warm_up(application, path)
        warm_s, rss = time.monotonic() - started, ResidentMemory.once()
        out("  warm-up      GET %s -> %d in %.2f s (import included)\n" % (path, status, warm_s))
        soft = size(limits.raw["TRAC_FCGI_SOFT_RSS"] or "0") or limits.max_rss * 9 // 10
        out("  memory       %.1f MiB resident once warm%s\n" % (rss / 2**20, "; asks for its replacement at "
            "%.1f MiB (+-%g), stops accepting at %.1f MiB" % (soft / 2**20, limits.jitter, limits.max_rss / 2**20)
            if limits.max_rss else "; no memory limit (TRAC_FCGI_MAX_RSS=0)"))
        if status >= 500:
            raise BadInput(explain_failed_warmup(limits.app, error) or "%s answered %d to %s; set [logging] "
                             "log_type = stderr in the environment's trac.ini to see why" % (limits.app, status, path))
        # A page that reads may well work for a user who cannot write; the first edit would not.
        cannot_write = os.environ.get("TRAC_ENV") and unwritable(os.environ["TRAC_ENV"])
        if cannot_write:
            raise BadInput(cannot_write)
        limits.check_headroom(rss)
    except BadInput as problem:
        sys.stdout.flush()
        sys.stderr.write("trac-fcgi --check: failed: %s\n" % problem)
        return 1
    out("  settings     %s\n" % "\n               ".join(
        "%s=%s%s" % (name, limits.raw[name] if limits.raw[name] is not None else "(%s)" % meaning.split("(default ")[-1]
                     .rstrip(")"), "" if name in os.environ else " (default)")
        for name, _, _, meaning in SETTINGS))
    out("ok: this worker serves; start it under spawn-fcgi or trac-fcgi-launcher\n")
    return 0


# The mold: a warm, frozen process that the launcher's workers are forked from.
#
# A cold worker imports Trac, opens the environment and serves a warm-up
# request: about a second of CPU.  The mold does that once; each worker
# forked from it starts warm within milliseconds, and shares with the mold
# and its siblings every page that neither writes.  The mold never serves:
# the launcher starts it with /dev/null on fd 0 and hands it the listening
# socket only along with each fork request, for the worker to take.
#
# Forking a process that has run code is safe only for what that code left
# in a state a child can inherit.  Each hazard is named where it is avoided.

# How Trac loads a template of each kind, by its name's suffix: pages and
# feeds from its HTML Jinja environment, notification mails from the text one
# (an overlay with a cache of its own).
TEMPLATE_SUFFIXES = {".html": False, ".rss": False, ".xml": False, ".txt": True}


def compile_templates():
    """Compile every template of every open Trac environment; return how many.

    The warm-up compiles only the templates its page uses.  A worker forked
    from the mold would compile each other one on its first view of a page
    that needs it: about 9 ms of CPU a template, paid again by every worker.
    With a recycle every 20 requests that doubled the CPU per request
    (measured with `make bench`).  Compiled here once, in the mold (Trac 1.6's
    own 83 in 0.7 s and 4 MiB), they are shared by every worker.  Plugins'
    templates are among them: each ITemplateProvider names its directories,
    and the site's own templates/ is one of them.  A name found in several
    directories is the first one's, as Trac renders it.
    """
    env_module = sys.modules.get("trac.env")
    if env_module is None:
        return 0  # not Trac
    from trac.web.chrome import Chrome
    compiled = 0
    for env in list(env_module.env_cache.values()):
        try:
            chrome = Chrome(env)
            directories = chrome.get_all_templates_dirs()
        except Exception as error:  # a plugin's template provider: its pages will say so
            log("templates-failed", env=env.path, error=error)
            continue
        names = {os.path.relpath(os.path.join(parent, name), directory)
                 for directory in directories for parent, _, files in os.walk(directory)
                 for name in files if os.path.splitext(name)[1] in TEMPLATE_SUFFIXES}
        for name in sorted(names):
            try:
                chrome.load_template(name, text=TEMPLATE_SUFFIXES[os.path.splitext(name)[1]])
                compiled += 1
            except Exception as error:  # a broken template: the page that uses it reports it
                log("template-failed", name=name, error=error)
    return compiled


MOLD_FD = "TRAC_FCGI_MOLD_FD"
# A forked worker waits at most this long for its middle parent to exit, so
# that it has been reparented to the launcher (a child subreaper).
REPARENT_TIMEOUT_S = 5.0
# Between fork requests the mold compares what it warmed with the disk this
# often: a stat of each trac.ini and plugins/ entry, and one query of each
# environment's `system` table, about a millisecond in all.
STALE_CHECK_S = 5.0


class WarmedState:
    """What the mold warmed, as the disk had it then; changed() names what no longer matches.

    Each check is the one Trac makes itself, so the mold is stale exactly when
    a worker forked from it would throw its environment away:
    `Configuration.parse_if_needed()` compares each trac.ini's and [inherit]
    file's mtime with the one it parsed; plugins are loaded once, when an
    environment opens, from its plugins/ directory and [inherit] plugins_dir;
    and `trac-admin upgrade` rewrites the versions in the `system` table that
    `Environment.needs_upgrade()` compares with the code's.  Only
    environments the mold opened (Trac's env_cache) are checked: under
    TRAC_ENV_PARENT_DIR, any other one is opened cold by the worker that
    serves it anyway.
    """

    def __init__(self):
        self.environments = {}  # path -> (configs, plugins listing, system table)
        env_module = sys.modules.get("trac.env")
        for env in list(env_module.env_cache.values()) if env_module else []:
            configs = self.configs(env.config)
            self.environments[env.path] = (
                {filename: mtime for filename, mtime in configs}, self.plugins(env), self.system_table(env))

    def changed(self):
        """(reason, environment path) of the first thing that changed, or None."""
        env_module = sys.modules.get("trac.env")
        for env in list(env_module.env_cache.values()) if env_module else []:
            if env.path not in self.environments:
                continue
            configs, plugins, system = self.environments[env.path]
            for filename, mtime in configs.items():
                try:
                    if os.path.getmtime(filename) != mtime:
                        return "trac.ini", env.path
                except OSError:
                    return "trac.ini", env.path
            if self.plugins(env) != plugins:
                return "plugins", env.path
            if system is not None and self.system_table(env) not in (system, None):
                return "upgrade", env.path
        return None

    @classmethod
    def configs(cls, config):
        """(file name, mtime as Trac parsed it) of a Configuration and every file it inherits."""
        if not config.filename:
            return []
        mtime = getattr(config, "_lastmtime", None)  # what parse_if_needed() compares
        if mtime is None:
            try:
                mtime = os.path.getmtime(config.filename)
            except OSError:
                mtime = 0
        found = [(config.filename, mtime)]
        for parent in getattr(config, "parents", []):
            found += cls.configs(parent)
        return found

    @staticmethod
    def plugins(env):
        """Each plugin file or egg's (directory, name, mtime, size), for the directories Trac loads from."""
        directories = [env.plugins_dir]
        try:
            if env.shared_plugins_dir:
                directories.append(env.shared_plugins_dir)
        except Exception:  # an [inherit] section Trac itself could not read: trac.ini says so
            pass
        listing = []
        for directory in directories:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.name == "__pycache__":
                    continue  # Python's own, written when a plugin is imported
                try:
                    info = entry.stat()
                except OSError:
                    continue
                listing.append((directory, entry.name, info.st_mtime_ns, info.st_size))
        return sorted(listing)

    @staticmethod
    def system_table(env):
        """The `system` table's rows, on a connection closed before return; None if it cannot be read.

        Closed at once, as make_pristine does: a pooled connection would be
        forked into the next worker.
        """
        try:
            from trac.db.api import DatabaseManager
            try:
                return sorted(env.db_query("SELECT name, value FROM system"))
            finally:
                DatabaseManager(env).shutdown()
        except Exception:  # a database that is away: the workers say so, not the mold
            return None


class Mold:
    """The launcher's end is a SOCK_SEQPACKET pair: one message per request and reply.

    request: b"fork", then a line KEY=value for each variable the worker
             sets in its environment, with the listening socket attached (SCM_RIGHTS)
    reply:   b"pid N", N being the new worker, already the launcher's child
    The launcher closing its end (or dying) ends the mold.
    """

    def __init__(self, fd):
        self.channel = socket.socket(fileno=fd)
        self.launcher = launcher_pid()
        self.pid = os.getpid()

    @classmethod
    def from_environment(cls):
        """The mold, if the launcher started us as one; else None."""
        fd = os.environ.get(MOLD_FD, "")
        if not fd.isdigit():
            return None
        try:
            return cls(int(fd))
        except OSError:
            return None  # no such fd: we are no mold after all

    def serve_forks(self, freeze):
        """Wait for fork requests: None in a forked worker, or the mold's exit status."""
        # The mold dies with its launcher; a worker forked from it sets its own
        # parent-death signal once it is the launcher's child.
        hup_when_parent_dies(signal.SIGTERM)
        # Ctrl-C in a terminal reaches the whole process group: the mold just goes.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        templates = compile_templates()
        warmed = WarmedState()  # before make_pristine: its database check closes its own connection
        self.make_pristine(freeze)
        # Hazard, threads at fork: only the forking thread survives in the
        # child, and a lock another thread held stays held for good.  The mold
        # starts none (the worker's thread pool is made after the fork); an
        # application that started one is not safe to fork from.
        if threading.active_count() > 1:
            log("mold-refused", threads=threading.active_count(),
                hint="the application started threads while warming up; the launcher execs workers instead")
            return 1
        pss, private = smaps_rollup()
        log("mold", rss=ResidentMemory.once(), pss=pss, private=private, frozen=gc.get_freeze_count(),
            templates=templates)
        watchdog = Watchdog(os.environ)
        sd_notify(watchdog.first("MOLD=1"))
        next_check, stale = time.monotonic() + STALE_CHECK_S, False
        while True:
            # The wait is bounded, so that the mold's heartbeat and its check
            # of the disk run between fork requests.
            wait = min(watchdog.due(), next_check) - time.monotonic()
            self.channel.settimeout(None if wait == float("inf") else max(0.001, wait))
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 4096, 1)
            except InterruptedError:
                continue
            except TimeoutError:
                now = time.monotonic()
                watchdog.beat(now)
                if now >= next_check and not stale:
                    changed = warmed.changed()
                    if changed:
                        # Said once: the launcher starts a new mold, and this one
                        # forks until then.
                        stale = True
                        log("mold-stale", reason=changed[0], env=changed[1])
                        sd_notify("MOLD_STALE=%s" % changed[0])
                    next_check = now + STALE_CHECK_S
                elif now >= next_check:
                    next_check = float("inf")
                continue
            self.channel.settimeout(None)
            if not message:
                log("mold-retired")
                return 0
            command, *variables = message.decode("utf-8", "replace").split("\n")
            if command != "fork" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                self.channel.send(b"error bad request")
                continue
            if self.fork(fds[0], dict(line.partition("=")[::2] for line in variables)):
                return None

    def make_pristine(self, freeze):
        """What the warm-up left that no two processes may share, closed before any fork."""
        # Hazard, shared database handles: a connection forked into two
        # processes is one server session spoken to by both, and the replies
        # interleave ("lost synchronization with server"); SQLite's locks are
        # per process.  Every pooled connection is closed here, and each
        # worker opens its own on its first request.
        trac_env = sys.modules.get("trac.env")
        if trac_env is not None:
            from trac.db.api import DatabaseManager
            for env in list(trac_env.env_cache.values()):
                DatabaseManager(env).shutdown()
        # What warm-up garbage there is goes now, and whatever lives is moved
        # where the collector never writes (TRAC_FCGI_GC_FREEZE): pages it
        # would otherwise touch on each collection stay shared with the workers.
        if freeze:
            freeze_warm_set()
        else:
            gc.collect()

    def fork(self, listener, environ):
        """Double-fork a worker.  True in the worker; in the mold, reply with its pid and return False."""
        pid_r, pid_w = os.pipe()
        middle = os.fork()
        if middle == 0:
            # The middle child forks the worker and exits at once, so the
            # worker is orphaned and the launcher (a child subreaper) adopts
            # it: reaped, signalled and counted by the launcher, as any worker.
            # It leaves by os._exit whatever happens: no atexit handler, no
            # flush of buffers the mold wrote, no unwinding into the mold's loop.
            try:
                os.close(pid_r)
                worker = os.fork()
            except OSError:
                os._exit(1)
            if worker == 0:
                os.close(pid_w)
                self.become_worker(listener, environ)
                return True
            try:
                os.write(pid_w, b"%d" % worker)
            finally:
                os._exit(0)
        os.close(pid_w)
        os.close(listener)
        worker = os.read(pid_r, 32)
        os.close(pid_r)
        os.waitpid(middle, 0)
        # Replied once the middle child is reaped: the worker is the launcher's already.
        self.channel.send(b"pid " + worker if worker else b"error fork failed")
        return False

    def become_worker(self, listener, environ):
        """In the forked worker: take the socket, wait to be the launcher's child, then start."""
        # Hazard, inherited descriptors: the mold's end of the request channel
        # would let a worker read fork requests meant for the mold.
        self.channel.close()
        os.dup2(listener, 0)
        os.close(listener)
        del os.environ[MOLD_FD]
        os.environ.update(environ)
        # Hazard, the parent-death signal: set before the middle child exits,
        # it would fire when the middle child does.  It is set once the
        # launcher is our parent, and getppid() is checked after, in case the
        # launcher died in between.
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != self.launcher:
            if time.monotonic() > deadline:
                log("orphaned", launcher=self.launcher, parent=os.getppid())
                os._exit(1)
            time.sleep(0.001)
        hup_when_parent_dies()
        if os.getppid() != self.launcher:
            os._exit(1)
        # Hazard, random state: every worker would draw the mold's numbers
        # (its jittered limits, anything the application draws).  Python
        # reseeds `random` at fork already; reseeding here says so.  Trac's
        # session ids and form tokens come from os.urandom, which forks safely.
        random.seed()
        log("forked", mold=self.pid)
        # Hazard, inherited locks: a lock held at fork stays held in the child.
        # The mold has one thread, which holds no lock while it forks; logging's
        # handler locks (Trac's log file and stderr handlers among them) are
        # re-made at fork by the logging module itself.
        # Hazard, log files: Trac's log file, opened by the mold, is one open
        # file description shared by every worker.  Trac opens it for appending
        # (O_APPEND), so each write lands whole at the end, as it does for
        # cold workers that each opened the file themselves.
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
