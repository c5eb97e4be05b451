"""The launcher's watchdog and SIGUSR2, with real processes: a worker frozen by SIGSTOP is replaced.

The workers are tests/workers/hello.py: trac_fcgi.py's own server, which says
WATCHDOG=1 with READY=1 and then from its main loop, and logs `event=stacks`
on SIGUSR2.  The mold is trac_fcgi.py's own too, which sends WATCHDOG=1 from
its fork-request loop.  The requests go through a real FastCGI client
(flup's) on the launcher's socket: a request that arrives while the only
worker is frozen waits in the listen backlog, as behind nginx, until a
worker accepts it.
"""
import os
import re
import signal
import time


import launcher as launcher_module
from support import PYTHON, TRAC_FCGI, alive, fcgi_get, wait_until, worker_script

HELLO = worker_script("hello.py")
DEFAULT_TIMEOUT_S = next(default for flag, _, _, default, _, _ in launcher_module.SETTINGS
                         if flag == "--watchdog-timeout")
# Time for a worker to pick a connection up once it says READY=1 (its
# loop wakes every 0.5 s) and for the launcher's loop to act: generous, for a
# loaded machine.
SLACK_S = 5.0


# `launch` (conftest.py) starts launchers with every default and stops them at the end.


def answering_pid(launcher, timeout=30):
    response = fcgi_get(launcher.socket, "/", timeout=timeout)
    assert response.status == 200
    return int(response.body.split()[-1])


def freeze_the_only_worker_and_time_the_next_answer(launcher, timeout_s):
    launcher.wait_for("all-ready", timeout=60)
    frozen = answering_pid(launcher)
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    answerer = answering_pid(launcher, timeout=timeout_s * 3 + 60)  # waits in the backlog meanwhile
    waited = time.monotonic() - stopped
    assert answerer != frozen
    [unresponsive] = launcher.events("unresponsive", pid=frozen)
    assert unresponsive["slot"] == "0" and float(unresponsive["silent_s"]) >= timeout_s
    launcher.wait_for("exit", pid=frozen, signal="SIGKILL")
    assert not launcher.events("hup", pid=frozen), "a frozen worker cannot drain: SIGKILL, not SIGHUP"
    # One fork (or exec): the replacement's own warm-up, as the launcher measured it.
    ready_s = float(launcher.events("ready", pid=answerer)[0]["ready_s"])
    assert waited <= timeout_s + ready_s + SLACK_S, (waited, ready_s)
    return frozen, answerer


def test_a_stopped_only_worker_is_replaced_within_the_watchdog_timeout_plus_a_fork_and_the_log_names_its_pid(
        launch):
    launcher = launch()  # every default: the mold on, the watchdog at its default
    frozen, answerer = freeze_the_only_worker_and_time_the_next_answer(launcher, DEFAULT_TIMEOUT_S)
    assert launcher.events("spawn", pid=answerer)[0]["how"] == "fork"
    assert launcher.events("kill", pid=frozen)


def test_with_the_mold_off_a_stopped_only_worker_is_replaced_by_an_execd_one(launch):
    # A shorter watchdog than the default, which the test above shows: the same path, in less time.
    launcher = launch("--watchdog-timeout", "6", env={"LAUNCHER_MOLD": "off"})
    frozen, answerer = freeze_the_only_worker_and_time_the_next_answer(launcher, 6.0)
    assert launcher.events("spawn", pid=answerer)[0]["how"] == "exec"


def test_with_two_workers_the_other_keeps_serving_while_a_stopped_one_is_replaced(launch):
    launcher = launch("--workers", "2", "--watchdog-timeout", "6")
    launcher.wait_for("all-ready", timeout=60)
    pids = {int(e["pid"]) for e in launcher.events("ready")}
    frozen = answering_pid(launcher)
    [other] = pids - {frozen}
    os.kill(frozen, signal.SIGSTOP)
    answers, failures = [], []
    deadline = time.monotonic() + 60
    while not launcher.events("exit", pid=frozen) and time.monotonic() < deadline:
        try:
            answers.append((time.monotonic(), answering_pid(launcher, timeout=3)))
        except Exception as error:  # noqa: BLE001 - every failure counts
            failures.append(repr(error))
        time.sleep(0.01)
    assert launcher.events("exit", pid=frozen, signal="SIGKILL")
    # Only a request the frozen worker had accepted can fail: the listen
    # backlog goes to whoever accepts, and the other worker does.
    assert len(failures) <= 1, failures
    by_other = [when for when, pid in answers if pid == other]
    assert len(by_other) >= 0.9 * len(answers) and len(by_other) > 20
    gaps = [b - a for a, b in zip(by_other, by_other[1:])]
    assert max(gaps) < 4.0, max(gaps)
    assert answering_pid(launcher) != frozen


def test_a_stock_worker_that_never_sends_watchdog_is_never_called_unresponsive(launch):
    launcher = launch("--watchdog-timeout", "2", "--ready-timeout", "3",
                      env={"LAUNCHER_MOLD": "off", "HELLO_NOTIFY": "0"})
    launcher.wait_for("all-ready", timeout=60)
    pid = answering_pid(launcher)
    time.sleep(5)  # more than twice the watchdog's timeout
    assert answering_pid(launcher) == pid and not launcher.events("unresponsive")


def test_a_stopped_mold_is_killed_and_replaced_and_the_workers_keep_serving(launch):
    launcher = launch("--watchdog-timeout", "4")
    launcher.wait_for("all-ready", timeout=60)
    mold = int(launcher.events("mold-start")[0]["pid"])
    worker = answering_pid(launcher)
    os.kill(mold, signal.SIGSTOP)
    launcher.wait_for("unresponsive", pid=mold, role="mold", timeout=30)
    launcher.wait_for("mold-exit", pid=mold, signal="SIGKILL", timeout=30)
    launcher.wait_for("mold-ready", count=2, timeout=60)
    assert answering_pid(launcher) == worker


def test_sigusr2_makes_every_worker_log_its_stacks_and_never_reaches_the_mold(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready", timeout=60)
    mold = int(launcher.events("mold-start")[0]["pid"])
    workers = {int(e["pid"]) for e in launcher.events("ready")}
    launcher.signal(signal.SIGUSR2)
    launcher.wait_for("stacks-asked", workers=2)
    wait_until(lambda: {int(p) for p in re.findall(r"trac-fcgi\[(\d+)\] event=stacks", launcher.log())} == workers,
               30, "event=stacks from both workers")
    assert alive(mold) and all(alive(pid) for pid in workers)
    assert "trac-fcgi[%d] event=stacks" % mold not in launcher.log()
    assert fcgi_get(launcher.socket).status == 200


def test_a_launcher_stopped_and_continued_keeps_its_workers_and_its_mold(launch):
    launcher = launch("--workers", "2", "--watchdog-timeout", "4")
    launcher.wait_for("all-ready", timeout=60)
    before = {int(e["pid"]) for e in launcher.events("ready")}
    launcher.signal(signal.SIGSTOP)
    time.sleep(12)  # three times the watchdog's timeout
    launcher.signal(signal.SIGCONT)
    launcher.wait_for("watchdog-restarted", timeout=30)
    time.sleep(2)
    assert not launcher.events("unresponsive") and not launcher.events("kill")
    assert {answering_pid(launcher) for _ in range(6)} <= before


def test_a_stopped_trac_worker_is_replaced_and_the_site_answers_within_the_watchdog_timeout_plus_a_fork(
        launch, trac_env):
    # Every default, and a real Trac site: what an admin who sent kill -STOP would see.
    launcher = launch(worker=[PYTHON, TRAC_FCGI], env={"TRAC_ENV": str(trac_env)})
    launcher.wait_for("all-ready", timeout=120)
    frozen = int(launcher.events("ready")[0]["pid"])
    assert fcgi_get(launcher.socket, "/wiki/WikiStart").status == 200
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    response = fcgi_get(launcher.socket, "/wiki/WikiStart", timeout=DEFAULT_TIMEOUT_S * 3 + 60)
    waited = time.monotonic() - stopped
    assert response.status == 200 and b"Welcome to Trac" in response.body
    launcher.wait_for("exit", pid=frozen, signal="SIGKILL")
    [replacement] = [event for event in launcher.events("ready") if int(event["pid"]) != frozen]
    assert launcher.events("spawn", pid=replacement["pid"])[0]["how"] == "fork"
    assert waited <= DEFAULT_TIMEOUT_S + float(replacement["ready_s"]) + SLACK_S, (waited, replacement)
