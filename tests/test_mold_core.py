"""The mold's life (launcher.Molds) alone: events in, actions out, the time passed in by hand.

No process and no LauncherCore: each test plays the shell (it starts a mold
when asked, and says what the mold said) and reads the actions and deadlines
Molds gives back.  tests/test_core.py drives the same object inside the
launcher's core, beside the workers; tests/test_mold.py has the real processes.
"""
import signal

import launcher
from launcher import RETIRE_MOLD, SIGNAL, START_MOLD, Molds, Tally

READY_TIMEOUT_S = 30.0
WATCHDOG_S = 20.0


class Shell:
    def __init__(self, enabled=True, watchdog=None):
        self.log, self.actions, self.restarts = [], [], []
        self.tally = Tally()
        self.molds = Molds(enabled, READY_TIMEOUT_S, watchdog, self.record, self.actions.append, self.tally,
                           answered=lambda reason, now: self.restarts.append(reason))
        self.pids = iter(range(100, 200))

    def record(self, event, level=1, **facts):
        self.log.append((event, facts))

    def logged(self, event, **facts):
        return [f for e, f in self.log if e == event and all(f.get(k) == v for k, v in facts.items())]

    def tend(self, now):
        """What the shell does each pass: start a mold if asked; return the deadlines and what else was asked."""
        del self.actions[:]
        deadlines = self.molds.tend(now)
        asked = list(self.actions)
        for action in asked:
            if action == (START_MOLD,):
                self.molds.started(next(self.pids), now)
        return deadlines, asked

    def ready(self, now, **more):
        mold = self.molds.current if self.molds.next is None else self.molds.next
        self.molds.said(mold, dict({"MOLD": "1"}, **more), now)
        return mold.pid


def test_the_first_mold_is_started_once_and_the_slots_wait_until_it_answers():
    shell = Shell()
    assert shell.molds.slots_wait and shell.molds.fork_from() is None
    deadlines, asked = shell.tend(0.0)
    assert asked == [(START_MOLD,)]
    assert shell.tend(1.0) == ([READY_TIMEOUT_S], [])  # waits for its answer, and asks for no other
    pid = shell.ready(1.5)
    assert shell.molds.fork_from() == pid and not shell.molds.slots_wait
    assert shell.tend(2.0) == ([], [])


def test_with_the_mold_off_nothing_is_ever_started():
    shell = Shell(enabled=False)
    assert shell.tend(0.0) == ([], []) and not shell.molds.slots_wait and not shell.molds.hup(1.0)


def test_a_process_that_says_ready_not_mold_is_killed_and_no_mold_is_tried_until_sighup():
    shell = Shell()
    shell.tend(0.0)
    stock = shell.molds.current.pid
    shell.molds.said(shell.molds.current, {"READY": "1"}, 1.0)
    assert (SIGNAL, stock, signal.SIGKILL) in shell.actions and shell.logged("mold-unavailable", pid=stock)
    assert shell.tend(100.0) == ([], []) and not shell.molds.slots_wait
    assert shell.molds.hup(101.0)
    assert shell.tend(101.0)[1] == [(START_MOLD,)]


def test_a_silent_mold_is_given_up_at_the_ready_timeout():
    shell = Shell()
    shell.tend(0.0)
    silent = shell.molds.current.pid
    deadlines, _ = shell.tend(READY_TIMEOUT_S)
    assert shell.logged("mold-unavailable", pid=silent, reason="silent past --ready-timeout")
    assert shell.molds.current is None and not shell.molds.slots_wait


def test_a_ready_mold_that_dies_is_restarted_after_a_doubling_backoff():
    shell = Shell()
    shell.tend(0.0)
    first = shell.ready(1.0)
    shell.molds.exited(first, {"signal": "SIGKILL"}, 10.0)
    assert shell.logged("mold-failed", pid=first, delay_s=1.0)
    assert shell.tend(10.5) == ([11.0], [])
    assert shell.tend(11.0)[1] == [(START_MOLD,)]
    second = shell.ready(12.0)
    shell.molds.exited(second, {"signal": "SIGKILL"}, 13.0)
    assert shell.logged("mold-failed", pid=second, delay_s=2.0)


def test_sighup_starts_a_new_mold_and_the_rolling_restart_waits_for_its_answer_then_the_old_one_retires():
    shell = Shell()
    shell.tend(0.0)
    old = shell.ready(1.0)
    assert shell.molds.hup(5.0) and shell.molds.fork_from() is None
    assert shell.tend(5.0)[1] == [(START_MOLD,)] and shell.restarts == []
    assert not shell.molds.hup(5.5), "a second SIGHUP meanwhile is the same restart"
    new = shell.ready(6.0)
    assert shell.restarts == ["SIGHUP"] and shell.molds.fork_from() == new
    del shell.actions[:]
    shell.molds.rolling_done()
    assert shell.actions == [(RETIRE_MOLD, old)]


def test_a_stale_mold_forks_until_its_successor_is_ready_and_refreshes_are_at_most_one_per_interval():
    shell = Shell()
    shell.tend(0.0)
    first = shell.ready(1.0)
    shell.molds.said(shell.molds.current, {"MOLD_STALE": "plugins"}, 2.0)
    assert shell.tend(2.0)[1] == [(START_MOLD,)] and shell.molds.fork_from() == first
    second = shell.ready(3.0)
    assert shell.molds.fork_from() == second and (RETIRE_MOLD, first) in shell.actions
    assert shell.restarts == [], "no rolling restart"
    shell.molds.said(shell.molds.current, {"MOLD_STALE": "trac.ini"}, 4.0)
    due = 2.0 + launcher.MOLD_REFRESH_MIN_S
    assert shell.tend(4.0) == ([due], []) and shell.tend(5.0) == ([due], [])
    assert len(shell.logged("mold-refresh-deferred", pid=second)) == 1
    assert shell.tend(due)[1] == [(START_MOLD,)] and shell.tally.stale_molds == 2


def test_an_unresponsive_mold_is_killed_counted_and_restarted_like_a_dead_one():
    shell = Shell(watchdog=WATCHDOG_S)
    shell.tend(0.0)
    pid = shell.ready(1.0, WATCHDOG="1")
    assert shell.tend(1.0 + WATCHDOG_S - 0.1) == ([1.0 + WATCHDOG_S], [])
    shell.tend(1.0 + WATCHDOG_S)
    assert (SIGNAL, pid, signal.SIGKILL) in shell.actions and shell.tally.unresponsive_kills == 1
    assert shell.logged("mold-failed", pid=pid, reason="unresponsive")


def test_a_mold_that_never_sent_watchdog_is_never_called_unresponsive():
    shell = Shell(watchdog=WATCHDOG_S)
    shell.tend(0.0)
    shell.ready(1.0)
    assert shell.tend(1000.0) == ([], []) and not shell.logged("unresponsive")


def test_a_stop_retires_every_mold_and_kill_all_kills_each_once():
    shell = Shell()
    shell.tend(0.0)
    old = shell.ready(1.0)
    shell.molds.hup(2.0)
    shell.tend(2.0)
    new = shell.molds.current.pid
    del shell.actions[:]
    shell.molds.stop()
    assert sorted(shell.actions) == [(RETIRE_MOLD, old), (RETIRE_MOLD, new)]
    assert shell.molds.fork_from() is None and shell.tend(3.0) == ([], [])
    shell.molds.kill_all("stop timeout")
    shell.molds.kill_all("stop timeout")
    assert [a for a in shell.actions if a[0] == SIGNAL] == [(SIGNAL, old, signal.SIGKILL), (SIGNAL, new, signal.SIGKILL)]
