"""End to end: a browser's view of nginx -> spawn-fcgi -> launcher -> trac_fcgi -> Trac.

Every process is the real one, every config comes from examples/, and every
response is checked whole: status, body length, and the end of the HTML:
a worker that dies mid-body can still leave nginx a 200.
"""
import collections
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from stack import (EXAMPLES, KEEPALIVE_FRONT, START_TIMEOUT, TRAC_FCGI, Load, Nginx, drains, form_post, http_get,
                   is_trac_page, recycles, terminate, trac_behind_nginx, upstream_block)
from support import LAUNCHER, PYTHON, Process, alive, copy_of_tracked_files, free_port, wait_until

VENV = Path(PYTHON).parent.parent
# Pages that only read.  Trac saves a new session on every /timeline visit of
# a cookieless client, and on one SQLite file those writes queue: on a machine
# loaded past a load average of 40, some waited out Trac's 10 s busy timeout
# and Trac answered 500 "database is locked", whatever the handoffs did.
PAGES = ["/wiki/WikiStart", "/wiki/TracGuide"]
WELCOME = "Welcome to Trac"


def log_tail(process, lines=40):
    return "\n".join(process.log().splitlines()[-lines:])


# --------------------------------------------------------------------------
# Trac through nginx

@pytest.fixture(scope="module")
def site(tmp_path_factory, trac_env):
    """One worker behind nginx, for the tests that only read pages."""
    things = []
    try:
        yield trac_behind_nginx(things, tmp_path_factory.mktemp("site"), trac_env)[0]
    finally:
        for thing in reversed(things):
            thing.stop()


def test_wiki_start_and_timeline_are_whole_trac_pages_through_nginx(site):
    wiki = site.get("/wiki/WikiStart")
    timeline = site.get("/timeline")
    assert is_trac_page(wiki, WELCOME), wiki
    assert is_trac_page(timeline, "Timeline"), timeline
    assert [e["status"] for e in site.access_log() if e["request"].startswith("GET /wiki/WikiStart ")] == [200]


def test_trac_at_the_root_gets_an_empty_script_name_and_the_path_as_path_info(site):
    page = site.get("/wiki/WikiStart")
    assert is_trac_page(page, WELCOME), page
    assert b'href="/wiki/TracGuide"' in page.body
    assert b'href="/chrome/common/css/trac.css"' in page.body
    assert b'href="/trac/' not in page.body


def test_trac_under_a_prefix_gets_the_prefix_as_script_name_and_writes_it_into_every_link(site):
    page = site.get("/trac/wiki/WikiStart")
    assert is_trac_page(page, WELCOME), page
    assert b'href="/trac/wiki/TracGuide"' in page.body
    assert b'href="/trac/chrome/common/css/trac.css"' in page.body
    links = re.findall(rb'href="(/[^"]*)"', page.body)
    assert links and all(link.startswith(b"/trac") for link in links), links
    # /trac itself: an empty PATH_INFO is Trac's start page.
    assert is_trac_page(site.get("/trac"), WELCOME)
    assert is_trac_page(site.get("/trac/timeline"), "Timeline")


# --------------------------------------------------------------------------
# Under load, through recycles

def run_clients_through_recycles(nginx, launcher, clients, want_recycles, least_seconds, most_seconds):
    load = Load(nginx.port, PAGES, clients).run(
        stop=lambda seconds: seconds >= least_seconds and len(recycles(launcher)) >= want_recycles,
        max_seconds=most_seconds)
    report = "%s\n%d recycles\nlauncher log:\n%s\nnginx errors:\n%s" % (
        load.summary(), len(recycles(launcher)), log_tail(launcher), nginx.errors()[-3000:])
    return load, report


def assert_every_answer_whole(load, nginx, report):
    assert load.answers, report
    assert not load.errors(), "connection errors: " + report
    assert not load.non_200(), "non-200 answers: " + report
    assert not load.truncated(), "cut-off bodies: " + report
    statuses = collections.Counter(e["status"] for e in nginx.access_log())
    assert set(statuses) == {200}, "nginx logged %s: %s" % (dict(statuses), report)


def assert_every_drain_finished(launcher, report):
    """A replaced worker finishes what it accepted; it never reaches its drain timeout."""
    unfinished = [d for d in drains(launcher) if d.get("abandoned") != "0"]
    assert not unfinished, "workers abandoned requests at their drain timeout: %s\n%s" % (unfinished, report)


@pytest.mark.parametrize("workers", [1, 2])
def test_sixteen_clients_get_only_whole_200s_through_twenty_recycles(started, tmp_path, trac_env, workers):
    # A worker asks for its replacement after ~20 requests (+-10% jitter): a
    # recycle every second or so at Trac's 40-90 pages a second on two cores,
    # every few seconds on a machine four times slower.  The test waits for
    # the recycles, not for a time in which some machine would fit them.
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env, "--workers", str(workers),
                                        env={"TRAC_FCGI_MAX_REQUESTS": "20"})
    load, report = run_clients_through_recycles(nginx, launcher, clients=16, want_recycles=20,
                                                least_seconds=10, most_seconds=300)
    assert len(recycles(launcher)) >= 20, "too few recycles: " + report
    assert_every_answer_whole(load, nginx, report)
    assert_every_drain_finished(launcher, report)


FRONTS = {"example": {}, "keepalive": KEEPALIVE_FRONT}


@pytest.mark.parametrize("front", FRONTS)
def test_a_single_client_keeps_getting_answers_while_its_worker_is_replaced(started, tmp_path, trac_env, front):
    # One client on one kept-alive HTTP connection: every recycle hands its
    # next request from the old worker to the new one.  A drain that lasts
    # until its timeout means the old worker kept serving new requests
    # instead of letting go (of nginx's kept-alive FastCGI connection, when
    # it keeps one).
    drain_timeout = 20
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env, env={
        "TRAC_FCGI_MAX_REQUESTS": "10", "TRAC_FCGI_DRAIN_TIMEOUT": str(drain_timeout)}, **FRONTS[front])
    load, report = run_clients_through_recycles(nginx, launcher, clients=1, want_recycles=4,
                                                least_seconds=5, most_seconds=180)
    replaced = [int(hup["pid"]) for hup in recycles(launcher)]
    wait_until(lambda: all(launcher.events("exit", pid=pid) for pid in replaced), drain_timeout + 30,
               "every replaced worker to exit:\n" + log_tail(launcher))
    report += "\nlauncher log after the load:\n" + log_tail(launcher)
    assert len(replaced) >= 4, "too few recycles: " + report
    assert_every_answer_whole(load, nginx, report)
    assert_every_drain_finished(launcher, report)
    slow = [d for d in drains(launcher) if float(d["drain_s"]) >= drain_timeout - 1]
    assert not slow, "drains that ran into TRAC_FCGI_DRAIN_TIMEOUT: %s\n%s" % (slow, report)


def test_posts_sent_while_workers_recycle_are_all_answered_by_trac(started, tmp_path, trac_env):
    # examples/nginx.conf never retries a POST, so none may fail on its way
    # through a handoff: each has a connection of its own, which waits in the
    # backlog while workers change.  A search with a valid form token (cookie
    # and field agree) changes nothing in Trac.
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env, env={"TRAC_FCGI_MAX_REQUESTS": "20"})
    body, headers = form_post({"q": "trac", "wiki": "on"})
    load = Load(nginx.port, ["/search"], clients=16, body=body, headers=headers)
    load.run(stop=lambda seconds: seconds >= 10 and len(recycles(launcher)) >= 8, max_seconds=180)
    report = "%s\n%d recycles\nnginx errors:\n%s" % (load.summary(), len(recycles(launcher)), nginx.errors()[-3000:])
    assert len(recycles(launcher)) >= 8, "too few recycles: " + report
    assert_every_answer_whole(load, nginx, report)
    assert all(b"Search" in answer.body for answer in load.answers), report


@pytest.mark.parametrize("front", FRONTS)
def test_more_clients_than_worker_threads_are_all_answered_in_turn(started, tmp_path, trac_env, front):
    # 6 clients, 4 threads, no recycling: 2 connections wait in the backlog.
    # With keepalive, nginx keeps 5-6 connections open and reuses the 4 the
    # worker accepted; the others must get a turn too.
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env, env={"TRAC_FCGI_MAX_THREADS": "4"},
                                        **FRONTS[front])
    load = Load(nginx.port, PAGES, clients=6, timeout=12).run(stop=lambda seconds: seconds >= 8, max_seconds=8)
    report = load.summary()
    assert_every_answer_whole(load, nginx, report)
    assert load.longest_wait() < 10, report


# --------------------------------------------------------------------------
# examples/: each recipe, run as written

def unit_file(path, replacements):
    """A systemd unit's Key=Value lines (commented-out ones under '#Key'), with REPLACEMENTS applied."""
    text = path.read_text()
    for old, new in replacements.items():
        text = text.replace(old, new)
    keys = collections.defaultdict(list)
    for line in text.splitlines():
        match = re.match(r"(#?[A-Za-z]+)=(.*)$", line)
        if match:
            keys[match[1]].append(match[2])
    return keys


def unit_environment(unit):
    environ = {}
    for line in unit["Environment"]:
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            environ[name] = value
    return environ


class NotifySocket:
    """What systemd listens on for sd_notify(): a datagram socket; we keep every message."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []

    def receive(self):
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            pass
        return self.messages

    def said(self, line):
        return [m for m in self.receive() if line in m.splitlines()]

    def wait_for(self, line, count=1, timeout=START_TIMEOUT):
        wait_until(lambda: len(self.said(line)) >= count, timeout, "%d x %s on NOTIFY_SOCKET: %s" % (
            count, line, self.messages))

    def stop(self):
        self.sock.close()


def deployment(tmp_path, trac_env):
    """The examples' paths, mapped into TMP_PATH and this checkout's venv."""
    run = tmp_path / "run"
    run.mkdir()
    return {"/srv/trac/venv": str(VENV), "/srv/trac/project": str(trac_env), "/run/trac": str(run),
            "/srv/trac/venv/bin/trac-fcgi ": TRAC_FCGI + " "}


def test_spawn_fcgi_example_starts_the_launcher_and_its_workers_serve_trac(started, tmp_path, trac_env):
    sock = tmp_path / "trac.sock"
    launcher = Process([str(EXAMPLES / "spawn-fcgi.sh")], tmp_path / "spawn-fcgi.log", env={
        "VENV": str(VENV), "TRAC_ENV": str(trac_env), "SOCKET": str(sock), "WORKERS": "2",
        "TRAC_USER": "", "WEB_GROUP": ""})  # stay root: spawn-fcgi will not switch to uid 0
    started.append(launcher)
    launcher.wait_for("all-ready", workers=2, timeout=START_TIMEOUT)
    assert launcher.events("start")[0]["socket"] == "unix:" + str(sock)
    # spawn-fcgi -n execs the launcher: the script's pid is the launcher's.
    assert "trac-fcgi-launcher[%d]" % launcher.pid in launcher.log()
    nginx = Nginx(tmp_path / "nginx", "unix:" + str(sock))
    started.append(nginx)
    assert is_trac_page(nginx.get("/wiki/WikiStart"), WELCOME)
    assert terminate(launcher) == 0
    assert not os.path.exists(sock) or not connects(str(sock))


def connects(path):
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("exec_start", ["ExecStart", "#ExecStart"], ids=["launcher-binds", "under-spawn-fcgi"])
def test_systemd_service_example_serves_trac_reloads_make_before_break_and_stops_cleanly(
        started, tmp_path, trac_env, exec_start):
    paths = deployment(tmp_path, trac_env)
    unit = unit_file(EXAMPLES / "trac-fcgi.service", paths)
    assert unit["Type"] == ["notify"] and unit["KillMode"] == ["mixed"]
    notify = NotifySocket(tmp_path / "notify.sock")
    started.append(notify)
    environ = dict(unit_environment(unit), NOTIFY_SOCKET=notify.path)
    service = Process(shlex.split(unit[exec_start][0]), tmp_path / "service.log", env=environ)
    started.append(service)

    # Type=notify: systemd counts the service started at READY=1.
    notify.wait_for("READY=1")
    assert service.events("all-ready", workers=2)
    nginx = Nginx(tmp_path / "nginx", "unix:" + paths["/run/trac"] + "/trac.sock")
    started.append(nginx)
    assert is_trac_page(nginx.get("/wiki/WikiStart"), WELCOME)

    # systemctl reload: ExecReload as written, $MAINPID being the launcher.
    subprocess.run(shlex.split(unit["ExecReload"][0].replace("$MAINPID", str(service.pid))), check=True)
    service.wait_for("rolling-restart-done", timeout=START_TIMEOUT)
    assert len(recycles(service)) == 2, log_tail(service)
    notify.wait_for("RELOADING=1")
    notify.wait_for("READY=1", count=2)
    assert is_trac_page(nginx.get("/timeline"), "Timeline")
    # The unit's metrics file, read as `trac-fcgi-launcher status` reads it.
    metrics = paths["/run/trac"] + "/trac.prom"
    status = lambda: subprocess.run([str(VENV / "bin" / "trac-fcgi-launcher"), "status", metrics],
                                    capture_output=True, text=True).stdout
    wait_until(lambda: "recycles: rolling 2" in status(), 30, "the metrics file to show the reload")

    # systemctl stop with KillMode=mixed: SIGTERM to the launcher alone.
    workers = [int(e["pid"]) for e in service.events("spawn")]
    assert terminate(service, timeout=int(unit["TimeoutStopSec"][0])) == 0, log_tail(service)
    assert notify.said("STOPPING=1")
    assert not [pid for pid in workers if alive(pid)]


def test_systemd_unit_examples_are_valid_units_for_systemd_analyze(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing: apt-get install systemd (no running systemd needed)")
    names = ["trac-fcgi.service", "trac-fcgi-socket.socket", "trac-fcgi-socket.service"]
    for name in names:  # the venv moved to where it is here, or verify flags a missing program
        (tmp_path / name).write_text((EXAMPLES / name).read_text().replace("/srv/trac/venv", str(VENV)))
    done = subprocess.run([analyze, "verify", *[str(tmp_path / name) for name in names]],
                          capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done


def test_socket_activated_service_starts_on_the_first_request_and_answers_it(started, tmp_path, trac_env):
    paths = deployment(tmp_path, trac_env)
    socket_unit = unit_file(EXAMPLES / "trac-fcgi-socket.socket", paths)
    service_unit = unit_file(EXAMPLES / "trac-fcgi-socket.service", paths)
    assert service_unit["Requires"] == ["trac-fcgi-socket.socket"]
    listen = socket_unit["ListenStream"][0]
    notify = NotifySocket(tmp_path / "notify.sock")
    started.append(notify)
    # systemd-socket-activate does what systemd does: it holds the socket,
    # and on the first connection execs ExecStart with LISTEN_FDS=1 and
    # LISTEN_PID set, the socket on fd 3, and only the unit's environment.
    environ = dict(unit_environment(service_unit), NOTIFY_SOCKET=notify.path)
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is missing: apt-get install systemd (no running systemd needed)")
    argv = [activate, "-l", listen]
    argv += ["--setenv=%s=%s" % item for item in environ.items()]
    service = Process(argv + shlex.split(service_unit["ExecStart"][0]), tmp_path / "service.log")
    started.append(service)
    wait_until(lambda: os.path.exists(listen), 30, "systemd-socket-activate to listen on " + listen)
    nginx = Nginx(tmp_path / "nginx", "unix:" + listen)
    started.append(nginx)
    assert not service.events("start"), "the launcher started before any connection"

    first = nginx.get("/wiki/WikiStart", timeout=START_TIMEOUT)
    assert is_trac_page(first, WELCOME), (first, service.log())
    start = service.events("start")
    assert start and start[0]["socket"] == "unix:" + listen
    assert "trac-fcgi-launcher[%d]" % service.pid in service.log()  # exec'd in place, as systemd does
    notify.wait_for("READY=1")
    assert is_trac_page(nginx.get("/timeline"), "Timeline")
    assert terminate(service, timeout=int(service_unit["TimeoutStopSec"][0])) == 0, log_tail(service)


def start_machine(started, tmp_path, trac_env, name):
    """One "machine": the launcher bound to its own TCP port, accepting FastCGI from nginx only."""
    for attempt in range(5):
        port = free_port()
        machine = Process([PYTHON, LAUNCHER, "--bind", "127.0.0.1:%d" % port, "--", TRAC_FCGI],
                          tmp_path / ("machine-%s.log" % name),
                          env={"TRAC_ENV": str(trac_env), "FCGI_WEB_SERVER_ADDRS": "127.0.0.1"})
        started.append(machine)
        wait_until(lambda: machine.events("all-ready") or machine.popen.poll() is not None, START_TIMEOUT,
                   "machine %s to be ready:\n%s" % (name, machine.log()))
        if machine.events("all-ready"):
            machine.address = "127.0.0.1:%d" % port
            return machine
    raise AssertionError("no free port for machine %s:\n%s" % (name, machine.log()))


def test_two_machines_behind_one_upstream_share_requests_and_one_covers_when_the_other_stops(
        started, tmp_path, trac_env):
    a, b = (start_machine(started, tmp_path, trac_env, name) for name in "ab")
    nginx = Nginx(tmp_path / "nginx", None, upstream=upstream_block(a.address, b.address))
    started.append(nginx)

    answers = [nginx.get(PAGES[n % 2]) for n in range(20)]
    assert all(answer.ok for answer in answers), answers
    served_by = collections.Counter(e["upstream"].split(",")[-1].strip() for e in nginx.access_log())
    assert set(served_by) == {a.address, b.address}, served_by

    assert terminate(a) == 0
    before = len(nginx.access_log())
    answers = [nginx.get(PAGES[n % 2]) for n in range(20)]
    assert all(answer.ok for answer in answers), (answers, nginx.errors())
    after = nginx.access_log()[before:]
    assert {e["upstream"].split(",")[-1].strip() for e in after} == {b.address}, after


# --------------------------------------------------------------------------
# make demo

def processes_mentioning(text):
    """Live processes whose command line or environment names TEXT."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                mine = Path("/proc/%s/cmdline" % entry).read_bytes() + Path("/proc/%s/environ" % entry).read_bytes()
            except OSError:
                continue
            if text.encode() in mine and alive(int(entry)):
                found.append(int(entry))
    return found


def fresh_checkout(directory):
    """The tracked files as a fresh clone has them, with the test run's virtualenv as its .venv."""
    copy_of_tracked_files(directory)
    (directory / ".venv").symlink_to(Path(PYTHON).parent.parent)
    return directory


class MakeDemo:
    """`make demo` in its own process group, as in a terminal, its output read as it comes."""

    def __init__(self, checkout, directory, port, seconds):
        # -o serve-venv -o serve-debs: both are there already, and remaking
        # the venv here could pull it from under other test runs (what they
        # install is test_make_demo_installs_only_what_serving_needs's).  The
        # demo recipe itself is the one the README's `make demo` runs.
        environ = dict(os.environ, DEMO_DIR=str(directory), DEMO_PORT=str(port), DEMO_SECONDS=str(seconds))
        self.port = port
        self.popen = subprocess.Popen(["make", "-s", "-o", "serve-venv", "-o", "serve-debs", "demo"], cwd=checkout,
                                      env=environ,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.lines = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.popen.stdout:
            self.lines.append(line.decode(errors="replace"))

    def output(self):
        return "".join(self.lines)

    def wait_until_serving(self):
        """The URL is printed, and it serves a whole Trac page."""
        url = "http://127.0.0.1:%d/" % self.port

        def serving():
            if self.popen.poll() is not None:
                raise AssertionError("make demo exited early:\n" + self.output())
            if url not in self.output():
                return None
            answer = http_get(self.port, "/wiki/WikiStart")
            return answer if answer.ok else None
        return wait_until(serving, START_TIMEOUT, "make demo to print %s and serve Trac there" % url)

    def ctrl_c(self):
        os.killpg(self.popen.pid, signal.SIGINT)

    def wait(self, timeout=120):
        try:
            self.popen.wait(timeout)
        finally:
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.reader.join(10)
        return self.output()


def test_make_demo_in_a_fresh_checkout_serves_trac_until_ctrl_c_then_stops_everything_and_runs_again(tmp_path):
    checkout = fresh_checkout(tmp_path / "checkout")
    directory = tmp_path / "demo"
    port = free_port()

    # First run: until Ctrl-C, which a terminal sends to the whole foreground group.
    demo = MakeDemo(checkout, directory, port, seconds=0)
    try:
        page = demo.wait_until_serving()
        assert is_trac_page(page, WELCOME) and b"Demo" in page.body
        assert is_trac_page(http_get(port, "/timeline"), "Timeline")
        # The page looks finished: its logo is Trac's banner, and it is there.
        assert b'src="/chrome/common/trac_banner.png"' in page.body
        logo = http_get(port, "/chrome/common/trac_banner.png")
        assert logo.status == 200 and logo.body.startswith(b"\x89PNG"), logo
        demo.ctrl_c()
    finally:
        output = demo.wait()
    assert "event=all-ready workers=2" in output, output
    # No warning of ours, boxed or not; and the rolling-restart hint names the launcher.
    assert not re.search(r"warning|deprecat|!!", output, re.IGNORECASE), output
    hint = re.search(r"the launcher is pid (\d+): kill -HUP \1 replaces every worker", output)
    assert hint and "trac-fcgi-launcher[%s] event=start" % hint.group(1) in output, output
    assert "event=stop status=0" in output and "demo: stopped" in output, output
    assert not processes_mentioning(str(directory)), output
    assert not connects_tcp(port)

    # A second run reuses the environment and stops by itself after DEMO_SECONDS.
    demo = MakeDemo(checkout, directory, port, seconds=5)
    try:
        assert is_trac_page(demo.wait_until_serving(), WELCOME)
    finally:
        output = demo.wait()
    assert demo.popen.returncode == 0, output
    assert "creating a Trac environment" not in output
    assert "event=stop status=0" in output and "demo: stopped" in output, output
    assert not processes_mentioning(str(directory)), output
    assert not connects_tcp(port)


def connects_tcp(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


def test_make_demo_installs_only_what_serving_needs_and_make_test_everything(tmp_path):
    checkout = fresh_checkout(tmp_path / "checkout")

    def recipes(target):
        # -n: print what make would run, run nothing; -B: as if nothing were installed yet.
        return subprocess.run(["make", "-n", "-B", target], cwd=checkout, capture_output=True, text=True,
                              check=True).stdout
    demo, test = recipes("demo"), recipes("test")
    assert "pip install -q -e .\n" in demo and "nginx-light" in demo and "spawn-fcgi" in demo, demo
    for extra in ("[test]", "wrk", "systemd", "libfcgi-bin"):
        assert extra not in demo, demo
        assert extra in test, test
