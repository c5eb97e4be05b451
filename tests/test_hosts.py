"""Several hosts behind one nginx, on one PostgreSQL: examples/several-hosts.md run as written.

Each Trac host is a network namespace that this test makes (`ip netns`), with
an address of its own on a bridge; the bridge's own address, in this
namespace, is where nginx connects from and where PostgreSQL listens.  The
/24 and every name are this run's own, and every namespace, bridge and veth
goes at teardown, whatever the test did.  Each host runs the recipe's
launcher command (real trac-fcgi workers on one Trac environment, on a path
all hosts share and on PostgreSQL), one nginx from examples/nginx.conf and
examples/nginx-upstream.conf spreads browsers across them, and the
recipe's own commands take a host out and put it back.  Browsers create
tickets through Trac's form and read pages all along; every answer is
counted whole, and PostgreSQL says which tickets exist.

Without root or `ip`, or where the kernel refuses a namespace, the tests
say so and skip.
"""
import collections
import contextlib
import ipaddress
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import (EXAMPLES, START_TIMEOUT, TRAC_FCGI, Nginx, Postgres, TicketLoad, recycles, upstream_block)
from support import LAUNCHER, PYTHON, Process, alive, family, wait_until, workers_of

RECIPE = EXAMPLES / "several-hosts.md"
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
IP = shutil.which("ip")
HOSTS = "ab"
CLIENTS = 4
# Pages that only read, between two tickets; /timeline also saves a session.
PAGES = ["/wiki/WikiStart", "/timeline"]
# Load runs until a test is done with it, or this long at most.
MAX_LOAD_S = 240


# --------------------------------------------------------------------------
# The recipe's blocks, with this run's addresses and paths put in.

def recipe_blocks():
    """[(language, text)] of every fenced block of the recipe, continuation lines joined."""
    found = re.findall(r"^\s*```(\w+)\n(.*?)^\s*```", RECIPE.read_text(), re.MULTILINE | re.DOTALL)
    return [(language, textwrap.dedent(text).replace("\\\n", " ")) for language, text in found]


# Words that tell each block of the recipe from the others: the tests below
# run each block, so one added to the recipe must get its words here, and a test.
BLOCKS = {"initenv": "sh", "--bind 10.0.0.11:9000": "sh", "down;|'": "sh", "slots ready": "sh",
          "down;|server": "sh", "scrape_configs": "yaml"}


def block(words):
    """The one block of the recipe that holds WORDS."""
    [text] = [text for _, text in recipe_blocks() if words in text]
    return text


def test_every_block_of_the_recipe_is_one_these_tests_run():
    blocks = recipe_blocks()
    assert sorted(BLOCKS.values()) == sorted(language for language, _ in blocks), blocks
    for language, text in blocks:
        assert len([words for words in BLOCKS if words in text and BLOCKS[words] == language]) == 1, text
    for words in BLOCKS:
        block(words)  # in exactly one


# --------------------------------------------------------------------------
# The network: a bridge here, a namespace per host on it.

def ip(*args, check=True):
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check).stdout


class Network:
    """A bridge with an address of a /24 nobody here uses, and a network namespace per host on it.

    Names carry a tag of this run's own, so two runs on one machine never
    meet, and remove() takes away all of it, killing first whatever still
    runs in a namespace (everything there is this test's).
    """

    def __init__(self):
        self.tag = secrets.token_hex(2)
        self.subnet = self.unused_subnet()
        self.front = str(self.subnet.network_address + 1)
        self.bridge = "tfb" + self.tag
        self.namespaces, self.links = [], []

    def make_bridge(self):
        ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        ip("addr", "add", "%s/%d" % (self.front, self.subnet.prefixlen), "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    @staticmethod
    def unused_subnet():
        for _ in range(50):
            subnet = ipaddress.ip_network("10.%d.%d.0/24" % (random.randint(200, 254), random.randint(0, 255)))
            routes = [line for line in ip("-o", "-4", "route", "show", "to", "match", str(subnet[1])).splitlines()
                      if not line.startswith("default")]
            if not routes and str(subnet)[:-5] not in ip("-o", "-4", "addr", "show"):
                return subnet
        raise AssertionError("no unused 10.x.y.0/24 here")

    def add_host(self, name):
        """A namespace with lo and eth0 up, eth0 on the bridge: returns (namespace, address)."""
        namespace = "trac-fcgi-%s-%s" % (self.tag, name)
        outside, inside = "tfv%s%s" % (self.tag, name), "tfp%s%s" % (self.tag, name)
        address = str(self.subnet.network_address + 11 + len(self.namespaces))
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self.links.append(outside)
        ip("link", "set", outside, "master", self.bridge, "up")
        ip("link", "set", inside, "netns", namespace)
        for command in (["link", "set", inside, "name", "eth0"],
                        ["addr", "add", "%s/%d" % (address, self.subnet.prefixlen), "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            ip("-n", namespace, *command)
        return namespace, address

    def remove(self):
        for namespace in self.namespaces:
            for pid in ip("netns", "pids", namespace, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(AssertionError):  # the namespace goes anyway, once they do
                wait_until(lambda: not ip("netns", "pids", namespace, check=False).split(), 30,
                           "the processes in %s to go" % namespace)
            ip("netns", "del", namespace, check=False)
        for link in self.links:
            ip("link", "del", link, check=False)  # a veth goes with its namespace; the bridge does not


def namespaces_refused():
    """Why this machine cannot make network namespaces, or None when it can."""
    if os.getuid() != 0:
        return "network namespaces need root"
    if IP is None:
        return "no `ip` command (Debian: iproute2)"
    probe = "trac-fcgi-probe-%s" % secrets.token_hex(2)
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else "ip netns add refused: %s" % made.stderr.strip()


@pytest.fixture(scope="module")
def network():
    refused = namespaces_refused()
    if refused:
        pytest.skip("several hosts are network namespaces, and " + refused)
    made = Network()
    try:
        made.make_bridge()
        yield made
    finally:
        made.remove()


# --------------------------------------------------------------------------
# The site: hosts, nginx, PostgreSQL.

class Host:
    """One Trac host: a namespace, its address, and the launcher the recipe's step 2 starts there."""

    def __init__(self, site, name, namespace, address):
        self.site, self.name, self.namespace, self.address = site, name, namespace, address
        self.server = "%s:9000" % address
        self.run_dir = site.directory / name / "run"
        self.run_dir.mkdir(parents=True)
        self.launcher = None
        self.launchers = []

    def put_in(self, text):
        """TEXT with the recipe's first host (10.0.0.11) this one, its second the other, /run/trac this one's."""
        [other] = [h for h in self.site.hosts.values() if h is not self]
        return self.site.put_in(text).replace("10.0.0.11", self.address).replace(
            "10.0.0.12", other.address).replace("/run/trac", str(self.run_dir))

    def in_namespace(self, argv):
        return [IP, "netns", "exec", self.namespace, *argv]

    def start(self, ready=True):
        """Step 2 as written, in this host's namespace; with READY, returns once every slot has a ready worker."""
        words = shlex.split(self.put_in(block("--bind 10.0.0.11:9000")))
        environ = {}
        while re.match(r"^[A-Z_]+=", words[0]):
            name, _, value = words.pop(0).partition("=")
            environ[name] = value
        log = self.site.directory / self.name / ("launcher-%d.log" % len(self.launchers))
        self.launcher = Process(self.in_namespace(words), log, env=environ)
        self.launchers.append(self.launcher)
        if ready:
            self.launcher.wait_for("all-ready", timeout=START_TIMEOUT)
        return self.launcher

    def run(self, text):
        """A shell block of the recipe, as written, run on this host."""
        return run_shell(self.in_namespace(["sh", "-ec", self.put_in(text)]))

    def connections(self):
        """FastCGI connections open on this host now: requests in flight, or just answered."""
        return len(run_shell(self.in_namespace(["ss", "-Htn", "state", "established",
                                                  "( sport = :%s )" % self.server.rsplit(":", 1)[1]]))
                   .splitlines())

    def serving(self):
        return self.launcher is not None and self.launcher.popen.poll() is None

    def stop(self):
        for launcher in self.launchers:
            launcher.stop()


def run_shell(argv, timeout=120):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, "%s\nexit %d\n%s%s" % (argv, done.returncode, done.stdout, done.stderr)
    return done.stdout


class Site:
    """What the hosts share: nginx in front, PostgreSQL, the Trac environment's path; and the hosts."""

    def __init__(self, directory, network):
        self.directory, self.network = directory, network
        self.hosts = {}
        self.postgres = self.nginx = None
        self.exporters = []

    def put_in(self, text):
        """The recipe's database, environment, programs and nginx prefix made this run's."""
        for old, new in [("postgres://trac@10.0.0.5/trac", self.database_url), ("10.0.0.10", self.network.front),
                         ("/srv/trac/project", str(self.env)), ("/srv/trac/venv/bin/trac-fcgi", TRAC_FCGI),
                         ("/srv/trac/nginx", str(self.nginx.prefix) if self.nginx else "/nonexistent"),
                         ("trac-fcgi-launcher", "%s %s" % (PYTHON, LAUNCHER)),
                         ("trac-admin", str(Path(PYTHON).parent / "trac-admin"))]:
            text = text.replace(old, new)
        return text

    def run(self, text):
        """A shell block of the recipe, as written, run where nginx runs (this namespace)."""
        return run_shell(["sh", "-ec", self.put_in(text)])

    def tickets(self):
        """{summary: how many tickets PostgreSQL holds with it}."""
        return collections.Counter({summary: int(count) for summary, count in self.postgres.query(
            "trac", "SELECT summary, COUNT(*) FROM ticket GROUP BY summary")})

    def every_host_serving(self):
        """Start again any host an earlier test left down (these tests share one site)."""
        for host in self.hosts.values():
            if not host.serving():
                host.start()

    def stop(self):
        for thing in [self.nginx, *self.exporters, *self.hosts.values(), self.postgres]:
            if thing is not None:
                thing.stop()


@pytest.fixture(scope="module")
def site(network, tmp_path_factory):
    made = Site(tmp_path_factory.mktemp("hosts"), network)
    try:
        made.postgres = Postgres(addresses=[network.front], networks=[str(network.subnet)])
        made.postgres.create_database("trac")
        made.database_url = made.postgres.url("trac", host=network.front)
        made.env = made.directory / "project"  # the path every host shares
        made.run(block("initenv"))
        made.run("trac-admin /srv/trac/project permission add anonymous TICKET_CREATE")
        for name in HOSTS:
            host = Host(made, name, *network.add_host(name))
            made.hosts[name] = host
        for host in made.hosts.values():
            host.start()
        made.nginx = Nginx(made.directory / "nginx", None,
                           upstream=upstream_block(*(h.server for h in made.hosts.values())))
        yield made
    finally:
        made.stop()


# --------------------------------------------------------------------------
# Browsers, and what they saw.

class Browsers(TicketLoad):
    """Clients creating tickets through Trac's form and reading PAGES between two, through nginx.

    Each request on a connection of its own: a reload of nginx (steps 5 and
    6 of the recipe) ends every kept-alive client connection once its
    request is answered, and a client that sent its next one at that moment
    sees the connection close, whatever the hosts behind do.  Browsers send
    such a request again; http.client does not.
    """

    def next_request(self, number, turn):
        path, method, body, headers = TicketLoad.next_request(self, number, turn)
        return path, method, body, dict(headers, Connection="close")


def answered(answer):
    """A whole answer: a 303 to the new ticket for a POST, a whole 200 page for a GET."""
    return answer.error is None and answer.complete and answer.status == (
        303 if answer.request[1] == "POST" else 200)


@contextlib.contextmanager
def browsing(site, tag):
    """Browsers asking all along while the test's body acts; they stop when it is done."""
    load = Browsers(site.nginx.port, CLIENTS, tag, pages=PAGES)
    finished = threading.Event()
    runner = threading.Thread(target=load.run, args=(lambda seconds: finished.is_set(), MAX_LOAD_S))
    runner.start()
    try:
        yield load
    finally:
        finished.set()
        runner.join()


def more_answers(load, count, timeout=120):
    """Wait until COUNT more answers than now have come in."""
    target = len(load.answers) + count
    wait_until(lambda: len(load.answers) >= target, timeout, "%d answers (have %d)" % (target, len(load.answers)))


def served_by(entries):
    """{upstream that answered: requests} of nginx access log entries."""
    return collections.Counter(e["upstream"].split(",")[-1].strip() for e in entries)


def exactly_once(site, load):
    """Tickets answered 303 that PostgreSQL does not hold exactly once, and summaries it holds twice."""
    in_db = site.tickets()
    created = [summary for summary, answer in load.created()]
    return [s for s in created if in_db[s] != 1], [s for s, n in in_db.items() if n > 1 and s.startswith(load.tag)]


def described(load):
    """Load.summary() with the first answers that were not whole (a 303 is one here), not the first non-200s."""
    return load.summary().split("; first failures")[0] + "; first failures: %s" % [
        a for a in load.answers if not answered(a)][:5]


def figures(site, load, **more):
    """What a test prints for the README: requests, failures, tickets and duplicates, with MORE."""
    in_db = site.tickets()
    failed_posts = [summary for summary, answer in load.posts() if not answered(answer)]
    facts = dict(requests=len(load.answers), failed=sum(1 for a in load.answers if not answered(a)),
                 tickets=len(load.created()), failed_posts=len(failed_posts),
                 saved_anyway=sum(1 for s in failed_posts if in_db[s]),
                 duplicates=sum(1 for s, n in in_db.items() if n > 1 and s.startswith(load.tag)), **more)
    return " ".join("%s=%s" % item for item in facts.items())


# --------------------------------------------------------------------------
# The tests: in this order, on one site (the kill goes last).

def test_a_rolling_deploy_host_by_host_fails_no_request_and_each_ticket_lands_once(site):
    site.every_host_serving()
    log_start = len(site.nginx.access_log())
    before = {name: len(recycles(h.launcher)) for name, h in site.hosts.items()}
    with browsing(site, "deploy") as load:
        more_answers(load, 20)
        for host in site.hosts.values():  # the recipe's step 4, one host after the other
            done = len(host.launcher.events("rolling-restart-done"))
            host.launcher.signal(signal.SIGHUP)
            host.launcher.wait_for("rolling-restart-done", count=done + 1, timeout=START_TIMEOUT)
        more_answers(load, 20)
    report = figures(site, load, hosts=len(site.hosts)) + "\n" + described(load)
    print("rolling deploy:", report)
    assert [a for a in load.answers if not answered(a)] == [], report
    for name, host in site.hosts.items():
        assert len(recycles(host.launcher)) - before[name] >= 2, "host %s replaced its workers: %s" % (name, report)
    assert set(served_by(site.nginx.access_log()[log_start:])) == {h.server for h in site.hosts.values()}, report
    assert exactly_once(site, load) == ([], []), report


def test_a_host_taken_out_and_put_back_by_the_recipe_fails_no_request(site):
    site.every_host_serving()
    host, other = site.hosts["a"], site.hosts["b"]
    with browsing(site, "drain") as load:
        more_answers(load, 20)
        site.run(host.put_in(block("down;|'")))  # step 5: down, reload, old nginx workers gone
        out_from = len(site.nginx.access_log())
        host.launcher.signal(signal.SIGTERM)
        assert host.launcher.wait(60) == 0, host.launcher.log()[-3000:]
        more_answers(load, 20)  # only the other host serves
        out_until = len(site.nginx.access_log())
        host.start(ready=False)  # step 6: the launcher again, the recipe's wait for every slot, then nginx
        host.run(block("slots ready"))
        assert host.launcher.events("all-ready"), "the recipe's wait ended before the host served"
        site.run(host.put_in(block("down;|server")))
        wait_until(lambda: host.server in served_by(site.nginx.access_log()[out_until:]), 60,
                   "host a to serve again")
        more_answers(load, 20)
    report = figures(site, load) + "\n" + described(load)
    print("host taken out and put back:", report)
    assert [a for a in load.answers if not answered(a)] == [], report
    while_out = served_by(site.nginx.access_log()[out_from:out_until])
    assert set(while_out) == {other.server}, "only host b served while a was out: %s" % while_out
    stopped = host.launchers[-2]
    assert not [e for e in stopped.events("abandoned")], stopped.log()[-3000:]
    assert exactly_once(site, load) == ([], []), report


def test_stopping_a_launcher_that_nginx_still_sends_to_fails_only_posts_in_its_backlog_and_never_runs_them(site):
    # Why the recipe's step 5 takes a host out of nginx before stopping it.
    # Injects: SIGTERM to host a's launcher under load, while nginx has
    # requests on it and goes on sending it more.  Its workers stop accepting
    # at once and finish what they accepted; connections nginx opens
    # meanwhile wait in the backlog until the launcher exits and the kernel
    # resets them.  Holds: nginx sends a GET among them to host b; a POST
    # gets a 502, and was never run.
    site.every_host_serving()
    host = site.hosts["a"]
    with browsing(site, "stop") as load:
        more_answers(load, 20)
        wait_until(lambda: host.connections() >= 2, 60, "two requests in flight on host a")
        host.launcher.signal(signal.SIGTERM)
        assert host.launcher.wait(60) == 0, host.launcher.log()[-3000:]
        more_answers(load, 20)
    report = figures(site, load) + "\n" + described(load)
    print("launcher stopped, host not taken out:", report)
    failed = [a for a in load.answers if not answered(a)]
    assert all(a.request[1] == "POST" and a.status == 502 for a in failed), report
    in_db = site.tickets()
    assert [summary for summary, answer in load.posts() if not answered(answer) and in_db[summary]] == [], report
    assert exactly_once(site, load) == ([], []), report


def scrape(target):
    with urllib.request.urlopen("http://%s/metrics" % target, timeout=10) as response:
        return response.read().decode()


def worker_pids_served(text):
    return {int(sample.labels["pid"]) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "trac_fcgi_worker_info"}


def test_each_hosts_node_exporter_serves_that_hosts_metrics_file_on_its_own_target(site):
    site.every_host_serving()
    # The recipe's targets, 10.0.0.11 and 10.0.0.12, are hosts a and b.
    targets = re.findall(r"'([\d.]+:\d+)'", site.hosts["a"].put_in(block("scrape_configs")))
    assert [target.split(":")[0] for target in targets] == [h.address for h in site.hosts.values()], targets
    by_target = {}
    for host, target in zip(site.hosts.values(), targets):
        exporter = Process(host.in_namespace([NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
                                              "--collector.textfile.directory=%s" % host.run_dir,
                                              "--web.listen-address=%s" % target]),
                           host.run_dir.parent / "node_exporter.log")
        site.exporters.append(exporter)
        by_target[target] = host
    for target, host in by_target.items():
        def serves_its_workers():
            try:
                return worker_pids_served(scrape(target)) == set(workers_of(host.launcher.pid))
            except OSError:
                return False
        wait_until(serves_its_workers, 60, "%s to serve host %s's workers" % (target, host.name))
    pids = [worker_pids_served(scrape(target)) for target in by_target]
    assert not set.intersection(*pids), pids


def test_a_host_killed_with_its_workers_fails_only_its_requests_in_flight_and_each_ticket_lands_once(site):
    site.every_host_serving()
    victim, survivor = site.hosts["a"], site.hosts["b"]
    with browsing(site, "kill") as load:
        more_answers(load, 30)
        # Kill while nginx has requests on the host, so that the kill lands on some.
        in_flight = wait_until(lambda: victim.connections() >= 2 and victim.connections(), 60,
                               "two requests in flight on host a")
        log_at_kill = len(site.nginx.access_log())
        # The launcher first, so that it starts no worker in place of those
        # killed after it.  The kill is over when the last of them is gone:
        # until then the socket listens, and a connection made meanwhile is
        # in flight on the host too (on a loaded machine, that took a while).
        killed = family(victim.launcher.pid)  # the launcher, its mold and its workers
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in killed), 30, "host a's processes to die")
        killed_at = time.monotonic()
        more_answers(load, 40)
    after = [a for a in load.answers if a.started > killed_at]
    failed = [a for a in load.answers if not answered(a)]
    moved = [e for e in site.nginx.access_log()[log_at_kill:] if e["request"].startswith("GET ")
             and victim.server in e["upstream"] and survivor.server in e["upstream"]]
    hit = [e for e in site.nginx.access_log()[log_at_kill:] if victim.server in e["upstream"]]
    report = figures(site, load, kills=1, killed_processes=len(killed), connections_at_kill=in_flight,
                     sent_to_the_dead_host=len(hit), gets_moved=len(moved)) \
        + "\n" + described(load) + "\nnginx errors:\n" + site.nginx.errors()[-2000:]
    print("host killed:", report.split("\nnginx errors:")[0])
    # Only requests in flight at the kill fail, at most one a client; the rest
    # go to the other host.
    assert all(a.started <= killed_at for a in failed), report
    assert len(failed) <= CLIENTS, report
    assert after and all(answered(a) for a in after), report
    assert hit, report
    since_kill = site.nginx.access_log()[log_at_kill:]
    assert set(served_by(since_kill)) >= {survivor.server}, report
    assert all(e["upstream"] == victim.server for e in since_kill if e["status"] >= 500), report
    # Each ticket a client was told exists once, none twice; a failed POST may
    # have been saved (the host died after Trac's commit), never twice.
    assert exactly_once(site, load) == ([], []), report
    asked = {summary for summary, _ in load.posts()}
    assert {s for s in site.tickets() if s.startswith("kill ")} <= asked, report
