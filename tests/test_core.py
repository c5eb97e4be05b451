"""The launcher's decisions, driven without a process: events in, actions out, a clock we turn by hand.

`Site` plays the shell's part as launcher.Launcher does (tick, carry out the
actions, sleep until the deadline the core returned) and the workers' part
as simple scripts: warm up for WARM_S then say READY=1, drain for DRAIN_S on
SIGHUP, die at once on SIGKILL.  Every test counts how often the loop woke,
because a launcher that gets the outcome right by waking a thousand times a
second has still failed.  The real processes obeying these decisions are
tests/test_launcher.py's business.
"""
import heapq
import itertools
import signal

import launcher
from launcher import RETIRE_MOLD, SIGNAL, SPAWN, START_MOLD, STRAY, SYSTEMD, LauncherCore

WARM_S = 1.5
DRAIN_S = 0.2
FORK_S = 0.02  # a worker forked from a warm mold


class Site:
    def __init__(self, slots=1, ready_timeout=30.0, stop_timeout=30.0, warm_s=WARM_S, drain_s=DRAIN_S,
                 speaks_notify=True, shortage=None, behaviour=None, mold=None, watchdog=None):
        self.now = 0.0
        self.log = []
        self.core = LauncherCore(slots, ready_timeout, stop_timeout, log=self.record,
                                 memory_shortage=lambda pid: shortage, mold=mold is not None,
                                 watchdog_timeout=watchdog)
        # With a watchdog, workers that speak notify (and the mold) send
        # WATCHDOG=1 with READY=1 and every quarter of it after, until frozen.
        self.watchdog = watchdog
        self.frozen = set()  # pids stopped as by SIGSTOP: silent, deaf to all but SIGKILL
        # What a process started as the mold does: "mold" warms up for WARM_S
        # and says MOLD=1; "stock" exits at once; "silent" says nothing.
        self.mold_behaviour = mold
        self.mold_pid = None
        self.mold_hangs = False  # ignores its socket pair closing
        self.warm_s, self.drain_s, self.speaks_notify = warm_s, drain_s, speaks_notify
        self.behaviour = behaviour or {}  # slot number -> "ok" | "crash" | "hang" (ignores SIGHUP)
        self.events = []             # heap of (time, seq, callable): what the workers will do
        self.seq = itertools.count()
        self.pids = itertools.count(100)
        self.alive = set()
        self.sent = []               # (pid, signum) as the shell would send them
        self.wakes = self.idle_wakes = 0
        self.most_per_slot = 0
        self.told_systemd = []
        self.wake_at = self.settle()

    # -- the shell's part ------------------------------------------------------

    def record(self, event, level=1, **facts):
        self.log.append((event, facts))

    def settle(self):
        for _ in range(8):
            wake_at = self.core.tick(self.now)
            actions, self.core.actions = self.core.actions, []
            if not actions:
                break
            for kind, *args in actions:
                if kind == SPAWN:
                    self.spawn(*args)
                elif kind == SIGNAL:
                    self.signal(*args)
                elif kind == SYSTEMD:
                    self.told_systemd.extend(args[0])
                elif kind == START_MOLD:
                    self.start_mold()
                elif kind == RETIRE_MOLD and not self.mold_hangs:
                    self.at(0, lambda pid=args[0]: self.exit(pid, 0))
        per_slot = {}
        for worker in self.core.workers.values():
            per_slot[worker.slot.number] = per_slot.get(worker.slot.number, 0) + 1
        self.most_per_slot = max([self.most_per_slot] + list(per_slot.values()))
        return wake_at

    def run_until(self, end):
        """Sleep until the core's deadline or the next worker event, whichever comes first, up to END."""
        while True:
            next_event = self.events[0][0] if self.events else float("inf")
            when = min(self.wake_at, next_event)
            if when > end:
                self.now = end
                return
            self.now = max(self.now, when)
            self.wakes += 1
            fired = False
            while self.events and self.events[0][0] <= self.now:
                _, _, happen = heapq.heappop(self.events)
                happen()
                fired = True
            self.idle_wakes += not fired
            self.wake_at = self.settle()

    def at(self, delay, happen):
        heapq.heappush(self.events, (self.now + delay, next(self.seq), happen))

    def signal_launcher(self, signum, sender=1):
        self.core.signalled(signum, sender, self.now)
        self.wake_at = self.settle()

    # -- the workers' part -------------------------------------------------------

    def spawn(self, slot, role):
        pid = next(self.pids)
        self.alive.add(pid)
        forked = self.core.molds.fork_from() is not None
        self.core.spawned(slot, pid, role, self.now, how="fork" if forked else "exec")
        behaviour = self.behaviour.get(slot.number, "ok")
        if behaviour == "crash":
            self.at(0.1, lambda: self.exit(pid, 1))
        elif self.speaks_notify:
            self.at(FORK_S if forked else self.warm_s, lambda: self.say(pid, {"READY": "1"}))

    def say(self, pid, fields):
        if pid in self.alive and pid not in self.frozen:
            if self.watchdog:
                fields = dict(fields, WATCHDOG="1")
                self.at(self.watchdog / 4, lambda: self.say(pid, {}))
            self.core.notified(pid, fields, self.now)

    def start_mold(self):
        pid = self.mold_pid = next(self.pids)
        self.alive.add(pid)
        self.core.molds.started(pid, self.now)
        if self.mold_behaviour == "mold":
            self.at(self.warm_s, lambda: self.say(pid, {"MOLD": "1"}))
        elif self.mold_behaviour == "stock":
            self.at(0.5, lambda: self.exit(pid, 0))

    def signal(self, pid, signum):
        self.sent.append((pid, signum))
        if signum == signal.SIGKILL:
            self.at(0, lambda: self.exit(pid, -signal.SIGKILL))
        elif pid in self.frozen:
            pass
        elif signum == signal.SIGHUP and self.behaviour.get(self.slot_of(pid)) != "hang":
            self.at(self.drain_s, lambda: self.exit(pid, 0, stopping=True))

    def exit(self, pid, code, stopping=False):
        if pid in self.alive:
            self.alive.discard(pid)
            if stopping:
                self.core.notified(pid, {"STOPPING": "1"}, self.now)
            self.core.exited(pid, code, self.now)

    def kill(self, pid):
        """A SIGKILL from outside the launcher: the OOM killer, an admin."""
        self.at(0, lambda: self.exit(pid, -signal.SIGKILL))

    # -- reading what happened -------------------------------------------------------

    def slot_of(self, pid):
        worker = self.core.workers.get(pid)
        return worker.slot.number if worker else None

    def serving(self, slot=0):
        worker = self.core.worker_of(self.core.slots[slot], "serving")
        return worker.pid if worker and worker.ready else None

    def logged(self, event, **facts):
        return [f for e, f in self.log if e == event and all(f.get(k) == v for k, v in facts.items())]


def started(**options):
    site = Site(**options)
    site.run_until(WARM_S + (FORK_S if options.get("mold") == "mold" else 0) + 0.01)
    assert site.core.ready_workers() == len(site.core.slots)
    site.wakes = site.idle_wakes = 0
    return site


# --------------------------------------------------------------------------
# Handoffs

def test_a_rolling_restart_of_three_slow_workers_replaces_them_one_at_a_time_waking_only_for_events():
    site = started(slots=3)
    before = {site.serving(n) for n in range(3)}
    site.signal_launcher(signal.SIGHUP)
    site.run_until(60)
    after = {site.serving(n) for n in range(3)}
    assert not after & before and None not in after
    spawns = [f["role"] for e, f in site.log if e == "spawn"][3:]
    assert spawns == ["warming"] * 3
    assert [e for e, _ in site.log if e in ("spawn", "ready")][6:] == ["spawn", "ready"] * 3
    assert site.logged("rolling-restart-done")
    # Three warm-ups and three drains: six events; the loop may not wake between them.
    assert site.idle_wakes == 0
    assert site.wakes <= 6
    assert site.most_per_slot <= 2


def test_two_workers_asking_at_once_are_replaced_in_turn_without_a_spin():
    site = started(slots=2)
    first, second = site.serving(0), site.serving(1)
    site.signal_launcher(signal.SIGUSR1, sender=first)
    site.signal_launcher(signal.SIGUSR1, sender=second)
    site.run_until(30)
    assert site.serving(0) not in (None, first) and site.serving(1) not in (None, second)
    assert site.idle_wakes == 0 and site.wakes <= 4


def test_a_burst_of_signals_is_one_rolling_restart_and_never_more_than_two_processes_a_slot():
    site = started(slots=2)
    for i in range(200):
        site.run_until(site.now + 0.005)
        site.signal_launcher(signal.SIGUSR1 if i % 2 else signal.SIGHUP, sender=1)
    site.run_until(60)
    assert len(site.logged("rolling-restart")) == 1
    assert len(site.logged("coalesced")) == 199
    assert site.most_per_slot <= 2
    assert site.core.ready_workers() == 2 and len(site.core.workers) == 2
    assert site.idle_wakes == 0


def test_a_signal_from_its_own_worker_replaces_only_that_slot():
    site = started(slots=2)
    untouched = site.serving(1)
    site.signal_launcher(signal.SIGUSR1, sender=site.serving(0))
    site.signal_launcher(signal.SIGUSR1, sender=site.serving(0))  # asking again is coalesced
    site.run_until(30)
    assert site.serving(1) == untouched
    assert len(site.logged("spawn", role="warming")) == 1
    assert not site.logged("rolling-restart")


def test_a_replacement_that_crashes_leaves_the_old_worker_serving_and_is_retried_after_the_backoff():
    site = started()
    old = site.serving()
    site.behaviour[0] = "crash"
    site.signal_launcher(signal.SIGHUP)
    site.run_until(site.now + 3.15)  # crashes at +0.1, retried at +1.1, crashes at +1.2, retried at +3.2
    assert site.serving() == old
    assert [f["delay_s"] for f in site.logged("backoff")] == [1.0, 2.0]
    site.behaviour[0] = "ok"
    site.run_until(site.now + 10)
    assert site.serving() not in (None, old)
    # Woken by the crashes and by each backoff's end, never in between.
    assert site.idle_wakes == 2


def test_a_silent_replacement_is_killed_at_the_ready_timeout_and_the_old_worker_keeps_serving():
    site = started(ready_timeout=5.0)
    old = site.serving()
    site.speaks_notify = False
    site.signal_launcher(signal.SIGHUP)
    site.run_until(site.now + 5.5)
    assert site.logged("ready-timeout")
    assert site.serving() == old
    silent = [pid for pid, signum in site.sent if signum == signal.SIGKILL]
    assert len(silent) == 1 and silent[0] != old


def test_a_worker_that_never_speaks_notify_is_ready_once_the_timeout_passes_alive():
    site = Site(speaks_notify=False, ready_timeout=2.0)
    site.run_until(1.9)
    assert site.serving() is None
    site.run_until(2.1)
    assert site.logged("ready", by="timeout") and site.serving() is not None
    assert site.wakes == 1


def test_without_memory_headroom_the_old_worker_is_stopped_before_its_replacement_starts():
    site = started(shortage={"rss": 1, "mem_available": 0, "reserve": 1})
    old = site.serving()
    site.signal_launcher(signal.SIGHUP)
    assert site.logged("stop-then-start", pid=old)
    assert (old, signal.SIGHUP) in site.sent
    assert site.logged("spawn", role="serving")[-1:] and not site.logged("spawn", role="warming")


# --------------------------------------------------------------------------
# Deaths and backoff

def test_a_worker_that_cannot_start_backs_off_doubling_to_a_minute_waking_once_per_try():
    site = Site(behaviour={0: "crash"})
    site.run_until(400)
    delays = [f["delay_s"] for f in site.logged("backoff")]
    assert delays[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0] and set(delays[7:]) == {60.0}
    spawns = len(site.logged("spawn"))
    # Each try is one wake for its crash and one for its backoff's end.
    assert site.wakes <= 2 * spawns + 1


def test_a_ready_worker_killed_six_times_three_seconds_apart_is_respawned_at_once_each_time():
    site = started()
    for _ in range(6):
        victim = site.serving()
        site.kill(victim)
        site.run_until(site.now + 0.001)
        respawn = site.logged("spawn")[-1]
        assert respawn["pid"] != victim and site.core.workers[respawn["pid"]].started == site.now - 0.001
        site.run_until(site.now + 3)
    assert not site.logged("backoff")


def test_a_slot_whose_ready_workers_die_over_ten_times_a_minute_backs_off_while_another_serves():
    site = started(slots=2, warm_s=0.5)
    for _ in range(12):
        site.kill(site.serving(0))
        site.run_until(site.now + 2)
    assert site.logged("backoff", slot=0)
    assert site.serving(1) is not None


def test_the_guard_never_empties_the_site_a_lone_slot_is_always_respawned_at_once():
    site = started(warm_s=0.5)
    for _ in range(15):
        site.kill(site.serving())
        site.run_until(site.now + 1)
    assert not site.logged("backoff")


def test_planned_exits_never_count_as_crashes():
    site = started()
    for _ in range(15):
        site.signal_launcher(signal.SIGHUP)
        site.run_until(site.now + 5)
    assert not site.logged("backoff")
    assert len(site.logged("exit", status=0)) == 15


def test_a_worker_killed_by_a_real_time_signal_is_reported_by_number_and_replaced():
    site = started()
    victim = site.serving()
    site.core.exited(victim, -(signal.SIGRTMIN + 6), site.now)
    assert site.logged("exit", pid=victim, signal="SIGRTMIN+6")
    site.wake_at = site.settle()
    assert site.logged("spawn")[-1]["pid"] != victim


# --------------------------------------------------------------------------
# Stop, slots, and signals with no meaning

def test_a_stop_past_its_timeout_kills_each_worker_once_and_wakes_once_for_it():
    site = started(slots=2, stop_timeout=10.0)
    site.behaviour = {0: "hang", 1: "hang"}
    site.signal_launcher(signal.SIGTERM)
    site.run_until(site.now + 60)
    assert len(site.logged("kill")) == 2
    assert sorted(signum for _, signum in site.sent if signum == signal.SIGKILL) == [signal.SIGKILL] * 2
    assert site.core.finished
    assert site.idle_wakes == 1  # the stop timeout itself


def test_sigttou_during_a_handoff_retires_the_slot_and_both_its_workers():
    site = started(slots=2)
    site.signal_launcher(signal.SIGUSR1, sender=site.serving(1))
    site.run_until(site.now + 0.5)  # slot 1's replacement warms
    warming = site.logged("spawn", role="warming")[-1]["pid"]
    site.signal_launcher(signal.SIGTTOU)
    site.run_until(site.now + 30)
    assert len(site.core.slots) == 1
    assert (warming, signal.SIGHUP) in site.sent
    assert [w.slot.number for w in site.core.workers.values()] == [0]
    assert site.idle_wakes == 0


def test_sigttin_adds_a_slot_that_is_filled_at_once():
    site = started()
    site.signal_launcher(signal.SIGTTIN)
    assert site.logged("slot-added", slot=1)
    site.run_until(site.now + WARM_S + 0.1)
    assert site.core.ready_workers() == 2


def test_signals_without_a_meaning_are_ignored_and_logged():
    site = started()
    before = dict(site.core.workers)
    for signum in (signal.SIGALRM, signal.SIGWINCH, signal.SIGRTMIN + 3):
        site.signal_launcher(signum, sender=42)
    assert [f["signal"] for f in site.logged("ignored")] == ["SIGALRM", "SIGWINCH", "SIGRTMIN+3"]
    assert site.core.workers == before and not site.sent


def test_systemd_hears_ready_once_every_slot_serves_and_again_after_a_rolling_restart():
    site = Site(slots=2)
    site.run_until(WARM_S + 0.1)
    site.signal_launcher(signal.SIGHUP)
    site.run_until(30)
    states = [line for line in site.told_systemd if not line.startswith("STATUS=")]
    assert states == ["READY=1", "RELOADING=1", "READY=1"]


def test_every_signal_the_launcher_can_catch_is_waited_for_and_only_faults_keep_their_default():
    uncatchable = {signal.SIGKILL, signal.SIGSTOP}
    assert launcher.WAITED | launcher.FAULTS | uncatchable == signal.valid_signals()
    assert {signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGPIPE,
            signal.SIGURG, signal.SIGWINCH, signal.SIGRTMIN + 6} <= launcher.WAITED


# --------------------------------------------------------------------------
# The mold

def test_at_start_the_slots_wait_for_the_mold_and_are_then_forked_from_it():
    site = started(slots=3, mold="mold")
    assert [f["how"] for f in site.logged("spawn")] == ["fork"] * 3
    assert site.logged("mold-ready") and site.idle_wakes == 0


def test_a_worker_command_that_is_no_mold_is_execd_and_no_mold_is_tried_again_until_sighup():
    site = Site(slots=2, mold="stock")
    site.run_until(0.5 + WARM_S + 0.01)
    assert site.logged("mold-unavailable", reason="exited")
    assert site.core.ready_workers() == 2
    assert [f["how"] for f in site.logged("spawn")] == ["exec"] * 2
    site.signal_launcher(signal.SIGUSR1, sender=1)  # a rolling restart, not new code
    site.run_until(60)
    assert len(site.logged("mold-start")) == 1
    assert all(f["how"] == "exec" for f in site.logged("spawn"))
    site.signal_launcher(signal.SIGHUP)  # new code: perhaps a mold now
    site.run_until(120)
    assert len(site.logged("mold-start")) == 2 and site.core.ready_workers() == 2


def test_a_silent_mold_is_killed_at_the_ready_timeout_and_the_workers_are_execd():
    site = Site(mold="silent", ready_timeout=5.0)
    site.run_until(5.0 + WARM_S + 0.01)
    assert site.logged("mold-unavailable", reason="silent past --ready-timeout")
    assert (site.mold_pid, signal.SIGKILL) in site.sent
    assert site.core.ready_workers() == 1 and site.logged("spawn", how="exec")
    assert site.idle_wakes <= 1


def test_sighup_starts_a_new_mold_first_replaces_every_worker_from_it_then_retires_the_old_one():
    site = started(slots=2, mold="mold")
    old_mold, before = site.mold_pid, {site.serving(0), site.serving(1)}
    site.signal_launcher(signal.SIGHUP)
    site.run_until(60)
    order = [e for e, f in site.log if e in ("mold-start", "mold-ready", "rolling-restart", "rolling-restart-done")
             or (e == "mold-exit" and f["pid"] == old_mold)]
    assert order[-5:] == ["mold-start", "mold-ready", "rolling-restart", "rolling-restart-done", "mold-exit"]
    assert not {site.serving(0), site.serving(1)} & before
    assert [f["how"] for f in site.logged("spawn", role="warming")] == ["fork", "fork"]
    assert site.most_per_slot <= 2 and site.idle_wakes == 0


def test_a_mold_that_dies_is_restarted_after_a_doubling_backoff_and_meanwhile_workers_are_execd():
    site = started(mold="mold")
    site.kill(site.mold_pid)
    site.run_until(site.now + 0.01)
    assert site.logged("mold-failed", delay_s=1.0)
    site.kill(site.serving())  # its slot cannot wait for the mold
    site.run_until(site.now + 0.01)
    assert site.logged("spawn", how="exec")
    site.run_until(site.now + 1.0 + WARM_S + 0.01)
    assert len(site.logged("mold-ready")) == 2
    site.kill(site.mold_pid)
    site.run_until(site.now + 0.01)
    assert site.logged("mold-failed", delay_s=2.0)


def test_a_stop_retires_the_mold_and_ends_once_it_has_exited():
    site = started(slots=2, mold="mold")
    site.signal_launcher(signal.SIGTERM)
    site.run_until(60)
    assert site.core.finished and site.logged("mold-exit", pid=site.mold_pid, status=0)
    assert not site.logged("mold-kill")


def test_a_stop_waits_for_a_mold_that_hangs_until_the_stop_timeout_then_kills_it_once():
    site = started(slots=2, mold="mold", stop_timeout=10.0)
    site.mold_hangs = True
    site.signal_launcher(signal.SIGTERM)
    site.run_until(site.now + 5)
    assert not site.core.workers and not site.core.finished
    site.run_until(60)
    assert site.core.finished
    assert site.sent.count((site.mold_pid, signal.SIGKILL)) == 1


def test_a_worker_a_given_up_mold_forked_after_all_is_told_to_go_when_it_says_ready():
    site = started(mold="mold")
    site.core.notified(999, {"READY": "1"}, site.now)
    assert site.core.actions == [(STRAY, 999)]
    site.core.actions = []
    site.core.notified(998, {"STOPPING": "1"}, site.now)
    assert site.core.actions == []


# --------------------------------------------------------------------------
# The watchdog

WATCHDOG_S = 20.0


def freeze(site, pid):
    """As kill -STOP: the process sends nothing more and heeds no signal but SIGKILL."""
    site.frozen.add(pid)


def test_a_worker_silent_past_the_watchdog_timeout_is_replaced_then_sigkilled_once_its_replacement_is_ready():
    site = started(watchdog=WATCHDOG_S)
    frozen = site.serving()
    freeze(site, frozen)
    site.run_until(site.now + WATCHDOG_S - 0.5)
    assert not site.logged("unresponsive") and not site.logged("replace")
    site.run_until(site.now + 0.5 + WARM_S + 0.1)
    [found] = site.logged("unresponsive", pid=frozen)
    assert found["slot"] == 0 and found["silent_s"] >= WATCHDOG_S
    assert site.serving() not in (None, frozen)
    assert (frozen, signal.SIGKILL) in site.sent and (frozen, signal.SIGHUP) not in site.sent
    assert frozen not in site.core.workers
    tally = site.core.tally
    assert tally.unresponsive_kills == 1 and tally.recycles["unresponsive"] == 1 and tally.crashes == 0


def test_a_worker_that_speaks_again_before_the_timeout_is_left_serving():
    site = started(watchdog=WATCHDOG_S)
    pid = site.serving()
    freeze(site, pid)
    site.run_until(site.now + WATCHDOG_S * 0.9)
    site.frozen.discard(pid)
    site.say(pid, {})  # a long GC pause, a busy machine: over now
    site.run_until(site.now + 10 * WATCHDOG_S)
    assert site.serving() == pid and not site.logged("unresponsive") and not site.sent


def test_a_stock_worker_that_never_sends_watchdog_is_exempt():
    site = Site(watchdog=WATCHDOG_S, speaks_notify=False, ready_timeout=5.0)
    site.run_until(5.1)
    pid = site.serving()
    site.wakes = site.idle_wakes = 0
    site.run_until(site.now + 10 * WATCHDOG_S)
    assert site.serving() == pid and not site.logged("unresponsive") and not site.sent
    assert site.idle_wakes <= 10 * WATCHDOG_S / launcher.IDLE_WAKE_S + 1


def test_a_frozen_worker_whose_replacement_cannot_start_is_killed_after_a_second_timeout_and_its_slot_respawns():
    site = started(watchdog=WATCHDOG_S)
    frozen = site.serving()
    freeze(site, frozen)
    site.behaviour[0] = "crash"  # every replacement dies before READY=1
    site.run_until(site.now + 2 * WATCHDOG_S - 0.5)
    assert frozen in site.core.workers and (frozen, signal.SIGKILL) not in site.sent
    assert site.logged("backoff")
    site.run_until(site.now + 1.0)
    assert (frozen, signal.SIGKILL) in site.sent and frozen not in site.core.workers
    site.behaviour[0] = "ok"  # the cause is gone: the slot serves again after its backoff
    site.run_until(site.now + launcher.BACKOFF_MAX_S + WARM_S + 0.1)
    assert site.serving() not in (None, frozen)
    assert site.core.tally.unresponsive_kills == 1


def test_with_two_slots_a_frozen_worker_is_replaced_and_the_other_slot_is_untouched():
    site = started(slots=2, watchdog=WATCHDOG_S, mold="mold")
    other, frozen = site.serving(0), site.serving(1)
    freeze(site, frozen)
    site.run_until(site.now + WATCHDOG_S + FORK_S + 0.1)
    assert site.serving(0) == other and site.serving(1) not in (None, frozen)
    assert [pid for pid, _ in site.sent] == [frozen]


def test_an_unresponsive_mold_is_killed_and_restarted_like_a_dead_one_and_workers_keep_serving():
    site = started(watchdog=WATCHDOG_S, mold="mold")
    mold, worker = site.mold_pid, site.serving()
    freeze(site, mold)
    site.run_until(site.now + WATCHDOG_S + 0.1)
    assert site.logged("unresponsive", pid=mold, role="mold")
    assert (mold, signal.SIGKILL) in site.sent and site.logged("mold-failed", pid=mold, reason="unresponsive")
    site.run_until(site.now + launcher.BACKOFF_FIRST_S + WARM_S + 0.1)
    assert site.mold_pid != mold and site.core.molds.fork_from() == site.mold_pid
    assert site.serving() == worker and site.core.tally.unresponsive_kills == 1


def test_a_worker_that_goes_silent_while_draining_is_killed():
    site = started(watchdog=WATCHDOG_S)
    pid = site.serving()
    site.behaviour[0] = "hang"  # never finishes its drain...
    site.signal_launcher(signal.SIGUSR1, sender=pid)
    site.run_until(site.now + WARM_S + 0.1)
    assert site.core.workers[pid].role == "draining"
    freeze(site, pid)  # ...and then stops speaking
    site.run_until(site.now + WATCHDOG_S + 0.1)
    assert (pid, signal.SIGKILL) in site.sent and pid not in site.core.workers


# --------------------------------------------------------------------------
# SIGUSR2

def test_sigusr2_is_passed_to_every_worker_that_speaks_notify_and_never_to_the_mold():
    site = started(slots=2, mold="mold")
    workers = {site.serving(0), site.serving(1)}
    site.signal_launcher(signal.SIGUSR2, sender=42)
    assert set(site.sent) == {(pid, signal.SIGUSR2) for pid in workers}
    assert site.logged("stacks-asked", workers=2)


def test_sigusr2_spares_a_stock_worker_which_it_would_kill():
    site = Site(speaks_notify=False, ready_timeout=5.0)
    site.run_until(5.1)
    site.signal_launcher(signal.SIGUSR2, sender=42)
    assert not site.sent and site.logged("stacks-asked", workers=0)


# --------------------------------------------------------------------------
# A stale mold

def stale(site, reason="trac.ini"):
    site.core.notified(site.mold_pid, {"MOLD_STALE": reason}, site.now)
    site.wake_at = site.settle()


def test_a_stale_mold_is_replaced_make_before_break_with_no_rolling_restart():
    site = started(slots=2, mold="mold")
    old_mold, workers = site.mold_pid, {site.serving(0), site.serving(1)}
    stale(site)
    assert site.logged("mold-stale", pid=old_mold, reason="trac.ini") and site.mold_pid != old_mold
    site.run_until(site.now + WARM_S / 2)
    assert site.core.molds.fork_from() == old_mold, "the stale mold forks until its successor is ready"
    site.run_until(site.now + WARM_S)
    assert site.core.molds.fork_from() == site.mold_pid
    assert site.logged("mold-refreshed", old=old_mold) and site.logged("mold-exit", pid=old_mold)
    assert {site.serving(0), site.serving(1)} == workers and not site.logged("rolling-restart")
    assert site.core.tally.stale_molds == 1


def test_a_mold_stale_again_and_again_is_refreshed_at_most_once_per_refresh_interval_and_the_wait_is_logged():
    site = started(mold="mold")
    minutes = 10
    end = site.now + minutes * 60
    while site.now < end:
        if site.core.molds.current and site.core.molds.current.ready and site.core.molds.current.stale is None:
            stale(site)  # a plugin that rewrites trac.ini on every request
        site.run_until(site.now + 0.5)
    refreshes = len(site.logged("mold-refreshed"))
    assert minutes * 60 / launcher.MOLD_REFRESH_MIN_S - 1 <= refreshes <= minutes * 60 / launcher.MOLD_REFRESH_MIN_S + 1
    assert site.logged("mold-refresh-deferred")
    assert site.core.ready_workers() == 1 and site.core.molds.fork_from() is not None


def test_a_refresh_whose_new_mold_dies_leaves_the_stale_one_forking_and_is_tried_again_later():
    site = started(mold="mold")
    old_mold = site.mold_pid
    stale(site)
    site.kill(site.mold_pid)
    site.run_until(site.now + 0.1)
    assert site.logged("mold-refresh-failed") and site.core.molds.fork_from() == old_mold
    site.run_until(site.now + launcher.MOLD_REFRESH_MIN_S + WARM_S)
    assert site.core.molds.fork_from() not in (None, old_mold)


def test_sighup_while_a_stale_mold_is_refreshed_gives_up_the_refresh_for_a_mold_of_the_new_code():
    site = started(mold="mold")
    stale(site)
    refresh = site.mold_pid
    site.signal_launcher(signal.SIGHUP)
    assert (refresh, signal.SIGKILL) in site.sent
    site.run_until(site.now + 60)
    assert site.core.molds.fork_from() not in (None, refresh) and site.logged("rolling-restart-done")


def test_a_launcher_that_was_suspended_itself_does_not_take_its_workers_silence_for_theirs():
    site = started(slots=2, watchdog=WATCHDOG_S, mold="mold")
    workers, mold = {site.serving(0), site.serving(1)}, site.mold_pid
    site.now += 3 * WATCHDOG_S  # the machine slept; their datagrams wait, unread, in our socket
    site.wake_at = site.settle()
    assert site.logged("watchdog-restarted", watched=3) and not site.logged("unresponsive")
    site.run_until(site.now + 3 * WATCHDOG_S)
    assert {site.serving(0), site.serving(1)} == workers and site.mold_pid == mold and not site.sent


def test_while_anything_is_watched_the_loop_wakes_every_quarter_of_the_timeout_and_not_more():
    site = started(watchdog=WATCHDOG_S)
    freeze(site, site.serving())  # no datagram wakes it now: only its own deadlines
    site.run_until(site.now + WATCHDOG_S * 0.99)
    assert site.wakes <= 4 + 1 and not site.logged("watchdog-restarted")


def test_without_headroom_two_slots_asking_at_once_are_stopped_and_started_one_after_the_other():
    site = started(slots=2, shortage={"limit": "cgroup"})
    first, second = site.serving(0), site.serving(1)
    site.signal_launcher(signal.SIGUSR1, sender=first)
    site.signal_launcher(signal.SIGUSR1, sender=second)
    site.run_until(site.now + 60)
    order = [(e, f.get("pid")) for e, f in site.log if e in ("stop-then-start", "ready")][-4:]
    # The second slot's worker is stopped only once the first's new worker is ready: a worker
    # still starting has not grown to its size, and the memory beside it would be misread.
    assert [e for e, _ in order] == ["stop-then-start", "ready", "stop-then-start", "ready"], order
    assert site.serving(0) not in (None, first) and site.serving(1) not in (None, second)
