"""--metrics-file and `trac-fcgi-launcher status`: the file says what happened.

The file is read the way its readers read it: with prometheus_client's text
parser, through Debian's prometheus-node-exporter scraped over HTTP, and by
the status command.  Its figures are held against the launcher's own log,
the workers' log lines and nginx's access log.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import launcher
from stack import Load, recycles, trac_behind_nginx
from test_core import DRAIN_S, WARM_S
from test_core import started as started_site
from support import (LAUNCHER, PYTHON, Process, ask_in_background, children, fcgi_get, free_port,
                     start_launcher, wait_until, worker_script, workers_of)

HELLO = worker_script("hello.py")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
PAGES = ["/wiki/WikiStart", "/timeline"]


# --------------------------------------------------------------------------
# Reading the file as its readers do.

def samples(text):
    """{(sample name, ((label, value), ...)): value}, parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def one(found, name, **labels):
    return found.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def per_worker(found, name):
    """{pid: value} of a per-worker metric."""
    return {int(dict(labels)["pid"]): value for (sample, labels), value in found.items() if sample == name}


def roles(found):
    return {int(dict(labels)["pid"]): dict(labels)["role"]
            for (sample, labels), _ in found.items() if sample == "trac_fcgi_worker_info"}


def read(path):
    """The file's samples, once it exists."""
    wait_until(lambda: os.path.exists(path), 30, "%s to be written" % path)
    with open(path) as source:
        return samples(source.read())


def settled(path, condition, timeout=60):
    """The file's samples once CONDITION(samples) holds."""
    latest = {}

    def check():
        latest["found"] = read(path)
        return condition(latest["found"])

    try:
        wait_until(check, timeout, "the metrics file to show it")
    except AssertionError as error:
        raise AssertionError("%s; the file last read:\n%s" % (
            error, open(path).read() if os.path.exists(path) else "(none)")) from None
    return latest["found"]


def serving(count):
    """A condition: COUNT ready workers and nobody warming up or draining."""
    return lambda found: (one(found, "trac_fcgi_workers") == count
                          and sorted(roles(found).values()) == ["serving"] * count)


@pytest.fixture
def launch(tmp_path):
    """Launchers with hello workers and a metrics file in tmp_path; stopped at the end."""
    started = []

    def launch(*flags, env=None, name="launcher"):
        path = str(tmp_path / (name + ".prom"))
        process = start_launcher(tmp_path, HELLO, "--metrics-file", path, *flags, env=env, name=name)
        process.metrics = path
        started.append(process)
        return process

    yield launch
    for process in started:
        process.stop(timeout=10)


# --------------------------------------------------------------------------
# The pieces, in-process.

def test_the_rendered_text_parses_with_prometheus_client_with_cumulative_buckets_and_escaped_labels():
    tally = launcher.Tally()
    tally.recycled("requests")
    tally.recycled("no-such-reason")  # a worker's word is never a new label value
    for seconds in (0.3, 0.7, 0.7, 45):
        tally.observe("trac_fcgi_handoff_seconds", seconds)
    values = {"trac_fcgi_slots": 2, "trac_fcgi_workers": 1,
              "trac_fcgi_worker_info": {(0, 41, 'odd "role"\\\n'): 1},
              "trac_fcgi_worker_age_seconds": {(0, 41): 1.5},
              "trac_fcgi_recycles_total": {(reason,): n for reason, n in tally.recycles.items()},
              "trac_fcgi_listen_backlog": None}
    values.update(tally.histograms)
    text = launcher.render_metrics(values)
    found = samples(text)
    # `status` reads the file with the launcher's own small parser: it reads what Prometheus reads.
    assert {(name, labels): value for name, series in launcher.read_metrics(text).items()
            for labels, value in series.items()} == found
    assert one(found, "trac_fcgi_slots") == 2
    assert one(found, "trac_fcgi_worker_info", slot=0, pid=41, role='odd "role"\\\n') == 1
    assert one(found, "trac_fcgi_worker_age_seconds", slot=0, pid=41) == 1.5
    assert one(found, "trac_fcgi_recycles_total", reason="requests") == 1
    assert one(found, "trac_fcgi_recycles_total", reason="asked") == 1
    assert one(found, "trac_fcgi_recycles_total", reason="crash") == 0
    buckets = [one(found, "trac_fcgi_handoff_seconds_bucket", le=le)
               for le in ("0.25", "0.5", "1", "30", "60", "+Inf")]
    assert buckets == [0, 1, 3, 3, 4, 4]
    assert one(found, "trac_fcgi_handoff_seconds_count") == 4
    assert one(found, "trac_fcgi_handoff_seconds_sum") == pytest.approx(46.7)
    assert not [key for key in found if key[0].startswith("trac_fcgi_listen_backlog")], "unknown is left out"


def test_a_write_replaces_the_file_whole_and_never_writes_through_a_planted_symlink(tmp_path):
    path, victim = tmp_path / "trac.prom", tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ("trac.prom.%d.tmp" % os.getpid())).symlink_to(victim)
    path.symlink_to(victim)  # the file itself is replaced, not followed either
    old_umask = os.umask(0o077)
    try:
        launcher.write_atomically(str(path), "trac_fcgi_slots 1\n")
    finally:
        os.umask(old_umask)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.read_text() == "trac_fcgi_slots 1\n"
    assert path.stat().st_mode & 0o777 == 0o644, "node_exporter, another user, can read it whatever the umask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trac.prom", "victim"]


@pytest.mark.parametrize("family, address", [(socket.AF_UNIX, None), (socket.AF_INET, ("127.0.0.1", 0)),
                                             (socket.AF_INET6, ("::1", 0))], ids=["unix", "tcp", "tcp6"])
def test_the_listen_backlog_counts_connections_that_no_one_has_accepted(tmp_path, family, address):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    listener = socket.socket(family, socket.SOCK_STREAM)
    address = address or str(tmp_path / "backlog.sock")
    listener.bind(address)
    listener.listen(7)
    clients = []
    try:
        assert launcher.listen_backlog(listener) == (0, 7)
        for _ in range(3):
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect(listener.getsockname())
            clients.append(client)
        # A TCP connection joins the accept queue when the handshake ends.
        wait_until(lambda: launcher.listen_backlog(listener) == (3, 7), 10, "3 waiting")
        listener.accept()[0].close()
        assert launcher.listen_backlog(listener) == (2, 7)
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_pss_and_private_memory_of_a_real_process_are_at_most_its_resident_size():
    # The child says when its buffer is filled: its resident size passes 32 MiB
    # (the interpreter's own pages count too) before the last of it is written.
    child = subprocess.Popen([PYTHON, "-c", "import time; b = bytearray(32 << 20); print('filled', flush=True); "
                              "time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"filled\n"
        pss, private = launcher.shared_memory(child.pid)
        rss = launcher.resident_bytes(child.pid)
        assert 32 << 20 < private <= pss <= rss
    finally:
        child.kill()
        child.wait()
    assert launcher.shared_memory(child.pid) == (None, None), "a process that is gone reads as unknown"


# --------------------------------------------------------------------------
# What a worker tells its launcher.

# A stand-in launcher that only listens: it starts the worker with itself as
# LAUNCHER_PID, records every notify datagram with the time it came, and
# ignores SIGUSR1 (a real launcher would start a replacement).
RECORDING_LAUNCHER = """
import json, os, signal, socket, subprocess, sys, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(os.environ["RECORD_SOCKET"])
notify.settimeout(0.1)
worker = subprocess.Popen(sys.argv[1:], env=dict(os.environ, LAUNCHER_PID=str(os.getpid()),
                                                 NOTIFY_SOCKET=os.environ["RECORD_SOCKET"]))
with open(os.environ["RECORD_FILE"], "a") as out:
    while True:
        exited = worker.poll() is not None
        try:
            data = notify.recv(4096)
        except OSError:
            if exited:
                break
            continue
        out.write(json.dumps([time.monotonic(), data.decode()]) + "\\n")
        out.flush()
"""


def test_a_worker_reports_its_count_at_most_once_a_second_why_it_asks_to_go_and_what_it_left(tmp_path):
    record = tmp_path / "notify.jsonl"
    sock = str(tmp_path / "worker.sock")
    worker = Process(["spawn-fcgi", "-n", "-s", sock, "--", PYTHON, "-c", RECORDING_LAUNCHER, *HELLO],
                     tmp_path / "worker.log", env={"RECORD_SOCKET": str(tmp_path / "notify"),
                                                   "RECORD_FILE": str(record),
                                                   "TRAC_FCGI_MAX_REQUESTS": "25", "TRAC_FCGI_JITTER": "0"})
    try:
        worker.wait_for("warm")
        wait_until(lambda: os.path.exists(sock), 10)
        started = time.monotonic()
        for _ in range(40):
            assert fcgi_get(sock).status == 200
            time.sleep(0.05)
        spread = time.monotonic() - started
        os.kill(children(worker.pid)[0], signal.SIGHUP)
        assert worker.wait(30) == 0
    finally:
        worker.stop()
    messages = [(when, dict(line.split("=", 1) for line in text.splitlines()))
                for when, text in map(json.loads, record.read_text().splitlines())]
    assert messages[0][1] == {"READY": "1"}
    counts = [(when, int(fields["REQUESTS"])) for when, fields in messages[1:-1] if "REQUESTS" in fields]
    # One report a second at most: over the 2 s or more that 40 requests took, a few, each higher.
    # (Counted over the whole run: the times here are when our recorder got round to each datagram,
    # which a loaded machine delays by different amounts.)
    assert 2 <= len(counts) <= spread + 2, (spread, messages)
    assert all(b[1] > a[1] for a, b in zip(counts, counts[1:])), messages
    assert [fields for _, fields in messages if "RECYCLE" in fields and "STOPPING" not in fields] \
        == [{"RECYCLE": "requests"}], "asked once, and said why"
    # The last word: the final count, nothing abandoned, and that a signal (ours) stopped it.
    assert messages[-1][1] == {"STOPPING": "1", "REQUESTS": "40", "ABANDONED": "0", "RECYCLE": "signal"}


# --------------------------------------------------------------------------
# The counting, in the launcher's core, on a clock turned by hand (see test_core.py).

def recycled(site):
    return {reason: n for reason, n in site.core.tally.recycles.items() if n}


def histogram(site, name):
    figure = site.core.tally.histograms[name]
    return figure.count, figure.sum


def test_a_worker_that_asks_is_counted_once_under_its_reason_with_its_handoff_and_drain_times():
    site = started_site(slots=2)
    worker = site.serving(0)
    site.core.notified(worker, {"REQUESTS": "20"}, site.now)
    site.core.notified(worker, {"RECYCLE": "requests"}, site.now)
    site.signal_launcher(signal.SIGUSR1, sender=worker)
    site.signal_launcher(signal.SIGUSR1, sender=worker)  # asked again: still one recycle
    site.run_until(site.now + 30)
    assert recycled(site) == {"requests": 1}
    assert histogram(site, "trac_fcgi_handoff_seconds") == (1, pytest.approx(WARM_S))
    assert histogram(site, "trac_fcgi_drain_seconds") == (1, pytest.approx(DRAIN_S))
    assert site.core.tally.requests_of_past_workers == 20
    assert site.core.tally.crashes == 0


def test_a_rolling_restart_counts_every_slot_as_rolling_unless_its_worker_gave_its_own_reason():
    site = started_site(slots=3)
    site.core.notified(site.serving(2), {"RECYCLE": "rss"}, site.now)
    site.signal_launcher(signal.SIGHUP)
    site.run_until(site.now + 60)
    assert recycled(site) == {"rolling": 2, "rss": 1}
    count, total = histogram(site, "trac_fcgi_handoff_seconds")
    # One warm-up after another: the third slot waited for the first two.
    assert count == 3 and total == pytest.approx(WARM_S * (1 + 2 + 3), rel=0.1)


def test_a_worker_at_its_hard_limit_that_leaves_on_its_own_is_counted_under_max_rss():
    site = started_site()
    worker = site.serving()
    site.core.notified(worker, {"RECYCLE": "rss"}, site.now)
    site.signal_launcher(signal.SIGUSR1, sender=worker)
    site.core.notified(worker, {"STOPPING": "1", "REQUESTS": "7", "ABANDONED": "0", "RECYCLE": "max_rss"},
                       site.now)
    site.core.exited(worker, 0, site.now)
    site.run_until(site.now + 30)
    assert recycled(site) == {"max_rss": 1}
    assert site.core.tally.crashes == 0 and site.core.tally.requests_of_past_workers == 7


def test_a_killed_worker_is_a_crash_and_a_replacement_that_dies_warming_is_a_crash_but_no_recycle():
    site = started_site()
    site.kill(site.serving())
    site.run_until(site.now + 10)
    assert recycled(site) == {"crash": 1} and site.core.tally.crashes == 1
    site.behaviour[0] = "crash"
    site.signal_launcher(signal.SIGHUP)
    site.run_until(site.now + 0.5)
    assert recycled(site) == {"crash": 1} and site.core.tally.crashes == 2


def test_removed_slots_and_memory_headroom_handoffs_are_counted_too():
    site = started_site(slots=2, shortage={"rss": 1, "mem_available": 0, "reserve": 1})
    site.signal_launcher(signal.SIGTTOU)
    site.core.notified(site.serving(0), {"RECYCLE": "age"}, site.now)
    site.signal_launcher(signal.SIGUSR1, sender=site.serving(0))
    site.run_until(site.now + 30)
    assert recycled(site) == {"slot-removed": 1, "age": 1}
    assert histogram(site, "trac_fcgi_handoff_seconds") == (1, 0.0), "stopped at once, then started"
    assert site.core.tally.stop_then_start == 1


def test_a_replacement_silent_past_the_ready_timeout_is_counted_and_the_old_worker_is_no_recycle():
    site = started_site(ready_timeout=5.0)
    site.speaks_notify = False
    site.signal_launcher(signal.SIGHUP)
    site.run_until(site.now + 5.5)
    assert site.core.tally.ready_timeouts == 1
    assert recycled(site) == {} and site.core.tally.crashes == 0


def test_stopping_the_launcher_is_no_recycle_and_no_crash_even_when_workers_are_killed():
    site = started_site(slots=2, behaviour={0: "hang", 1: "hang"}, stop_timeout=5.0)
    site.signal_launcher(signal.SIGTERM)
    site.run_until(site.now + 10)
    assert not site.core.workers
    assert recycled(site) == {} and site.core.tally.crashes == 0


def test_a_word_a_worker_should_not_say_is_no_new_reason():
    site = started_site()
    site.core.notified(site.serving(), {"RECYCLE": "because\nI said so", "REQUESTS": "-3"}, site.now)
    site.signal_launcher(signal.SIGUSR1, sender=site.serving())
    site.run_until(site.now + 30)
    assert recycled(site) == {"asked": 1} and site.core.tally.requests_of_past_workers == 0


# --------------------------------------------------------------------------
# The launcher writes it.

def test_the_file_holds_every_declared_metric_and_memory_for_every_worker(launch):
    process = launch("--workers", "2")
    process.wait_for("all-ready")
    found = settled(process.metrics, serving(2))
    names = {name for name, _ in found}
    for name, kind, _, _ in launcher.METRICS:
        if name.startswith("trac_fcgi_cgroup_") and launcher.cgroup_memory() is None:
            continue  # no memory limit here to report: tests/test_cgroup.py makes one
        assert (name + "_count" if kind == "histogram" else name) in names, name
    pids = set(workers_of(process.pid))
    assert len(pids) == 2
    for name in ("trac_fcgi_worker_resident_bytes", "trac_fcgi_worker_pss_bytes",
                 "trac_fcgi_worker_private_bytes", "trac_fcgi_worker_age_seconds"):
        assert set(per_worker(found, name)) == pids, name
    for pid in pids:
        assert 0 < per_worker(found, "trac_fcgi_worker_private_bytes")[pid] \
            <= per_worker(found, "trac_fcgi_worker_pss_bytes")[pid] \
            <= per_worker(found, "trac_fcgi_worker_resident_bytes")[pid]
    assert one(found, "trac_fcgi_slots") == 2
    assert one(found, "trac_fcgi_listen_backlog") == 0


def test_requests_and_recycles_for_requests_match_what_was_asked_and_what_the_log_says(launch):
    process = launch(env={"TRAC_FCGI_MAX_REQUESTS": "5", "TRAC_FCGI_JITTER": "0"})
    process.wait_for("all-ready")
    # Five requests to each of four workers, each replaced before the next
    # five (the old worker serves on until its replacement is ready), then three.
    for handoffs in (1, 2, 3, 4):
        for _ in range(5):
            assert fcgi_get(process.socket).status == 200
        process.wait_for("hup", count=handoffs, timeout=60)
    for _ in range(3):
        assert fcgi_get(process.socket).status == 200
    process.wait_for("exit", count=4, timeout=60)
    found = settled(process.metrics, lambda found: one(found, "trac_fcgi_requests_total") == 23
                    and one(found, "trac_fcgi_drain_seconds_count") == 4)
    handoffs = recycles(process)
    assert len(handoffs) == 4
    assert one(found, "trac_fcgi_recycles_total", reason="requests") == len(handoffs)
    assert sum(v for (name, _), v in found.items() if name == "trac_fcgi_recycles_total") == len(handoffs)
    assert one(found, "trac_fcgi_handoff_seconds_count") == len(handoffs)
    assert one(found, "trac_fcgi_crashes_total") == 0
    assert list(per_worker(found, "trac_fcgi_worker_requests").values()) == [3]


def test_each_way_a_worker_leaves_is_counted_under_its_reason(launch):
    process = launch("--workers", "2")
    process.wait_for("all-ready")
    count = lambda found, reason: one(found, "trac_fcgi_recycles_total", reason=reason)

    process.signal(signal.SIGHUP)
    found = settled(process.metrics, lambda found: count(found, "rolling") == 2 and serving(2)(found))

    victim = sorted(roles(found))[0]
    os.kill(victim, signal.SIGTERM)  # someone else signals a worker: it drains and exits 0
    found = settled(process.metrics, lambda found: count(found, "signal") == 1 and serving(2)(found))

    victim = sorted(roles(found))[0]
    os.kill(victim, signal.SIGKILL)
    found = settled(process.metrics, lambda found: count(found, "crash") == 1 and serving(2)(found))
    assert one(found, "trac_fcgi_crashes_total") == 1

    process.signal(signal.SIGTTOU)
    found = settled(process.metrics, lambda found: count(found, "slot-removed") == 1 and serving(1)(found))
    assert one(found, "trac_fcgi_slots") == 1
    by_reason = {dict(labels)["reason"]: v for (name, labels), v in found.items()
                 if name == "trac_fcgi_recycles_total" and v}
    assert by_reason == {"rolling": 2, "signal": 1, "crash": 1, "slot-removed": 1}
    assert one(found, "trac_fcgi_crashes_total") == 1
    assert one(found, "trac_fcgi_drain_seconds_count") == 3, "the rolling restart's two and the removed slot's"


def test_a_request_a_draining_worker_gives_up_is_counted_as_abandoned(launch):
    process = launch(env={"TRAC_FCGI_DRAIN_TIMEOUT": "1"})
    process.wait_for("all-ready")
    old = workers_of(process.pid)[0]
    threads, answers = ask_in_background(process.socket, query="delay=30")
    wait_until(lambda: per_worker(read(process.metrics), "trac_fcgi_worker_age_seconds"), 10)
    time.sleep(0.5)  # the request reaches the worker
    process.signal(signal.SIGHUP)
    process.wait_for("exit", pid=old, timeout=30)
    found = settled(process.metrics, lambda found: one(found, "trac_fcgi_abandoned_requests_total") == 1
                    and serving(1)(found))
    assert one(found, "trac_fcgi_crashes_total") == 0
    assert one(found, "trac_fcgi_recycles_total", reason="rolling") == 1
    for thread in threads:
        thread.join(60)
    assert len(answers) == 1 and isinstance(answers[0], Exception), "the abandoned request got no answer"


def test_a_worker_at_its_hard_memory_limit_is_counted_under_max_rss(launch):
    process = launch(env={"HELLO_LEAK": str(4 << 20), "TRAC_FCGI_MAX_RSS": "64M", "TRAC_FCGI_SOFT_RSS": "64M",
                          "TRAC_FCGI_JITTER": "0"})
    process.wait_for("all-ready")
    first = workers_of(process.pid)[0]
    wait_until(lambda: fcgi_get(process.socket).body.split()[-1] != str(first).encode(), 60,
               "a new worker to answer")
    found = settled(process.metrics, lambda found: one(found, "trac_fcgi_recycles_total", reason="max_rss") == 1)
    assert one(found, "trac_fcgi_crashes_total") == 0


def test_the_file_is_rewritten_while_idle_and_never_read_half_written(launch):
    process = launch("--workers", "2")
    process.wait_for("all-ready")
    first = settled(process.metrics, serving(2))
    last = launcher.METRICS[-1][0]  # the end of every whole file
    torn = []
    reads = {"count": 0}
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            with open(process.metrics) as source:
                text = source.read()
            reads["count"] += 1
            if not text.endswith("\n") or last not in text:
                torn.append(text)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for restarts in (1, 2, 3):
            process.signal(signal.SIGHUP)
            process.wait_for("rolling-restart-done", count=restarts, timeout=60)
        settled(process.metrics, serving(2))
        # The replaced workers and the old mold leave after the restart is done: wait for quiet.
        wait_until(lambda: len(children(process.pid)) == 3, 60, "two workers and the mold, nothing else")
        quiet_since = time.time()
        wait_until(lambda: os.stat(process.metrics).st_mtime > quiet_since, 30, "a write after the last change")
        settled_at = settled(process.metrics, serving(2))
        # Nothing happens from now on, yet the file is rewritten (within 10 s) with older workers.
        events, written = len(process.log().splitlines()), os.stat(process.metrics).st_mtime
        wait_until(lambda: os.stat(process.metrics).st_mtime > written + 3, 40, "a write with nothing happening")
        later = read(process.metrics)
    finally:
        stop.set()
        thread.join(5)
    assert reads["count"] > 100 and not torn, "%d of %d reads were torn" % (len(torn), reads["count"])
    assert len(process.log().splitlines()) == events, "something happened after all:\n" + process.log()
    assert roles(later) == roles(settled_at) and set(roles(later)).isdisjoint(roles(first))
    before = per_worker(settled_at, "trac_fcgi_worker_age_seconds")
    after = per_worker(later, "trac_fcgi_worker_age_seconds")
    assert all(after[pid] > before[pid] + 3 for pid in before), (before, after)
    assert not [name for name in os.listdir(os.path.dirname(process.metrics)) if name.endswith(".tmp")]


def test_a_metrics_directory_that_vanishes_is_logged_once_and_the_file_comes_back_with_it(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    path = str(directory / "trac.prom")
    process = start_launcher(tmp_path, HELLO, "--workers", "2", "--metrics-file", path)
    try:
        process.wait_for("all-ready")
        settled(path, serving(2))
        # Moved away in one step: a write racing a recursive delete would make it fail.
        directory.rename(tmp_path / "gone")
        process.signal(signal.SIGHUP)
        process.wait_for("metrics-write-failed", timeout=30)
        process.wait_for("rolling-restart-done", count=1, timeout=60)
        process.signal(signal.SIGHUP)
        process.wait_for("rolling-restart-done", count=2, timeout=60)
        time.sleep(2 * launcher.METRICS_COALESCE_S)  # the writes those events are due, failing too
        assert len(process.events("metrics-write-failed")) == 1, process.log()
        assert fcgi_get(process.socket).status == 200
        directory.mkdir()
        process.wait_for("metrics-written", timeout=30)
        found = settled(path, serving(2))
        assert one(found, "trac_fcgi_recycles_total", reason="rolling") == 4
    finally:
        process.stop()


# --------------------------------------------------------------------------
# `trac-fcgi-launcher status`

def run_status(*argv, env=None):
    environ = dict(os.environ)
    environ.pop("LAUNCHER_METRICS_FILE", None)
    environ.update(env or {})
    return subprocess.run([PYTHON, LAUNCHER, "status", *argv], capture_output=True, text=True, env=environ,
                          timeout=30)


def test_status_prints_a_row_per_worker_then_the_recycles_by_reason(launch):
    process = launch("--workers", "2")
    process.wait_for("all-ready")
    for _ in range(8):
        fcgi_get(process.socket)
    process.signal(signal.SIGHUP)
    settled(process.metrics, lambda found: one(found, "trac_fcgi_recycles_total", reason="rolling") == 2
            and serving(2)(found) and one(found, "trac_fcgi_requests_total") == 8)
    for outcome in (run_status(process.metrics), run_status(env={"LAUNCHER_METRICS_FILE": process.metrics})):
        assert outcome.returncode == 0, outcome.stderr
        lines = outcome.stdout.splitlines()
        assert lines[0].split() == ["slot", "pid", "role", "age", "requests", "RSS", "PSS", "private"]
        rows = [line.split() for line in lines[1:3]]
        assert sorted(int(row[1]) for row in rows) == sorted(workers_of(process.pid))
        assert [row[2] for row in rows] == ["serving", "serving"]
        assert all(row[5].endswith("M") and row[6].endswith("M") and row[7].endswith("M") for row in rows)
        assert "2 of 2 slots ready" in outcome.stdout
        assert "8 requests;" in outcome.stdout
        assert lines[-1] == "recycles: rolling 2"


def test_status_shows_slow_and_stuck_requests_unresponsive_kills_and_the_cgroup_s_memory(tmp_path):
    path = tmp_path / "trac.prom"
    recycles = dict.fromkeys(launcher.RECYCLE_REASONS, 0)
    recycles.update(stuck=1, unresponsive=2)
    path.write_text(launcher.render_metrics({
        "trac_fcgi_slots": 1, "trac_fcgi_workers": 1, "trac_fcgi_slow_requests_total": 3,
        "trac_fcgi_stuck_requests_total": 1, "trac_fcgi_unresponsive_kills_total": 2,
        "trac_fcgi_stale_molds_total": 4, "trac_fcgi_cgroup_memory_limit_bytes": 1 << 30,
        "trac_fcgi_cgroup_memory_usage_bytes": 300 << 20,
        "trac_fcgi_recycles_total": {(reason,): count for reason, count in recycles.items()}}))
    shown = run_status(str(path))
    assert shown.returncode == 0, shown.stderr
    assert "3 slow requests; 1 stuck requests; 2 unresponsive kills; 4 stale molds replaced" in shown.stdout
    assert "cgroup memory: 300.0M used of 1024.0M" in shown.stdout
    assert shown.stdout.splitlines()[-1] == "recycles: unresponsive 2, stuck 1"


def test_status_of_a_file_not_rewritten_for_a_while_asks_whether_the_launcher_still_runs(tmp_path):
    path = tmp_path / "trac.prom"
    path.write_text(launcher.render_metrics({"trac_fcgi_slots": 1, "trac_fcgi_workers": 1,
                                             "trac_fcgi_worker_info": {(0, 4242, "serving"): 1},
                                             "trac_fcgi_worker_resident_bytes": {(0, 4242): 50 << 20}}))
    fresh = run_status(str(path))
    assert fresh.returncode == 0 and "4242" in fresh.stdout and "50.0M" in fresh.stdout
    assert "still running" not in fresh.stdout
    five_minutes_ago = time.time() - 300
    os.utime(path, (five_minutes_ago, five_minutes_ago))
    stale = run_status(str(path))
    assert stale.returncode == 0
    last = stale.stdout.splitlines()[-1]
    assert last.startswith("written 5m") and last.endswith("s ago: is the launcher still running?"), last


@pytest.mark.parametrize("argv, env", [([], {}), (["/nonexistent/trac.prom"], {}), ([LAUNCHER], {})],
                         ids=["no-path", "missing-file", "not-a-metrics-file"])
def test_status_without_a_metrics_file_says_so_in_one_line_and_exits_2(argv, env):
    outcome = run_status(*argv, env=env)
    assert outcome.returncode == 2 and outcome.stdout == ""
    assert outcome.stderr.count("\n") == 1 and "Traceback" not in outcome.stderr, outcome.stderr


def test_a_metrics_file_whose_directory_is_missing_is_refused_in_one_line(tmp_path):
    outcome = subprocess.run([PYTHON, LAUNCHER, "--bind", "unix:" + str(tmp_path / "s.sock"),
                              "--metrics-file", str(tmp_path / "no" / "trac.prom"), "--", *HELLO],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert outcome.returncode == 2
    assert outcome.stderr.count("\n") == 1 and "--metrics-file" in outcome.stderr, outcome.stderr


# --------------------------------------------------------------------------
# node_exporter, and the whole stack under load

class NodeExporter:
    """Debian's prometheus-node-exporter on a free port of 127.0.0.1, reading DIRECTORY's *.prom."""

    def __init__(self, directory, log):
        for _ in range(5):
            self.port = free_port()
            self.process = Process([NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
                                    "--collector.textfile.directory=%s" % directory,
                                    "--web.listen-address=127.0.0.1:%d" % self.port], log)
            try:
                wait_until(lambda: self.process.popen.poll() is not None or self._answers(), 30)
            except AssertionError:
                pass
            if self.process.popen.poll() is None and self._answers():
                return
            self.process.stop()
        raise AssertionError("node_exporter did not start:\n" + self.process.log())

    def _answers(self):
        try:
            self.scrape()
            return True
        except OSError:
            return False

    def scrape(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.port, timeout=10) as response:
            return response.read().decode()

    def stop(self):
        self.process.stop()


def test_node_exporter_serves_every_sample_of_the_file(launch, tmp_path, started):
    process = launch("--workers", "2")
    process.wait_for("all-ready")
    settled(process.metrics, serving(2))
    exporter = NodeExporter(str(tmp_path), tmp_path / "node_exporter.log")
    started.append(exporter)
    served = samples(exporter.scrape())
    ours = read(process.metrics)
    assert one(served, "node_textfile_scrape_error") == 0
    # Ages and memory move between two reads; which samples there are does not.
    assert {key for key in served if key[0].startswith("trac_fcgi_")} == set(ours)


def test_under_load_through_nginx_the_file_counts_what_nginx_answered_and_node_exporter_serves_it(
        tmp_path, trac_env, started):
    directory = tmp_path / "metrics"
    directory.mkdir()
    path = str(directory / "trac.prom")
    nginx, process = trac_behind_nginx(started, tmp_path, trac_env, "--workers", "2", "--metrics-file", path,
                                       env={"TRAC_FCGI_MAX_REQUESTS": "20"})
    exporter = NodeExporter(str(directory), tmp_path / "node_exporter.log")
    started.append(exporter)
    # Until four handoffs (about 80 requests at 20 a worker): seconds on an
    # idle machine, minutes on a loaded one.
    load = Load(nginx.port, PAGES, clients=8).run(
        stop=lambda seconds: seconds >= 10 and len(recycles(process)) >= 4, max_seconds=300)
    answered = [entry for entry in nginx.access_log() if entry["status"] == 200]
    report = "%s\n%d recycles" % (load.summary(), len(recycles(process)))
    assert len(recycles(process)) >= 4 and len(answered) >= 80, report

    # Once every worker that asked has been replaced and reported its last count.
    asked = lambda: len(process.events("recycle", reason="requests"))
    found = settled(path, lambda found: serving(2)(found) and asked() == len(recycles(process))
                    and one(found, "trac_fcgi_recycles_total", reason="requests") == asked()
                    and one(found, "trac_fcgi_requests_total") >= 0.95 * len(answered), timeout=90)
    report += "\nfile:\n%s" % open(path).read()
    assert one(found, "trac_fcgi_recycles_total", reason="requests") == len(recycles(process)), report
    total = one(found, "trac_fcgi_requests_total")
    assert abs(total - len(answered)) <= 0.05 * len(answered), "%d counted, %d answered: %s" % (
        total, len(answered), report)
    workers = set(roles(found))
    assert workers == set(workers_of(process.pid)), report
    for name in ("trac_fcgi_worker_resident_bytes", "trac_fcgi_worker_pss_bytes"):
        assert set(per_worker(found, name)) == workers, name
    resident, pss = per_worker(found, "trac_fcgi_worker_resident_bytes"), per_worker(found, "trac_fcgi_worker_pss_bytes")
    assert all(value > 20 << 20 for value in resident.values()), "a Trac worker is bigger: %s" % resident
    # Forked from a mold, a worker shares most of its pages: its PSS is a share of its RSS.
    assert all(0 < pss[key] <= resident[key] for key in resident), (pss, resident)

    served = samples(exporter.scrape())
    assert one(served, "node_textfile_scrape_error") == 0
    ours = read(path)
    assert {key for key in served if key[0].startswith("trac_fcgi_")} == set(ours)
    assert one(served, "trac_fcgi_recycles_total", reason="requests") == len(recycles(process))

    outcome = run_status(path)
    assert outcome.returncode == 0, outcome.stderr
    assert all(str(pid) in outcome.stdout for pid in workers), outcome.stdout
    assert "requests %d" % len(recycles(process)) in outcome.stdout, outcome.stdout
