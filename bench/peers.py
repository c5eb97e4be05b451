"""peers.py: the two servers measured beside ours that need no nginx: mod_wsgi, and the ceiling.

    load ──HTTP──> Apache (mod_wsgi daemon mode) ──> trac.wsgi
    driver ──unix socket──> ceiling.py: Trac's WSGI application, called in-process

mod_wsgi is what Trac's own performance page tells an admin to pick: Apache
with WSGIDaemonProcess, WSGIApplicationGroup %{GLOBAL} as Trac's mod_wsgi
page requires, `threads` as our TRAC_FCGI_MAX_THREADS and
`maximum-requests` as our recycling.  It is Debian's libapache2-mod-wsgi-py3,
built against Debian's Python 3.11; python-path puts the venv's
site-packages first, so it serves the same Trac, Jinja2 and Genshi as ours
(its Python is 3.11.2, not the venv's 3.11.7).  Apache starts unprivileged
in bench/work on loopback, as tests/stack.py starts the other fronts.
"""

import os
import re
import shutil
import sys
from pathlib import Path

import rows
from stack import APACHE, unprivileged, web_user
from support import children, free_port

MOD_WSGI = Path("/usr/lib/apache2/modules/mod_wsgi.so")
BENCH = Path(__file__).resolve().parent
VENV_SITE = BENCH.parent / ".venv" / "lib"

APACHE_CONF = """\
ServerRoot "{prefix}"
ServerName localhost
Listen 127.0.0.1:{port}
User {user}
Group {user}
PidFile "{prefix}/apache2.pid"
DefaultRuntimeDir "{prefix}"
Mutex file:{prefix} default
# Apache's log and mod_wsgi's to the bench's stamped log: its recycles are
# mod_wsgi's "Maximum requests reached" lines.
ErrorLog /dev/stderr
LogLevel warn wsgi:info
LoadModule mpm_event_module  /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule wsgi_module       {mod_wsgi}
WSGISocketPrefix {prefix}/wsgi
# No Python in Apache's own children: only the daemon processes run Trac.
WSGIRestrictEmbedded On
WSGIDaemonProcess trac processes={processes} threads={threads} display-name=%{{GROUP}} python-path={site}{options}
# process-group and application-group on the alias load trac.wsgi as each
# daemon process starts, not at its first request (mod_wsgi's preloading).
WSGIScriptAlias / {script} process-group=trac application-group=%{{GLOBAL}}
WSGIProcessGroup trac
WSGIApplicationGroup %{{GLOBAL}}
<Directory {deploy}>
    Require all granted
</Directory>
"""


class Endpoint:
    """Where the load finds a server that is its own HTTP front (Apache with mod_wsgi)."""

    def __init__(self):
        self.port = free_port()

    def url(self, path="/"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def stop(self):
        pass


class ModWsgi:
    """Apache with mod_wsgi in daemon mode; a row's args are WSGIDaemonProcess options, "--maximum-requests" "50"."""
    restart_when_dead = False
    RECYCLE = re.compile(r"mod_wsgi \(pid=(\d+)\): Maximum requests reached")
    THREADS = 15   # trac_fcgi's TRAC_FCGI_MAX_THREADS default

    def command(self, stage, args, processes=1):
        prefix = stage.work / ("apache-wsgi" + stage.name)
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir(parents=True)
        options = "".join(" %s=%s" % (name.lstrip("-"), value) for name, value in zip(args[::2], args[1::2]))
        site = next(VENV_SITE.glob("python3*/site-packages"))
        conf = prefix / "apache2.conf"
        conf.write_text(APACHE_CONF.format(
            prefix=prefix, port=stage.front("apache").port, user=web_user(), mod_wsgi=MOD_WSGI,
            processes=processes, threads=self.THREADS, site=os.path.realpath(site), options=options,
            script=stage.deploy / "cgi-bin" / "trac.wsgi", deploy=stage.deploy / "cgi-bin"))
        return unprivileged([APACHE, "-f", str(conf), "-DFOREGROUND"])

    def workers(self, root):
        """The daemon processes (display-name makes them "(wsgi:trac)"), not Apache's HTTP children."""
        return [pid for pid in children(root) if command_line(pid).startswith("(wsgi:")]

    def recycles(self, lines):
        """When each daemon process first reached maximum-requests.  It logs so at every request it
        serves after that, for as long as requests keep it from its graceful shutdown."""
        first = {}
        for when, line in lines:
            found = self.RECYCLE.search(line)
            if found:
                first.setdefault(found.group(1), when)
        return sorted(first.values())

    def victim(self, root, kills):
        workers = self.workers(root)
        return workers[kills % len(workers)] if workers else None


class OneProcess:
    """A server that is one process: it is its own worker, logs no recycles, and is the one faults kill."""

    def workers(self, root):
        return [root]

    def recycles(self, lines):
        return []

    def victim(self, root, kills):
        return root


class Ceiling(OneProcess):
    """bench/ceiling.py on the bench socket: no HTTP, no FastCGI; the driver asks it for each cell."""
    restart_when_dead = False

    def command(self, stage, args):
        # The driver runs in the venv: its Python is the venv's, as ours's workers.
        paths = sorted(set(rows.cycle(rows.MIX)) | set(rows.WIKI))
        return [sys.executable, str(BENCH / "ceiling.py"), str(stage.socket)] + list(args) + paths


def command_line(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
