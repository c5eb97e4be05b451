"""The re-freezing policy and its gate, in-process: real threads, the real garbage collector.

The test plays both sides: connection threads (request_starting and
request_done) and the main loop (poll).  The worker tests in
test_trac_fcgi.py then only have to show that the real process obeys it.
"""
import gc
import re
import threading
import weakref

import pytest

import trac_fcgi
from trac_fcgi import Refreezer

# Long enough that a freeze is never postponed on a slow machine, unless a test wants it.
PATIENT = 600


@pytest.fixture(autouse=True)
def unfreeze():
    yield
    gc.unfreeze()  # the rest of the test run keeps a collector that walks everything


class Cycle:
    """Garbage only the cycle collector can free; its weakref says when it has been."""

    def __init__(self):
        self.me = self


def freezes_logged(capsys):
    """The requests= of each event=freeze logged so far."""
    return [int(n) for n in re.findall(r"event=freeze .*requests=(\d+)", capsys.readouterr().err)]


def serve(refreezer, requests):
    """One whole request, then a pass of the main loop, as the worker does."""
    refreezer.request_starting()
    refreezer.request_done(requests)
    refreezer.poll(requests)


def start_waiting_request(refreezer):
    """A connection thread whose request is about to start; its event is set once it may."""
    started = threading.Event()

    def run():
        refreezer.request_starting()
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return started


def test_freezes_come_due_after_requests_1_2_4_8_and_so_on(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=PATIENT)
    for requests in range(1, 40):
        serve(refreezer, requests)
    assert freezes_logged(capsys) == [1, 2, 4, 8, 16, 32]


def test_a_worker_forked_from_the_frozen_mold_first_freezes_after_request_64_then_doubles(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=PATIENT, first_at=trac_fcgi.FORKED_FIRST_FREEZE)
    for requests in range(1, 300):
        serve(refreezer, requests)
    assert freezes_logged(capsys) == [64, 128, 256]


def test_a_freeze_that_waited_for_requests_in_flight_sets_the_next_one_a_doubling_past_them(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=PATIENT)
    for _ in range(6):
        refreezer.request_starting()       # six at once, as under load
    for requests in range(1, 7):
        refreezer.request_done(requests)   # due after 1, done once all six have ended
    refreezer.poll(6)
    for requests in range(7, 10):
        serve(refreezer, requests)
    assert freezes_logged(capsys) == [6, 8]


def test_a_freeze_due_while_a_request_is_in_flight_waits_for_it(capsys):
    woken = []
    refreezer = Refreezer(True, wake=lambda: woken.append(True), wait_s=PATIENT)
    refreezer.request_starting()           # a slow request, holding its objects
    held = Cycle()
    collected = weakref.ref(held)
    serve(refreezer, 1)                    # a quick one ends: a freeze is due
    assert freezes_logged(capsys) == [] and not woken
    del held
    refreezer.request_done(2)              # the slow one ends
    assert woken
    refreezer.poll(2)
    assert freezes_logged(capsys) == [2]
    assert collected() is None             # collected before the freeze, not frozen


def test_a_request_arriving_while_a_freeze_is_due_waits_until_it_is_done(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=PATIENT)
    refreezer.request_starting()
    serve(refreezer, 1)
    started = start_waiting_request(refreezer)
    assert not started.wait(0.2)
    refreezer.request_done(2)
    refreezer.poll(2)
    assert freezes_logged(capsys) == [2]
    assert started.wait(30)


def test_with_none_in_flight_a_request_waits_for_the_due_freeze_however_late_the_main_loop_is(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=0.1)
    refreezer.request_starting()
    refreezer.request_done(1)              # due, and nothing in flight to wait for
    started = start_waiting_request(refreezer)
    assert not started.wait(0.5)           # five times the wait, and still waiting
    refreezer.poll(1)
    assert freezes_logged(capsys) == [1]
    assert started.wait(30)


def test_requests_in_flight_past_the_wait_postpone_the_freeze_and_the_waiting_go_ahead(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=0.2)
    refreezer.request_starting()           # a slow request
    serve(refreezer, 1)                    # a freeze is due
    started = start_waiting_request(refreezer)
    assert started.wait(30)                # went ahead once the wait was over
    refreezer.poll(1)
    assert "event=freeze-postponed" in capsys.readouterr().err
    # Postponed to the next point of the schedule, request 2, and done
    # once the two in flight have ended.
    refreezer.request_done(2)
    refreezer.poll(2)
    refreezer.request_done(3)
    refreezer.poll(3)
    assert freezes_logged(capsys) == [3]


def test_a_stopped_refreezer_lets_waiting_requests_go_and_freezes_no_more(capsys):
    refreezer = Refreezer(True, wake=lambda: None, wait_s=PATIENT)
    refreezer.request_starting()
    serve(refreezer, 1)
    started = start_waiting_request(refreezer)
    refreezer.stop()
    assert started.wait(30)
    for requests in range(2, 20):
        serve(refreezer, requests)
    assert freezes_logged(capsys) == []


def test_with_freezing_off_no_request_ever_waits(capsys):
    refreezer = Refreezer(False, wake=lambda: None, wait_s=PATIENT)
    for requests in range(1, 20):
        serve(refreezer, requests)
        assert refreezer.closed_at is None
    assert freezes_logged(capsys) == []
