"""Workers forked from a warm mold: the launcher's side and the processes' side.

The workers are tests/workers/hello.py, which serves through trac_fcgi and so
answers as a mold when the launcher starts it as one.  Its knobs act where
it starts: HELLO_START_DELAY slows the mold's warm-up, never a fork's.
"""
import os
import re
import signal
import threading
import time


import trac_fcgi
from support import (PYTHON, TRAC_FCGI, alive, children, fcgi_get, make_trac_env, wait_until,
                     worker_script)

HELLO = worker_script("hello.py")


# `launch` (conftest.py) starts launchers with every default and stops them at the end.


def mold_pids(launcher):
    return [int(e["pid"]) for e in launcher.events("mold-start")]


def workers(launcher):
    """The launcher's live children that are not a mold."""
    return sorted(set(children(launcher.pid)) - set(mold_pids(launcher)))


def serving_pid(launcher):
    return int(fcgi_get(launcher.socket, "/").body.split()[-1])


def parent(pid):
    with open("/proc/%d/stat" % pid) as stat_file:
        return int(stat_file.read().rsplit(")", 1)[1].split()[1])


def socket_inode(path):
    """The inode of the socket a unix socket file names, as /proc/PID/fd shows it."""
    for line in open("/proc/net/unix"):
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path:
            return fields[6]
    raise AssertionError("no socket listens on %s" % path)


# --------------------------------------------------------------------------
# Forking

def test_workers_are_forked_from_one_mold_and_are_the_launchers_own_children(launch):
    launcher = launch("--workers", "3")
    launcher.wait_for("all-ready")
    [mold] = mold_pids(launcher)
    spawns = launcher.events("spawn", role="serving")
    assert [e["how"] for e in spawns] == ["fork"] * 3
    forked = {int(e["pid"]) for e in spawns}
    assert set(workers(launcher)) == forked
    assert all(parent(pid) == launcher.pid for pid in forked)
    assert {int(line.split("[")[1].split("]")[0]) for line in launcher.log().splitlines()
            if "event=forked mold=%d" % mold in line} == forked
    answered = {serving_pid(launcher) for _ in range(30)}
    assert answered <= forked and answered


def test_the_mold_never_holds_the_listening_socket(launch):
    # What a mold that went wrong could never do is accept: it has nothing to accept on.
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    [mold] = mold_pids(launcher)
    listening = "socket:[%s]" % socket_inode(launcher.socket)
    held = lambda pid: [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]
    assert listening not in held(mold)
    assert os.readlink("/proc/%d/fd/0" % mold) == os.devnull
    assert all(os.readlink("/proc/%d/fd/0" % pid) == listening for pid in workers(launcher))


def test_a_replacement_forked_from_the_mold_is_ready_without_warming_up_again(launch):
    # The mold's warm-up takes HELLO_START_DELAY; a fork inherits it warm.
    launcher = launch(env={"HELLO_START_DELAY": "5"})
    launcher.wait_for("all-ready", timeout=60)
    old = serving_pid(launcher)
    launcher.signal(signal.SIGUSR1)
    launcher.wait_for("exit", pid=old, timeout=20)
    new = launcher.events("ready")[-1]
    assert int(new["pid"]) != old and float(new["ready_s"]) < 5
    assert serving_pid(launcher) == int(new["pid"])


def test_a_forked_worker_first_refreezes_after_request_64_for_the_mold_froze_its_warm_set(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    worker = serving_pid(launcher)
    for _ in range(trac_fcgi.FORKED_FIRST_FREEZE + 5):
        assert serving_pid(launcher) == worker
    launcher.wait_for("freeze", requests=trac_fcgi.FORKED_FIRST_FREEZE)
    pattern = r"trac-fcgi\[%d\] event=freeze .*requests=(\d+)" % worker
    assert [int(n) for n in re.findall(pattern, launcher.log())] == [trac_fcgi.FORKED_FIRST_FREEZE]


def test_forked_workers_draw_their_own_random_numbers(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    numbers = {fcgi_get(launcher.socket, "/random").body for _ in range(20)}
    # Two workers with the mold's random state would answer one sequence twice.
    assert len(numbers) == 20


def test_a_burst_of_100_sigusr1_never_gives_a_slot_more_than_two_workers(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    most = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            most[0] = max(most[0], len(workers(launcher)))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(100):
        launcher.signal(signal.SIGUSR1)
        time.sleep(0.005)
    time.sleep(1)
    wait_until(lambda: len(launcher.events("rolling-restart-done")) == len(launcher.events("rolling-restart")), 30)
    stop.set()
    watcher.join()
    assert 1 <= most[0] <= 2
    wait_until(lambda: len(workers(launcher)) == 1, 30, "one worker left")
    assert fcgi_get(launcher.socket).status == 200


# --------------------------------------------------------------------------
# The mold's life

def test_sighup_starts_a_new_mold_first_replaces_every_worker_from_it_then_retires_the_old_one(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    old_workers = set(workers(launcher))
    [old_mold] = mold_pids(launcher)
    launcher.signal(signal.SIGHUP)
    launcher.wait_for("rolling-restart-done")
    launcher.wait_for("mold-exit", pid=old_mold, status=0)
    new_mold = mold_pids(launcher)[1]
    lines = launcher.log().splitlines()
    at = lambda text: next(i for i, line in enumerate(lines) if text in line)
    # The new mold answered before any worker was replaced, and the old one
    # went only once every worker had been.
    assert at("event=mold-ready pid=%d" % new_mold) < at("event=rolling-restart ")
    assert at("event=rolling-restart-done") < at("event=mold-exit pid=%d " % old_mold)
    new_workers = set(workers(launcher))
    assert len(new_workers) == 2 and not new_workers & old_workers
    for pid in new_workers:
        assert any("trac-fcgi[%d] event=forked mold=%d" % (pid, new_mold) in line for line in lines)


def test_a_mold_that_dies_is_restarted_with_backoff_and_meanwhile_workers_are_execd(launch):
    launcher = launch()
    launcher.wait_for("all-ready")
    [mold] = mold_pids(launcher)
    os.kill(mold, signal.SIGKILL)
    launcher.wait_for("mold-failed", pid=mold)
    # The only worker exits cleanly: its slot is filled at once, by exec.
    worker = serving_pid(launcher)
    os.kill(worker, signal.SIGTERM)
    launcher.wait_for("exit", pid=worker)
    launcher.wait_for("spawn", role="serving", how="exec")
    launcher.wait_for("mold-ready", count=2, timeout=30)
    assert float(launcher.events("mold-failed", pid=mold)[0]["delay_s"]) > 0
    # And from the new mold on, forks again.
    exec_pid = serving_pid(launcher)
    os.kill(exec_pid, signal.SIGTERM)
    launcher.wait_for("exit", pid=exec_pid)
    launcher.wait_for("spawn", role="serving", how="fork", count=2)
    assert fcgi_get(launcher.socket).status == 200


def test_a_worker_command_that_does_not_answer_as_a_mold_is_execd_for_each_worker(launch, tmp_path):
    # env -u hides the mold's fd from hello.py, as a stock trac.fcgi ignores
    # it: started as the mold with /dev/null for a socket, it serves one CGI
    # request to nobody and exits.
    stock = ["/usr/bin/env", "-u", "TRAC_FCGI_MOLD_FD", *HELLO]
    launcher = launch("--workers", "2", worker=stock)
    launcher.wait_for("all-ready")
    [mold] = mold_pids(launcher)
    assert launcher.events("mold-unavailable", pid=mold)
    assert [e["how"] for e in launcher.events("spawn", role="serving")] == ["exec", "exec"]
    wait_until(lambda: not alive(mold), 10, "the would-be mold to be gone")
    assert len(children(launcher.pid)) == 2
    old = serving_pid(launcher)
    launcher.signal(signal.SIGUSR1)
    launcher.wait_for("exit", pid=old, timeout=30)
    assert all(e["how"] == "exec" for e in launcher.events("spawn", role="warming"))


def test_mold_off_execs_every_worker_and_starts_no_mold(launch):
    launcher = launch("--mold", "off", "--workers", "2")
    launcher.wait_for("all-ready")
    assert not mold_pids(launcher)
    assert [e["how"] for e in launcher.events("spawn")] == ["exec", "exec"]


# --------------------------------------------------------------------------
# Stopping

def test_sigterm_retires_the_mold_and_every_worker_and_exits_zero(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    family = children(launcher.pid)
    assert len(family) == 3
    launcher.signal(signal.SIGTERM)
    assert launcher.wait(20) == 0
    assert not any(alive(pid) for pid in family)
    [mold] = mold_pids(launcher)
    assert launcher.events("mold-exit", pid=mold, status=0)


def test_the_mold_and_workers_leave_when_the_launcher_is_killed(launch):
    launcher = launch("--workers", "2")
    launcher.wait_for("all-ready")
    family = children(launcher.pid)
    assert len(family) == 3
    launcher.signal(signal.SIGKILL)
    launcher.wait(5)
    wait_until(lambda: not any(alive(pid) for pid in family), 10, "the mold and workers to leave")


# --------------------------------------------------------------------------
# Memory

def test_recycle_and_exit_lines_report_pss_and_private_memory(launch):
    launcher = launch(env={"TRAC_FCGI_MAX_REQUESTS": "3", "TRAC_FCGI_JITTER": "0"})
    launcher.wait_for("all-ready")
    first = serving_pid(launcher)  # request 1
    for _ in range(3):
        fcgi_get(launcher.socket)
    launcher.wait_for("exit", pid=first, timeout=20)
    recycle = next(line for line in launcher.log().splitlines()
                   if line.startswith("trac-fcgi[%d]" % first) and "event=recycle" in line)
    facts = dict(word.split("=", 1) for word in recycle.split()[1:] if "=" in word)
    exit_line = launcher.events("exit", pid=first)[0]
    for found in (facts, exit_line):
        rss, pss, private = (int(found.get(key, 0)) for key in ("rss", "pss", "private"))
        assert 0 < private <= pss, found
        if "rss" in found:
            # Forked: much of what RSS counts is shared with the mold.
            assert pss < rss, found


def test_the_mold_warms_every_path_given_and_one_that_fails_leaves_workers_to_be_execd(launch):
    launcher = launch(env={"TRAC_FCGI_WARMUP": "/,/broken"})
    [mold] = launcher.wait_for("mold-start")
    launcher.wait_for("mold-unavailable", pid=mold["pid"])
    assert "trac-fcgi[%s] event=warm path=/,/broken status=500" % mold["pid"] in launcher.log()


def every_template(trac_env_path):
    """The names of the templates in every template directory Trac knows for the environment."""
    from trac.env import Environment
    from trac.web.chrome import Chrome
    directories = Chrome(Environment(trac_env_path)).get_all_templates_dirs()
    return {os.path.relpath(os.path.join(parent, name), directory)
            for directory in directories for parent, _, files in os.walk(directory)
            for name in files if name.endswith(tuple(trac_fcgi.TEMPLATE_SUFFIXES))}


def test_the_mold_compiles_every_template_the_site_s_own_among_them(launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    # A site template, as an admin adds one: compiled with Trac's own.
    (tmp_path / "env" / "templates" / "site_note.html").write_text("<p>${project.name}</p>\n")
    launcher = launch(worker=[PYTHON, TRAC_FCGI], env={"TRAC_ENV": trac_env})
    [mold] = launcher.wait_for("mold", timeout=120)
    templates = every_template(trac_env)
    assert "site_note.html" in templates
    assert int(mold["templates"]) == len(templates) > 50
    launcher.wait_for("ready", timeout=60)
    assert b"Timeline" in fcgi_get(launcher.socket, "/timeline", timeout=60).body


def test_a_template_that_does_not_compile_is_named_and_the_site_is_served_all_the_same(launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    (tmp_path / "env" / "templates" / "site_broken.html").write_text("{% if %}\n")
    launcher = launch(worker=[PYTHON, TRAC_FCGI], env={"TRAC_ENV": trac_env})
    [failed] = launcher.wait_for("template-failed", timeout=120)
    assert failed["name"] == "site_broken.html"
    [mold] = launcher.wait_for("mold", timeout=60)
    assert int(mold["templates"]) == len(every_template(trac_env)) - 1
    launcher.wait_for("ready", timeout=60)
    assert fcgi_get(launcher.socket, "/wiki/WikiStart", timeout=60).status == 200
    assert all(e["how"] == "fork" for e in launcher.events("spawn"))


def test_under_a_parent_dir_the_mold_compiles_the_templates_of_each_project_the_warm_up_opened(launch, tmp_path):
    (tmp_path / "projects").mkdir()
    for project in ("alpha", "beta"):
        make_trac_env(tmp_path / "projects" / project)
    launcher = launch(worker=[PYTHON, TRAC_FCGI],
                      env={"TRAC_ENV_PARENT_DIR": str(tmp_path / "projects"),
                           "TRAC_FCGI_WARMUP": "/,/alpha/wiki,/beta/wiki"})
    [mold] = launcher.wait_for("mold", timeout=120)
    each = len(every_template(str(tmp_path / "projects" / "alpha")))
    assert int(mold["templates"]) == 2 * each
    launcher.wait_for("ready", timeout=60)
    assert b"beta" in fcgi_get(launcher.socket, "/beta/timeline", timeout=60).body
