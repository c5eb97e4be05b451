"""Hostile input straight to a worker's socket, while a well-behaved client keeps getting 200.

Each test starts a real trac_fcgi worker (the hello app) under `spawn-fcgi -n`,
so the process we measure is the worker itself, and talks to its unix socket
with a small FastCGI record encoder written here (struct '!BBHHBx'), not
flup's client: a hostile peer must be free to send what no client library
would.  What each test injects and what must hold is in its docstring.
"""
import errno
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import support

MAX_THREADS = 4
IDLE_TIMEOUT = 2

# --------------------------------------------------------------------------
# A FastCGI record encoder, small enough to be obviously right.

HEADER = struct.Struct("!BBHHBx")
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN = 1, 2, 3, 4, 5
STDOUT, STDERR, GET_VALUES_RESULT, UNKNOWN_TYPE = 6, 7, 10, 11
RESPONDER, KEEP_CONN = 1, 1
# What a responder may send back: anything else is broken framing.
SENT_BY_A_RESPONDER = {END_REQUEST, STDOUT, STDERR, GET_VALUES_RESULT, UNKNOWN_TYPE}


def record(kind, request_id, content=b"", version=1, padding=0, length=None):
    """One record; LENGTH may lie about CONTENT, which is the point of some tests."""
    length = len(content) if length is None else length
    return HEADER.pack(version, kind, request_id, length, padding) + content + b"\0" * padding


def pair_length(n, force_long=False):
    return struct.pack("!L", n | 0x80000000) if n > 127 or force_long else bytes([n])


def pair(name, value):
    return pair_length(len(name)) + pair_length(len(value)) + name + value


def begin(request_id, flags=0, role=RESPONDER):
    return record(BEGIN_REQUEST, request_id, struct.pack("!HB5x", role, flags))


def params(request_id, pairs):
    """PARAMS records carrying PAIRS (split at 65535 bytes), then the empty one that starts the request."""
    content = b"".join(pair(name, value) for name, value in pairs)
    chunks = [content[i:i + 65535] for i in range(0, len(content), 65535)]
    return b"".join(record(PARAMS, request_id, chunk) for chunk in chunks) + record(PARAMS, request_id)


def get_request(request_id=1, path=b"/", query=b"", keep_conn=False, extra=()):
    """A complete, valid GET: BEGIN_REQUEST, PARAMS, empty PARAMS, empty STDIN."""
    pairs = [(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b""), (b"PATH_INFO", path),
             (b"QUERY_STRING", query), (b"SERVER_NAME", b"localhost"), (b"SERVER_PORT", b"80"),
             (b"SERVER_PROTOCOL", b"HTTP/1.1"), *extra]
    return (begin(request_id, KEEP_CONN if keep_conn else 0) + params(request_id, pairs)
            + record(STDIN, request_id))


def parse_records(data):
    """(records, leftover bytes) for DATA as a peer sent it."""
    records = []
    while len(data) >= HEADER.size:
        version, kind, request_id, length, padding = HEADER.unpack_from(data)
        end = HEADER.size + length + padding
        if len(data) < end:
            break
        records.append((version, kind, request_id, data[HEADER.size:HEADER.size + length]))
        data = data[end:]
    return records, data


def status_of(data):
    """The HTTP status in a worker's STDOUT stream, or None."""
    records, _ = parse_records(data)
    stdout = b"".join(content for _, kind, _, content in records if kind == STDOUT)
    if not stdout.startswith(b"Status: "):
        return None
    return int(stdout[len(b"Status: "):].split()[0])


# --------------------------------------------------------------------------
# Talking to a worker as a hostile (or merely raw) peer.

def connect(address, timeout=30, source=None):
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def read_until_closed(sock, limit=1 << 20):
    """Everything the worker sends until it closes; a reset counts as closed."""
    received = []
    try:
        while sum(map(len, received)) < limit:
            data = sock.recv(65536)
            if not data:
                break
            received.append(data)
    except ConnectionResetError:
        pass
    return b"".join(received)


def exchange(address, payload, timeout=30, source=None):
    """Send PAYLOAD, say we are done, and return all the worker answered before closing."""
    with connect(address, timeout, source) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            # The worker closed on us mid-payload: allowed, it owes us nothing.
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise
        return read_until_closed(sock)


def assert_served(address):
    """A well-behaved client (flup's own) gets a whole 200."""
    response = support.fcgi_get(address, timeout=60)
    assert response.status == 200
    assert response.body.startswith(b"hello from pid ")
    assert len(response.body) == int(response.headers["content-length"])
    return response


# --------------------------------------------------------------------------
# The worker under attack.

def proc_status(pid):
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0]) * 1024


def start_worker(tmp_path, name="worker", **env):
    """The hello worker under `spawn-fcgi -n`, which execs it: the pid is the worker's own."""
    sock = str(tmp_path / (name + ".sock"))
    environ = {"TRAC_FCGI_MAX_THREADS": str(MAX_THREADS), "TRAC_FCGI_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}
    environ.update(env)
    worker = support.Process(["spawn-fcgi", "-n", "-s", sock, "--", *support.worker_script("hello.py")],
                             tmp_path / (name + ".log"), env=environ)
    worker.socket = sock
    # spawn-fcgi creates the file at bind() and listens only after: until then a
    # connection is refused, a window that a loaded machine widens.
    support.wait_until(lambda: support.listening(sock), 30, "spawn-fcgi to listen on " + sock)
    assert_served(sock)
    assert "hello.py" in Path("/proc/%d/cmdline" % worker.pid).read_text()
    return worker


@pytest.fixture
def worker(tmp_path):
    worker = start_worker(tmp_path)
    yield worker
    worker.stop()


def assert_still_the_same_worker(worker):
    assert worker.popen.poll() is None, worker.log()[-3000:]
    # No drain and no re-exec: hostile input is no reason to recycle.
    assert not worker.events("drain"), worker.log()[-3000:]
    assert not worker.events("re-exec"), worker.log()[-3000:]


# --------------------------------------------------------------------------
# Hostile inputs: each builder makes one kind, from plain values, so that
# hypothesis and a seeded random.Random can both drive them.

# The hello app sleeps for ?delay=; never let the fuzzer ask for that.
FORBIDDEN_NAMES = {b"QUERY_STRING", b"REQUEST_URI"}


def valid_request(request_id, keep_conn, pairs):
    return get_request(request_id, keep_conn=keep_conn, extra=pairs)


def truncated(whole, cut):
    """A prefix of a valid request, cut anywhere (inside a header, too)."""
    return whole[:cut % len(whole)]


def huge_content_length(kind, request_id, declared, sent):
    """A header that promises DECLARED bytes (up to 65535) and delivers fewer."""
    return record(kind, request_id, sent[:max(0, declared - 1)], length=declared)


def odd_record(version, kind, request_id, content, padding):
    """Any version, any type, any padding: unknown types and versions included."""
    return record(kind, request_id, content, version=version, padding=padding)


def oversized_pairs(request_id, name_length, value_length, actual, big_value):
    """Name/value lengths that overrun their record, then a real but very large value."""
    lying = pair_length(name_length, True) + pair_length(value_length, True) + actual
    honest = pair(b"HTTP_X_BIG", b"v" * big_value)
    return (begin(request_id) + record(PARAMS, request_id, lying[:65535])
            + record(PARAMS, request_id, honest[:65535]) + record(PARAMS, request_id) + record(STDIN, request_id))


def reused_request_id(request_id, pairs):
    """Two BEGIN_REQUESTs for one id on one (non-multiplexed) connection, then the rest of a request."""
    whole = valid_request(request_id, False, pairs)
    return begin(request_id) + whole + begin(request_id, KEEP_CONN) + whole


def abort_mid_stream(request_id, pairs, cut):
    """FCGI_ABORT_REQUEST between the PARAMS records of a request."""
    whole = valid_request(request_id, False, pairs)
    head = len(begin(request_id))
    cut = head + cut % (len(whole) - head)
    return whole[:cut] + record(ABORT_REQUEST, request_id) + whole[cut:]


def garbage_after_request(request_id, keep_conn, garbage):
    return valid_request(request_id, keep_conn, []) + garbage


request_ids = st.one_of(st.sampled_from([0, 1, 2, 65535]), st.integers(0, 65535))
names = st.binary(max_size=24).filter(lambda name: name not in FORBIDDEN_NAMES)
pairs = st.lists(st.tuples(names, st.binary(max_size=64)), max_size=4)
kinds = st.one_of(st.integers(0, 255), st.sampled_from([0, 9, 11, 12, 255]))

hostile_chunk = st.one_of(
    st.builds(valid_request, request_ids, st.booleans(), pairs),
    st.builds(truncated, st.builds(valid_request, request_ids, st.booleans(), pairs), st.integers(0, 1 << 16)),
    st.builds(huge_content_length, kinds, request_ids, st.integers(1000, 65535), st.binary(max_size=128)),
    st.builds(odd_record, st.integers(0, 255), kinds, request_ids, st.binary(max_size=64), st.integers(0, 255)),
    st.builds(oversized_pairs, request_ids, st.integers(128, 0x7fffffff), st.integers(128, 0x7fffffff),
              st.binary(max_size=64), st.integers(0, 60000)),
    st.builds(reused_request_id, request_ids, pairs),
    st.builds(abort_mid_stream, st.integers(1, 65535), pairs, st.integers(0, 1 << 16)),
    st.builds(garbage_after_request, request_ids, st.booleans(), st.binary(min_size=1, max_size=256)),
    st.binary(min_size=1, max_size=256),
)


def random_hostile_payload(rng):
    """One hostile payload from RNG: the same kinds as the hypothesis strategy."""
    def request_id():
        return rng.choice([0, 1, 2, 65535, rng.randrange(65536)])

    def some_pairs():
        return [(rng.randbytes(rng.randrange(24)), rng.randbytes(rng.randrange(64)))
                for _ in range(rng.randrange(4))]

    def garbage():
        return rng.randbytes(rng.randrange(1, 256))

    kind = rng.randrange(9)
    if kind == 0:
        chunk = valid_request(request_id(), rng.random() < 0.5, some_pairs())
    elif kind == 1:
        chunk = truncated(valid_request(request_id(), rng.random() < 0.5, some_pairs()), rng.randrange(1 << 16))
    elif kind == 2:
        chunk = huge_content_length(rng.randrange(256), request_id(), rng.randrange(1000, 65536), garbage())
    elif kind == 3:
        chunk = odd_record(rng.randrange(256), rng.randrange(256), request_id(), garbage(), rng.randrange(256))
    elif kind == 4:
        # Big honest values are rarer here, or 10,000 of them would only measure the copy.
        chunk = oversized_pairs(request_id(), rng.randrange(128, 0x7fffffff), rng.randrange(128, 0x7fffffff),
                                garbage(), rng.choice([0, 100, rng.randrange(60000)]))
    elif kind == 5:
        chunk = reused_request_id(request_id(), some_pairs())
    elif kind == 6:
        chunk = abort_mid_stream(rng.randrange(1, 65536), some_pairs(), rng.randrange(1 << 16))
    elif kind == 7:
        chunk = garbage_after_request(request_id(), rng.random() < 0.5, garbage())
    else:
        chunk = garbage()
    return chunk


# --------------------------------------------------------------------------
# The tests.

def test_fuzzed_framing_never_breaks_the_worker_or_its_answers(tmp_path):
    """Injects: hypothesis-made byte streams of hostile FastCGI records (truncated
    headers, huge content lengths, unknown types and versions, oversized
    name/value pairs, reused request ids, FCGI_ABORT_REQUEST mid-stream,
    garbage after a valid request), each on its own connection.
    Holds: the worker closes every such connection, everything it sends back
    is well-formed FastCGI a responder may send, a well-behaved client gets a
    whole 200 after every one, and the worker neither dies nor recycles."""
    worker = start_worker(tmp_path)
    try:
        @settings(max_examples=500, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(hostile_chunk, min_size=1, max_size=4))
        def hostile_connection_is_harmless(chunks):
            answer = exchange(worker.socket, b"".join(chunks), timeout=30)
            records, _ = parse_records(answer)
            for version, kind, _, _ in records:
                assert version == 1 and kind in SENT_BY_A_RESPONDER, (version, kind, answer[:200])
            assert_served(worker.socket)

        hostile_connection_is_harmless()
        assert_still_the_same_worker(worker)
    finally:
        worker.stop()


def test_a_valid_request_in_raw_records_gets_a_200_from_the_same_worker(worker):
    """The encoder above is honest: a well-formed request through it is answered."""
    answer = exchange(worker.socket, get_request(7))
    records, leftover = parse_records(answer)
    assert leftover == b""
    assert status_of(answer) == 200
    assert records[-1][1] == END_REQUEST and records[-1][2] == 7


def test_threads_and_memory_stay_bounded_after_ten_thousand_bad_inputs(tmp_path):
    """Injects: 10,000 hostile payloads (seeded, the fuzz test's kinds), two
    connections at a time.
    Holds: the worker stays up; its thread count is what it was before, and its
    resident memory grows by less than 4 MiB (a leak of one kilobyte per input
    would be 10 MB; here it grows by well under 1 MiB)."""
    worker = start_worker(tmp_path)
    rng = random.Random(6)
    payloads = [random_hostile_payload(rng) for _ in range(10500)]
    errors = []

    def attack(batch):
        try:
            for payload in batch:
                exchange(worker.socket, payload, timeout=30)
        except Exception as error:  # reported below, with the rest
            errors.append(error)

    def run(batch, clients=2):
        threads = [threading.Thread(target=attack, args=(batch[i::clients],)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors[:3]

    try:
        run(payloads[:500])            # let the allocator settle before measuring
        assert_served(worker.socket)
        threads_before, rss_before = proc_status(worker.pid)
        run(payloads[500:])
        assert_served(worker.socket)
        # Threads come and go with nothing: wait until the pool is back at rest.
        support.wait_until(lambda: proc_status(worker.pid)[0] <= threads_before, 30,
                           "the thread count back at %d" % threads_before)
        threads_after, rss_after = proc_status(worker.pid)
        assert threads_after == threads_before <= MAX_THREADS + 2
        assert rss_after - rss_before < 4 << 20, (rss_before, rss_after)
        assert_still_the_same_worker(worker)
    finally:
        worker.stop()


def test_a_request_whose_params_never_end_is_cut_off_before_memory_grows_much(tmp_path):
    """Injects: one connection that sends BEGIN_REQUEST and then distinct 64 KB
    name/value pairs, up to 80 MB, never the empty PARAMS record that ends them.
    Holds: the worker closes that connection before 32 MB have been sent, and
    its resident memory grows by less than 32 MiB.  (MAX_RSS is off here, so
    that the memory limit's own recycling cannot hide the growth.)"""
    worker = start_worker(tmp_path, TRAC_FCGI_MAX_RSS="0")
    try:
        _, rss_before = proc_status(worker.pid)
        sent = 0
        with connect(worker.socket, timeout=30) as sock:
            try:
                sock.sendall(begin(1))
                for i in range(1250):
                    sock.sendall(record(PARAMS, 1, pair(b"HTTP_X_%d" % i, b"v" * 64000)))
                    sent += 64000
            except OSError:
                pass  # cut off: what should happen
            _, rss_during = proc_status(worker.pid)
        assert_served(worker.socket)
        assert sent < 32 << 20, "the worker took %d MB of PARAMS for one request" % (sent >> 20)
        assert rss_during - rss_before < 32 << 20
    finally:
        worker.stop()


def test_idle_clients_are_closed_after_the_idle_timeout_and_normal_clients_are_served(worker):
    """Injects: 2 x MAX_THREADS clients that connect and send nothing.
    Holds: a normal client still gets a whole 200; every idle client is closed
    by the worker, not before TRAC_FCGI_IDLE_TIMEOUT, and each closure is
    logged as event=idle-closed."""
    idle = []
    for _ in range(2 * MAX_THREADS):
        idle.append((connect(worker.socket, timeout=60), time.monotonic()))
    try:
        assert_served(worker.socket)
        for sock, connected in idle:
            assert read_until_closed(sock) == b""
            assert time.monotonic() - connected >= IDLE_TIMEOUT - 0.1
        worker.wait_for("idle-closed", count=2 * MAX_THREADS, timeout=30)
        assert_served(worker.socket)
    finally:
        for sock, _ in idle:
            sock.close()


def test_a_client_that_stops_mid_record_is_closed_after_the_idle_timeout(worker):
    """Injects: MAX_THREADS clients that send half a header, or a header and
    half its content, then fall silent.
    Holds: each is closed by the worker, and a normal client is served."""
    whole = get_request(1)
    stalled = []
    for i in range(MAX_THREADS):
        sock = connect(worker.socket, timeout=60)
        sock.sendall(whole[:4] if i % 2 else whole[:HEADER.size + 3])
        stalled.append(sock)
    try:
        for sock in stalled:
            assert read_until_closed(sock) == b""
        assert_served(worker.socket)
    finally:
        for sock in stalled:
            sock.close()


def test_clients_sending_one_byte_a_second_do_not_starve_normal_clients(worker):
    """Injects: 2 x MAX_THREADS clients that each send a record header
    promising 65535 bytes of PARAMS and then one byte a second, for up to 30 s.
    Holds: a normal client gets a whole 200 within 20 s (the slow clients are
    closed once they have been slow for longer than the idle timeout)."""
    stop = threading.Event()
    connected = []
    prefix = begin(1) + HEADER.pack(1, PARAMS, 1, 65535, 0)

    def trickle():
        with connect(worker.socket, timeout=60) as sock:
            connected.append(sock)
            deadline = time.monotonic() + 30
            for byte in (prefix + b"\x01" * 65535)[:60]:
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return  # closed on: what a fix would do
                stop.wait(1)

    slow = [threading.Thread(target=trickle) for _ in range(2 * MAX_THREADS)]
    for thread in slow:
        thread.start()
    try:
        # The slow ones connect first, so they are ahead in the backlog and take every thread.
        support.wait_until(lambda: len(connected) == len(slow), 30, "the slow clients to connect")
        time.sleep(IDLE_TIMEOUT)
        response = support.fcgi_get(worker.socket, timeout=20)
        assert response.status == 200
    finally:
        stop.set()
        for thread in slow:
            thread.join(10)


def test_four_times_max_threads_concurrent_slow_requests_are_all_answered(worker):
    """Injects: 4 x MAX_THREADS concurrent requests that each take 1 s (?delay=1).
    Holds: none is refused or cut off: every one gets a whole 200."""
    results = []

    def slow_request():
        try:
            results.append(support.fcgi_get(worker.socket, query="delay=1", timeout=90))
        except Exception as error:  # counted as refused below
            results.append(error)

    clients = [threading.Thread(target=slow_request) for _ in range(4 * MAX_THREADS)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(120)
    refused = [r for r in results if not isinstance(r, support.Response) or r.status != 200
               or len(r.body) != int(r.headers["content-length"])]
    assert len(results) == 4 * MAX_THREADS
    assert refused == []
    assert_still_the_same_worker(worker)
