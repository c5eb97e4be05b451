"""Requests take turns to run the application (trac_fcgi.RequestTurns), in-process with real threads.

Each "request" below is a thread that takes its turn, notes when it started,
and holds the turn until the test lets it go: the order of events is the
test's, never the scheduler's, so nothing here depends on the machine's
speed.  The worker tests in test_trac_fcgi.py show that a real worker obeys it.
"""
import threading
import time

from trac_fcgi import RequestTurns

# A turn no test request outlasts on any machine, unless a test wants it to.
LONG_TURN = 600


class Request(threading.Thread):
    """Takes a turn, says it started, and holds the turn until finish()."""

    def __init__(self, turns, name):
        super().__init__(name=name, daemon=True)
        self.turns = turns
        self.started = threading.Event()
        self.finishing = threading.Event()
        self.asked_at = self.started_at = None

    def run(self):
        self.asked_at = time.monotonic()
        turn = self.turns.take()
        self.started_at = time.monotonic()
        self.started.set()
        self.finishing.wait(60)
        self.turns.done(turn)

    def finish(self):
        self.finishing.set()
        self.join(10)


def queue_up(turns, names):
    """Start a request per name, each only once the one before waits in line (first come, first served)."""
    requests = []
    for name in names:
        request = Request(turns, name)
        request.start()
        requests.append(request)
        deadline = time.monotonic() + 10
        # Each one so far is in line or has started (none has been let finish).
        while len(turns.waiting) + sum(r.started.is_set() for r in requests) < len(requests):
            assert time.monotonic() < deadline, "request %s never reached the line" % name
            time.sleep(0.001)
    return requests


def test_requests_run_one_at_a_time_first_come_first_served():
    turns = RequestTurns(LONG_TURN)
    first, second, third = queue_up(turns, "abc")
    assert first.started.wait(10)
    assert not second.started.wait(0.2) and not third.started.is_set()
    first.finish()
    assert second.started.wait(10)
    assert not third.started.wait(0.2)
    second.finish()
    assert third.started.wait(10)
    third.finish()
    assert not turns.waiting and turns.latest is None


def test_a_request_whose_turn_is_over_lets_the_next_one_start_beside_it():
    turn_s = 0.2
    turns = RequestTurns(turn_s)
    slow, quick = queue_up(turns, ["slow", "quick"])
    assert quick.started.wait(10), "the next one starts while the slow one still runs"
    assert quick.started_at - slow.asked_at >= turn_s
    quick.finish()
    slow.finish()


def test_after_a_long_one_the_rest_take_turns_again():
    # The one that started last is the one to wait for: the long one had its turn.
    turns = RequestTurns(0.2)
    slow, second, third = queue_up(turns, ["slow", "second", "third"])
    assert second.started.wait(10)
    turns.turn_s = LONG_TURN  # from now on, however slow the machine, the second is within its turn
    assert not third.started.wait(0.2), "the third waits for the second"
    second.finish()
    assert third.started.wait(10), "and starts once the second is done, with the slow one still running"
    third.finish()
    slow.finish()


def test_a_request_whose_turn_is_over_is_not_waited_for_once_it_is_done():
    turns = RequestTurns(LONG_TURN)
    (first,) = queue_up(turns, ["first"])
    first.finish()
    (after,) = queue_up(turns, ["after"])
    assert after.started.wait(10)
    after.finish()


def test_turn_zero_runs_every_request_at_once_as_flup_does():
    turns = RequestTurns(0)
    requests = queue_up(turns, "abcd")
    assert all(request.started.wait(10) for request in requests)
    for request in requests:
        request.finish()
    assert not turns.waiting
