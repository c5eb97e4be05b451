"""Every FastCGI front a Trac admin uses, each recipe in examples/ run as written.

lighttpd with spawn-fcgi, lighttpd starting the launcher itself (bin-path),
Apache's mod_proxy_fcgi on the launcher's --bind socket, and Apache's
mod_fcgid running trac-fcgi with no launcher at all.  Every server is the
real Debian one, in a temp dir with its own config, logs and port; Trac is a
real environment; logins go through the web server's basic auth.  Then what
only a front without a launcher needs: a self re-exec that a signal cannot
kill, and a pool of processes that reloads one at a time.
"""
import base64
import fcntl
import os
import collections
import http.client
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from stack import (EXAMPLES, SPAWN_FCGI, START_TIMEOUT, TRAC_FCGI, Apache, Lighttpd, Load, exchange,
                   is_trac_page, recycles)
import trac_fcgi
from support import PYTHON, WORKERS, Process, fcgi_get, make_trac_env, start_launcher, wait_until

VENV = Path(PYTHON).parent.parent
PREFIX = "/trac"
WELCOME = "Welcome to Trac"
USER, PASSWORD = "alice", "wonderland"
# A wiki page whose name holds a literal "%41", and the page that decoding
# its name twice would find instead.
ODD_NAME, ODD_URL = "Odd%41Name", "/wiki/Odd%2541Name"
PAGES = {ODD_NAME: "the page whose name holds a percent sign", "OddAName": "the page named odd a name"}
# What the load asks for: pages that write nothing.  (The timeline saves an
# anonymous session for each client without cookies; on a busy machine, those
# SQLite writes then wait past Trac's lock timeout, a 500 that is no front's.)
LOAD_PATHS = [PREFIX + "/wiki/WikiStart", PREFIX + "/wiki/TracGuide"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A Trac environment of the fronts' own (tickets are created in it) with the two odd pages, and an htpasswd."""
    directory = tmp_path_factory.mktemp("fronts")
    trac_env = make_trac_env(directory / "env")
    trac_admin = str(VENV / "bin" / "trac-admin")
    for name, text in PAGES.items():
        page = directory / "page.txt"
        page.write_text(text + "\n")
        # trac-admin unquotes the page name it is given: quote it once.
        subprocess.run([trac_admin, trac_env, "wiki", "import", urllib.parse.quote(name), str(page)],
                       check=True, capture_output=True)
    htpasswd = directory / "htpasswd"
    subprocess.run(["htpasswd", "-cbm", str(htpasswd), USER, PASSWORD], check=True, capture_output=True)
    return {"trac_env": trac_env, "htpasswd": str(htpasswd)}


def wiki_text(answer):
    """The wiki page's own content, as Trac rendered it."""
    found = re.search(rb'<div class="wikipage searchable">(.*?)</div>', answer.body, re.DOTALL)
    return found[1].strip() if found else None


@pytest.fixture(scope="module")
def stock_odd_page(site, tmp_path_factory):
    """The odd page as stock trac.fcgi (Trac's default FastCGI server) serves it, PATH_INFO decoded once."""
    directory = tmp_path_factory.mktemp("stock")
    sock = str(directory / "stock.sock")
    stock = Process([SPAWN_FCGI, "-n", "-s", sock, "--", PYTHON, "-m", "trac.web.fcgi_frontend"],
                    directory / "stock.log", env={"TRAC_ENV": site["trac_env"], "TRAC_USE_FLUP": "0"})
    try:
        def answer():
            try:
                return fcgi_get(sock, "/wiki/" + ODD_NAME, timeout=START_TIMEOUT)
            except OSError:
                return None
        response = wait_until(answer, START_TIMEOUT, "stock trac.fcgi to answer:\n" + stock.log())
    finally:
        stock.stop()
    text = wiki_text(response)
    assert response.status == 200 and text and PAGES[ODD_NAME].encode() in text, response.body[:3000]
    return text


# --------------------------------------------------------------------------
# The recipes: each starts its Trac and its front, and says how to count recycles.

def lighttpd_url(url):
    """The lines of examples/lighttpd*.conf an admin edits to put Trac at URL ("" for the root)."""
    return ['var.trac_url   = "%s"' % (url or "/"), 'var.trac_login = "%s/login"' % url]


def lighttpd_with_spawn_fcgi(started, tmp_path, site, url, limits):
    sock = tmp_path / "trac.sock"
    backend = Process([str(EXAMPLES / "spawn-fcgi.sh")], tmp_path / "spawn-fcgi.log", env=dict(
        limits, VENV=str(VENV), TRAC_ENV=site["trac_env"], SOCKET=str(sock), WORKERS="2",
        TRAC_USER="", WEB_GROUP=""))  # stay root: spawn-fcgi will not switch to uid 0
    started.append(backend)
    backend.wait_for("all-ready", timeout=START_TIMEOUT)
    front = Lighttpd(tmp_path / "lighttpd", "lighttpd.conf", {"socket": sock, "htpasswd": site["htpasswd"]},
                     settings=lighttpd_url(url))
    started.append(front)
    return front, lambda: len(recycles(backend))


def lighttpd_bin_path(started, tmp_path, site, url, limits):
    # The launcher's limits reach it through lighttpd's own environment,
    # which lighttpd passes on along with bin-environment.
    front = Lighttpd(tmp_path / "lighttpd", "lighttpd-bin-path.conf",
                     {"socket": tmp_path / "trac.sock", "htpasswd": site["htpasswd"], "venv": VENV,
                      "trac_env": site["trac_env"]}, settings=lighttpd_url(url), env=limits)
    started.append(front)
    front.process.wait_for("all-ready", timeout=START_TIMEOUT)  # the launcher logs to lighttpd's stderr
    return front, lambda: len(recycles(front.process))


def apache_proxy_fcgi(started, tmp_path, site, url, limits):
    launcher = start_launcher(tmp_path, [TRAC_FCGI], "--workers", "2",
                              env=dict(limits, TRAC_ENV=site["trac_env"]))
    started.append(launcher)
    launcher.wait_for("all-ready", timeout=START_TIMEOUT)
    front = Apache(tmp_path / "apache", "apache-proxy-fcgi.conf",
                   {"socket": launcher.socket, "htpasswd": site["htpasswd"]})
    started.append(front)
    return front, lambda: len(recycles(launcher))


def apache_fcgid(started, tmp_path, site, url, limits, processes=None):
    # An admin sets a worker's limits with FcgidInitialEnv lines, as the
    # example's TRAC_FCGI_MAX_RSS one, and sizes the pool.
    extra = "".join("FcgidInitialEnv %s %s\n" % item for item in limits.items())
    settings = ["FcgidMaxProcessesPerClass %d" % processes] if processes else []
    front = Apache(tmp_path / "apache", "apache-fcgid.conf",
                   {"venv": VENV, "trac_env": site["trac_env"], "htpasswd": site["htpasswd"]},
                   settings=settings, extra=extra)
    started.append(front)
    if processes:
        # mod_fcgid starts its processes as load asks for them, and a request
        # that finds none free polls for one once a second: bring them all up
        # before measuring anything.
        Load(front.port, LOAD_PATHS, clients=processes).run(
            stop=lambda seconds: len(serving_processes(front)) >= processes, max_seconds=START_TIMEOUT)
        assert len(serving_processes(front)) >= processes, front.errors()[-3000:]
    return front, lambda: len(reexecs(front))


def serving_processes(front):
    """The trac-fcgi processes that have started under mod_fcgid (their stderr is its error log)."""
    return set(re.findall(r"^trac-fcgi\[(\d+)\] event=warm ", front.errors(), re.MULTILINE))


def reexecs(front):
    """Every self re-exec the front's trac-fcgi processes logged (mod_fcgid puts their stderr in its error log)."""
    return [line for line in front.errors().splitlines() if re.search(r"^trac-fcgi\[\d+\] event=re-exec", line)]


RECIPES = {"lighttpd-spawn-fcgi": lighttpd_with_spawn_fcgi, "lighttpd-bin-path": lighttpd_bin_path,
           "apache-proxy-fcgi": apache_proxy_fcgi, "apache-fcgid": apache_fcgid}


# --------------------------------------------------------------------------
# A browser: cookies, basic auth, forms.

class Browser:
    """One user on one kept-alive connection, keeping the cookies Trac sets."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=START_TIMEOUT)
        self.cookies = {}

    def go(self, path, form=None, password=None):
        headers = {}
        if self.cookies:
            headers["Cookie"] = "; ".join("%s=%s" % item for item in self.cookies.items())
        if password:
            headers["Authorization"] = "Basic " + base64.b64encode(("%s:%s" % (USER, password)).encode()).decode()
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        answer = exchange(self.conn, path, "GET" if form is None else "POST", body, headers)
        for name, value in answer.headers:
            if name.lower() == "set-cookie":
                key, _, value = value.split(";", 1)[0].partition("=")
                self.cookies[key.strip()] = value
        return answer

    def stop(self):
        self.conn.close()


def what_went_wrong(failures):
    """The text of the first failed answer's page, without its markup (Trac's error pages say why)."""
    if not failures:
        return ""
    main = re.search(rb'<div id="content".*', failures[0].body, re.DOTALL)
    text = re.sub(rb"<[^>]*>|\s+", b" ", main[0] if main else failures[0].body)
    return text.decode(errors="replace")[:1500]


def location_path(answer):
    return urllib.parse.urlsplit(answer.header("Location") or "").path


# --------------------------------------------------------------------------
# Each recipe, as a user sees it

@pytest.mark.parametrize("url", [PREFIX, ""], ids=["at-a-prefix", "at-the-root"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_serves_trac_logs_in_through_the_web_server_and_creates_a_ticket(
        started, tmp_path, site, stock_odd_page, recipe, url):
    front, _ = RECIPES[recipe](started, tmp_path, site, url, {})
    browser = Browser(front.port)
    started.append(browser)

    # Pages, and the links in them: every one starts with where Trac is.
    page = browser.go(url + "/wiki/WikiStart")
    assert is_trac_page(page, WELCOME), (page, front.errors()[-3000:])
    assert ('href="%s/wiki/TracGuide"' % url).encode() in page.body
    assert ('href="%s/chrome/common/css/trac.css"' % url).encode() in page.body
    links = re.findall(rb'href="(/[^"]*)"', page.body)
    assert links and all(link.startswith((url + "/").encode()) for link in links), links
    if not url:
        assert not [link for link in links if link.startswith(PREFIX.encode() + b"/")], links
    assert is_trac_page(browser.go(url + "/timeline"), "Timeline")
    assert is_trac_page(browser.go(url or "/"), WELCOME)

    # A name with a literal %41 in it is the page stock trac.fcgi serves.
    odd = browser.go(url + ODD_URL)
    assert odd.status == 200 and wiki_text(odd) == stock_odd_page, (wiki_text(odd), stock_odd_page)

    # Logging in: the web server asks for the password, Trac reads REMOTE_USER.
    assert browser.go(url + "/login").status == 401
    assert browser.go(url + "/login", password="wrong").status == 401
    login = browser.go(url + "/login", password=PASSWORD)
    assert login.status in (302, 303) and "trac_auth" in browser.cookies, login
    assert location_path(login).startswith(url + "/") or location_path(login) == url, login.headers
    page = browser.go(url + "/wiki/WikiStart")
    assert re.search(rb"logged in as\s*(<[^>]*>\s*)*" + USER.encode(), page.body), page.body[:3000]

    # A ticket, created through the form as a browser posts it.
    form = browser.go(url + "/newticket")
    token = re.search(rb'name="__FORM_TOKEN" value="([^"]+)"', form.body)
    assert is_trac_page(form, "Create New Ticket") and token, form
    summary = "Created through %s %s" % (recipe, "at the root" if not url else "under " + url)
    created = browser.go(url + "/newticket", form={
        "__FORM_TOKEN": token[1].decode(), "field_summary": summary, "field_description": "via the form",
        "field_type": "defect", "submit": "Create ticket"})
    assert created.status == 303 and re.match(re.escape(url) + r"/ticket/\d+$", location_path(created)), created
    ticket = browser.go(location_path(created))
    assert is_trac_page(ticket, summary) and USER.encode() in ticket.body, ticket


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_answers_sixteen_clients_whole_through_ten_recycles(started, tmp_path, site, recipe):
    # Each worker recycles after about 20 requests (+-10% jitter).  mod_fcgid
    # serves one request per process at a time: 16 clients, 16 processes.
    sized = {"processes": 16} if recipe == "apache-fcgid" else {}
    front, recycled = RECIPES[recipe](started, tmp_path, site, PREFIX, {"TRAC_FCGI_MAX_REQUESTS": "20"}, **sized)
    load = Load(front.port, LOAD_PATHS, clients=16)
    # Reloads without a launcher take turns, one start-up each: on a busy
    # machine, ten of them take minutes.
    load.run(stop=lambda seconds: recycled() >= 10, max_seconds=300)
    report = "%s\n%d recycles\nfirst failure says: %s\nfront's errors:\n%s" % (
        load.summary(), recycled(), what_went_wrong(load.failures()), front.errors()[-3000:])
    assert recycled() >= 10, "too few recycles: " + report
    assert load.answers and not load.errors(), "connection errors: " + report
    assert not load.non_200(), "non-200 answers: " + report
    assert not load.truncated(), "cut-off bodies: " + report
    statuses = collections.Counter(e["status"] for e in front.access_log())
    assert set(statuses) == {200}, "the front logged %s: %s" % (dict(statuses), report)


# --------------------------------------------------------------------------
# A pool of self-re-executing processes (mod_fcgid): one reload at a time

def p99(answers):
    latencies = sorted(answer.latency for answer in answers)
    return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def reload_overlaps(log):
    """Moments at which two processes of the pool were reloading at once, from the log's order.

    A process reloads from its `event=recycle ... next=re-exec` line (it has
    the turn) to its `event=reloaded` line (its new image serves).
    """
    reloading, overlaps = set(), []
    for line in log.splitlines():
        found = re.match(r"trac-fcgi\[(\d+)\] event=(recycle .*next=re-exec|reloaded)", line)
        if found and found[2] == "reloaded":
            reloading.discard(found[1])
        elif found:
            reloading.add(found[1])
            if len(reloading) > 1:
                overlaps.append(line)
    return overlaps


def test_a_mod_fcgid_pool_reloads_one_process_at_a_time_and_its_p99_stays_within_twice_that_without_recycling(
        started, tmp_path, site):
    # As many clients as processes: with more, mod_fcgid itself makes the
    # extra requests poll for a free process once a second, unfairly, and
    # that, not recycling, would decide the p99.
    processes = clients = 4
    plain, _ = apache_fcgid(started, tmp_path / "plain", site, PREFIX, {}, processes=processes)
    recycling, recycled = apache_fcgid(started, tmp_path / "recycling", site, PREFIX,
                                       {"TRAC_FCGI_MAX_REQUESTS": "20"}, processes=processes)
    # The two pools take turns under load, 5 s at a time, so that whatever
    # else this machine runs meanwhile weighs on both alike; until each of
    # the recycling pool's processes has reloaded twice.
    before, answers = recycled(), {plain: [], recycling: []}
    deadline = time.monotonic() + 300
    while recycled() - before < 2 * processes and time.monotonic() < deadline:
        for front in (plain, recycling):
            answers[front] += Load(front.port, LOAD_PATHS, clients=clients).run(
                stop=lambda seconds: False, max_seconds=5).answers
    failed = [a for found in answers.values() for a in found if not a.ok][:5]
    report = "%d answers without recycling, p99 %.3f s; %d recycling, p99 %.3f s, %d recycles; failures %s" % (
        len(answers[plain]), p99(answers[plain]), len(answers[recycling]), p99(answers[recycling]),
        recycled() - before, failed)
    print(report)  # the figures, for pytest -s
    assert not failed, report
    assert recycled() - before >= 2 * processes, report
    log = recycling.errors()
    assert not reload_overlaps(log), "reloads overlapped: %s\n%s" % (reload_overlaps(log), report)
    assert p99(answers[recycling]) <= 2 * p99(answers[plain]), report


# --------------------------------------------------------------------------
# Plain spawn-fcgi: a self re-exec that a signal cannot kill

def test_sighups_and_a_sigterm_that_land_during_a_re_exec_are_acted_on_once_the_worker_serves(tmp_path, site):
    sock = str(tmp_path / "trac.sock")
    # While this file exists, a re-executed image waits before its first line
    # (tests/workers/start_gate): the test's signals land inside that window.
    gate = tmp_path / "start-gate"
    worker = Process([SPAWN_FCGI, "-n", "-s", sock, "--", TRAC_FCGI], tmp_path / "worker.log",
                     env={"TRAC_ENV": site["trac_env"], "START_GATE": str(gate),
                          "PYTHONPATH": str(WORKERS / "start_gate")})
    answers, asking = [], threading.Event()

    def ask_throughout():
        while not asking.is_set():
            started = time.monotonic()
            try:
                answers.append((started, time.monotonic(), fcgi_get(sock, "/wiki/WikiStart", timeout=START_TIMEOUT)))
            except (OSError, EOFError) as error:
                answers.append((started, time.monotonic(), error))
                time.sleep(0.05)

    client = threading.Thread(target=ask_throughout)
    try:
        worker.wait_for("warm", timeout=START_TIMEOUT)
        client.start()
        wait_until(lambda: answers, START_TIMEOUT, "a first answer")
        # A second SIGHUP while the re-executed image starts, before it has
        # any handler: held, then acted on once it serves, as a second reload.
        gate.touch()
        worker.signal(signal.SIGHUP)
        worker.wait_for("re-exec", timeout=START_TIMEOUT)
        worker.signal(signal.SIGHUP)
        gate.unlink()
        worker.wait_for("re-exec", count=2, timeout=START_TIMEOUT)
        worker.wait_for("warm", count=3, timeout=START_TIMEOUT)
        served = len(answers)
        wait_until(lambda: len(answers) > served, START_TIMEOUT, "an answer after the second reload")
        # SIGTERM while the image after a third SIGHUP starts: it serves, then stops.
        gate.touch()
        worker.signal(signal.SIGHUP)
        worker.wait_for("re-exec", count=3, timeout=START_TIMEOUT)
        terminated = time.monotonic()
        worker.signal(signal.SIGTERM)
        gate.unlink()
        status = worker.wait(START_TIMEOUT)
    finally:
        asking.set()
        if client.is_alive():
            client.join(START_TIMEOUT)
        worker.stop()
    log = worker.log()
    assert status == 0, log
    assert len(worker.events("held-signals", signals="SIGHUP")) == 1, log
    assert worker.events("held-signals", signals="SIGTERM"), log
    assert len(worker.events("warm")) == 4, log
    # Every request asked before the SIGTERM was answered whole.  One that
    # waited for the last image is refused with it: nobody serves after SIGTERM.
    before = [answer for started, _, answer in answers if started < terminated]
    failed = [answer for answer in before if not (hasattr(answer, "status") and answer.status == 200)]
    assert before and len(failed) <= 1, (failed, log)
    assert all(hasattr(a, "status") and b"Welcome to Trac" in a.body for a in before[:-1]), (before, log)


def test_a_process_whose_pool_mate_is_reloading_keeps_serving_past_its_limit_and_stops_at_max_rss_all_the_same(
        tmp_path):
    # The test holds the pool's reload turn, as another process reloading
    # would: the worker, past its request limit, must wait its turn serving,
    # until its memory reaches TRAC_FCGI_MAX_RSS, which is a promise.
    hello = WORKERS / "hello.py"
    environ = {"PYTHONPATH": str(WORKERS), "TRAC_FCGI_MAX_REQUESTS": "3", "TRAC_FCGI_JITTER": "0",
               "HELLO_LEAK": str(1 << 20), "TRAC_FCGI_SOFT_RSS": "60M", "TRAC_FCGI_MAX_RSS": "60M"}
    turn = open(os.path.join(trac_fcgi.ReloadTurn.directory(), trac_fcgi.ReloadTurn.file_name_for(str(hello), environ)),
                "a")
    fcntl.flock(turn, fcntl.LOCK_EX)
    sock = str(tmp_path / "worker.sock")
    worker = Process([SPAWN_FCGI, "-n", "-s", sock, "--", PYTHON, str(hello)], tmp_path / "worker.log", env=environ)
    try:
        worker.wait_for("warm", timeout=START_TIMEOUT)
        statuses = []
        while not worker.events("drain") and len(statuses) < 200:
            statuses.append(fcgi_get(sock, timeout=START_TIMEOUT).status)
        assert worker.events("recycle", reason="requests", next="'wait for turn'"), worker.log()
        assert len(statuses) > 10 and set(statuses) == {200}, (statuses, worker.log())
        drain = worker.wait_for("drain", reason="max_rss")[0]
        assert 60 << 20 <= int(drain["rss"]) <= (60 << 20) + (1 << 20) + (512 << 10), drain
        # Turn or no turn, it reloads and serves again, small.
        worker.wait_for("re-exec", timeout=START_TIMEOUT)
        worker.wait_for("warm", count=2, timeout=START_TIMEOUT)
        assert fcgi_get(sock, timeout=START_TIMEOUT).status == 200
    finally:
        turn.close()
        worker.stop()
