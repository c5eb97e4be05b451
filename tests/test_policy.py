"""The worker's decisions, driven without a process: which limit is crossed, which request is late.

Plain numbers in, a reason out, in microseconds.  That the real worker acts on
them (asks its launcher, re-executes, drains around a stuck request) is the
business of tests/test_trac_fcgi.py, test_liveness.py and test_fronts.py.
"""
import os
import re

import pytest

from support import ROOT
from trac_fcgi import HARD_LIMIT, LateRequests, Limits, Watchdog, crossed_limit, lateness

MIB = 1 << 20


def limits(**settings):
    """Limits as a worker draws them, with no jitter so that each is exactly as set."""
    environ = {"TRAC_FCGI_JITTER": "0"}
    environ.update(("TRAC_FCGI_" + name.upper(), str(value)) for name, value in settings.items())
    return Limits(environ)


def test_nothing_is_crossed_below_every_limit():
    assert crossed_limit(limits(max_requests=100, max_lifetime=60), 10 * MIB, 99, 59.9, stuck=0) is None


def test_every_limit_off_is_never_crossed():
    off = limits(max_rss=0, max_requests=0, max_lifetime=0)
    assert crossed_limit(off, 10 << 30, 10 ** 9, 10 ** 7, stuck=0) is None


@pytest.mark.parametrize("rss, requests, age, stuck, reason", [
    (128 * MIB, 0, 0, 0, HARD_LIMIT),      # the hard limit, a promise
    (128 * MIB, 500, 900, 2, HARD_LIMIT),  # ... comes before everything
    (100 * MIB, 500, 900, 1, "stuck"),     # a stuck request before the soft limits
    (116 * MIB, 500, 900, 0, "rss"),       # 90% of MAX_RSS, the default soft mark
    (10 * MIB, 500, 900, 0, "requests"),
    (10 * MIB, 499, 900, 0, "age"),
    (10 * MIB, 499, 899, 0, None),
])
def test_the_first_limit_crossed_is_named_hard_before_stuck_before_the_soft_ones(rss, requests, age, stuck, reason):
    assert crossed_limit(limits(max_requests=500, max_lifetime=900), rss, requests, age, stuck) == reason


def test_a_stuck_request_is_a_reason_even_with_every_limit_off():
    assert crossed_limit(limits(max_rss=0), 10 << 30, 0, 0, stuck=1) == "stuck"


def test_a_request_is_slow_past_the_slow_mark_and_stuck_past_the_timeout():
    late = limits(slow_request=10, request_timeout=60)
    assert [lateness(late, s) for s in (0, 9.99, 10, 59.99, 60, 10 ** 6)] == [
        None, None, "slow", "slow", "stuck", "stuck"]
    assert lateness(limits(slow_request=0, request_timeout=0), 10 ** 6) is None


def test_by_default_a_request_is_slow_at_10_s_and_stuck_once_nginx_has_given_up_on_it():
    defaults = Limits({})
    nginx = re.search(r"fastcgi_read_timeout (\d+)s;", (ROOT / "examples" / "nginx.conf").read_text())
    assert defaults.slow_request == 10
    assert defaults.request_timeout == int(nginx.group(1)) == 60


class Request:
    def __init__(self, started):
        self.started = started


def test_each_request_is_named_once_slow_then_once_stuck_and_counted():
    watch = LateRequests(limits(slow_request=5, request_timeout=20))
    a, b = Request(0.0), Request(3.0)
    assert watch.check([a, b], 4.0) == []
    assert watch.check([a, b], 6.0) == [("slow", a)]
    assert watch.check([a, b], 7.0) == []
    assert watch.check([a, b], 8.5) == [("slow", b)]
    assert watch.stuck_in_flight == 0
    assert watch.check([a, b], 21.0) == [("stuck", a)]
    assert watch.stuck_in_flight == 1
    assert watch.check([a, b], 30.0) == [("stuck", b)]
    assert watch.check([a, b], 99.0) == []
    assert (watch.counts, watch.stuck_in_flight) == ({"slow": 2, "stuck": 2}, 2)
    # A stuck request that ends after all is no longer in flight: nothing is stuck.
    assert watch.check([b], 100.0) == [] and watch.stuck_in_flight == 1
    assert watch.check([], 101.0) == [] and watch.stuck_in_flight == 0


def test_a_request_first_seen_past_the_timeout_is_named_slow_and_stuck_at_once_in_that_order():
    watch = LateRequests(limits(slow_request=5, request_timeout=20))
    c = Request(0.0)
    assert watch.check([c], 25.0) == [("slow", c), ("stuck", c)]


def test_with_slow_entries_off_a_stuck_request_is_named_stuck_only():
    watch = LateRequests(limits(slow_request=0, request_timeout=20))
    c = Request(0.0)
    assert watch.check([c], 25.0) == [("stuck", c)]
    assert watch.counts == {"slow": 0, "stuck": 1}


def test_the_watchdog_beats_with_ready_and_then_every_quarter_of_its_timeout_as_systemd_says():
    assert Watchdog({}).first("READY=1") == "READY=1"
    assert Watchdog({}).due() == float("inf")
    assert Watchdog({"WATCHDOG_USEC": "0"}).period is None
    # WATCHDOG_PID names the one process systemd watches: a fork of it is not that one.
    assert Watchdog({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}).period is None
    dog = Watchdog({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())})
    assert dog.period == 5.0
    assert dog.first("READY=1") == "READY=1\nWATCHDOG=1"
    assert dog.due() == dog.last + 5.0
    assert dog.first("MOLD=1") == "MOLD=1\nWATCHDOG=1"  # the mold's first beat, likewise
