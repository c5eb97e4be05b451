"""A mold that no longer matches the disk is noticed and replaced, with a real Trac environment.

trac.ini edited as the web admin does (`trac-admin ENV config set`), a plugin
dropped into plugins/, and a plugin that rewrites trac.ini on every request:
no signal is sent in any of them.  The workers are trac_fcgi.py, forked from
its mold, recycling every few requests so that new forks are seen soon.
"""
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import launcher as launcher_module
from support import PYTHON, TRAC_FCGI, cpu_seconds, family, fcgi_get, make_trac_env, start_launcher

TRAC_ADMIN = str(Path(PYTHON).parent / "trac-admin")

HELLO_PLUGIN = '''
from trac.core import Component, implements
from trac.web.api import IRequestHandler


class HelloPage(Component):
    """A page of the tests' own, as a one-file plugin in plugins/ adds one."""
    implements(IRequestHandler)

    def match_request(self, req):
        return req.path_info == "/hello-plugin"

    def process_request(self, req):
        req.send(b"hello from a plugin", "text/plain")
'''

REWRITING_PLUGIN = '''
import os

from trac.core import Component, implements
from trac.web.api import IRequestFilter


class RewritesTracIni(Component):
    """A plugin that saves trac.ini on every request, as a careless one might."""
    implements(IRequestFilter)

    def pre_process_request(self, req, handler):
        os.utime(self.env.config.filename)
        return handler

    def post_process_request(self, req, template, data, metadata):
        return template, data, metadata
'''


@pytest.fixture
def launch(tmp_path):
    started = []

    def launch(trac_env, *flags, env=None):
        environ = dict({"TRAC_FCGI_JITTER": "0"}, **({"TRAC_ENV": trac_env} if trac_env else {}))
        launcher = start_launcher(tmp_path, [PYTHON, TRAC_FCGI], *flags, env=dict(environ, **(env or {})))
        started.append(launcher)
        return launcher

    yield launch
    for launcher in started:
        launcher.stop(timeout=40)


def cpu_under(launcher):
    """CPU seconds of the launcher and every process under it, live or reaped."""
    members = family(launcher.pid)
    return cpu_seconds(members[0], children=True) + sum(cpu_seconds(pid, children=True) for pid in members[1:])


def cpu_per_request(launcher, requests, warm, clients=4, path="/wiki/WikiStart"):
    """Measured after WARM requests: a worker forked before the mold was refreshed has gone by then."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: fcgi_get(launcher.socket, path, timeout=60).status, range(warm)))
        before = cpu_under(launcher)
        statuses = list(pool.map(lambda _: fcgi_get(launcher.socket, path, timeout=60).status, range(requests)))
    assert statuses == [200] * requests
    return (cpu_under(launcher) - before) / requests


def test_after_a_trac_ini_edit_the_cpu_per_request_stays_within_1_15_times_with_no_signal(launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    launcher = launch(trac_env, env={"TRAC_FCGI_MAX_REQUESTS": "20"})
    launcher.wait_for("all-ready", timeout=120)
    before = cpu_per_request(launcher, 500, warm=40)
    subprocess.run([TRAC_ADMIN, trac_env, "config", "set", "project", "descr", "x"], check=True,
                   capture_output=True)
    stale = launcher.wait_for("mold-stale", count=2, timeout=60)  # the mold's line, and the launcher's
    assert {e["reason"] for e in stale} == {"trac.ini"} and any(e.get("env") == trac_env for e in stale)
    launcher.wait_for("mold-refreshed", timeout=120)
    after = cpu_per_request(launcher, 500, warm=40)
    print("cpu per request: %.1f ms before, %.1f ms after trac-admin config set: %.2fx"
          % (before * 1e3, after * 1e3, after / before))
    assert after <= 1.15 * before, (before, after)
    assert not launcher.events("rolling-restart") and not launcher.events("signal")


def test_a_plugin_dropped_into_plugins_is_served_by_newly_forked_workers_without_a_signal(launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    launcher = launch(trac_env, env={"TRAC_FCGI_MAX_REQUESTS": "5"})
    launcher.wait_for("all-ready", timeout=120)
    assert fcgi_get(launcher.socket, "/hello-plugin", timeout=60).status == 404
    (tmp_path / "env" / "plugins" / "hello_page.py").write_text(HELLO_PLUGIN)
    stale = launcher.wait_for("mold-stale", count=2, timeout=60)
    assert {e["reason"] for e in stale} == {"plugins"}
    launcher.wait_for("mold-refreshed", timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = fcgi_get(launcher.socket, "/hello-plugin", timeout=60)
        if response.status == 200:
            break
    assert response.status == 200 and response.body == b"hello from a plugin"
    assert launcher.events("spawn", how="fork")[-1]
    assert not launcher.events("rolling-restart")


def test_a_trac_ini_rewritten_on_every_request_costs_a_bounded_number_of_molds_and_the_site_keeps_serving(
        launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    (tmp_path / "env" / "plugins" / "rewrites_trac_ini.py").write_text(REWRITING_PLUGIN)
    launcher = launch(trac_env, env={"TRAC_FCGI_MAX_REQUESTS": "10"})
    launcher.wait_for("all-ready", timeout=120)
    interval = launcher_module.MOLD_REFRESH_MIN_S
    seen = {"new-mold": [], "mold-refresh-deferred": []}  # when each line was first seen
    started = time.monotonic()
    statuses = []
    # Until two refreshes have been asked for, or the bound allows few enough for any machine to show.
    while len(seen["new-mold"]) < 3 and time.monotonic() - started < 4 * interval:
        statuses.append(fcgi_get(launcher.socket, "/wiki/WikiStart", timeout=60).status)
        for event, times in seen.items():
            times += [time.monotonic()] * (len(launcher.events(event)) - len(times))
    assert set(statuses) == {200} and len(statuses) > 20
    elapsed = time.monotonic() - started
    new_molds = seen["new-mold"]
    assert 2 <= len(new_molds) <= 1 + elapsed / interval + 1, new_molds
    # Each new mold at least the interval after the one before (less how often this loop looks).
    assert all(b - a >= interval - 2.0 for a, b in zip(new_molds, new_molds[1:])), new_molds
    # A wait is logged once per stale mold, not once per look (tests/test_core.py shows a wait
    # for certain: here a loaded machine's warm-up can outlast the interval, and nothing waits).
    assert len(seen["mold-refresh-deferred"]) <= len(new_molds)


def stale_reasons(launcher, count=2):
    """The reasons of the mold's own mold-stale line and the launcher's, once both are there."""
    return launcher.wait_for("mold-stale", count=count, timeout=60)


def test_an_edit_of_the_inherited_file_makes_the_mold_stale(launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    shared = tmp_path / "shared.ini"
    shared.write_text("[project]\nfooter = shared\n")
    subprocess.run([TRAC_ADMIN, trac_env, "config", "set", "inherit", "file", str(shared)], check=True,
                   capture_output=True)
    launcher = launch(trac_env)
    launcher.wait_for("all-ready", timeout=120)
    assert not launcher.events("mold-stale")
    shared.write_text("[project]\nfooter = changed\n")
    later = time.time() + 2  # a newer mtime, whatever the file system's resolution
    os.utime(shared, (later, later))
    stale = stale_reasons(launcher)
    assert {e["reason"] for e in stale} == {"trac.ini"}
    launcher.wait_for("mold-refreshed", timeout=120)
    assert fcgi_get(launcher.socket, "/wiki/WikiStart", timeout=60).status == 200


def test_an_upgrade_that_writes_the_system_table_makes_the_mold_stale(launch, tmp_path):
    trac_env = make_trac_env(tmp_path / "env")
    launcher = launch(trac_env)
    launcher.wait_for("all-ready", timeout=120)
    # What `trac-admin ENV upgrade` does for a plugin whose schema it creates.
    from trac.env import Environment
    env = Environment(trac_env)
    env.db_transaction("INSERT INTO system (name, value) VALUES ('tests_plugin_version', '1')")
    env.shutdown()
    stale = stale_reasons(launcher)
    assert {e["reason"] for e in stale} == {"upgrade"}
    launcher.wait_for("mold-refreshed", timeout=120)
    assert fcgi_get(launcher.socket, "/wiki/WikiStart", timeout=60).status == 200


def test_under_a_parent_dir_an_edit_of_one_project_the_mold_opened_makes_it_stale_and_names_the_project(
        launch, tmp_path):
    (tmp_path / "projects").mkdir()
    for project in ("alpha", "beta"):
        make_trac_env(tmp_path / "projects" / project)
    launcher = launch(None, env={"TRAC_ENV_PARENT_DIR": str(tmp_path / "projects"),
                                 "TRAC_FCGI_WARMUP": "/,/alpha/wiki,/beta/wiki"})
    launcher.wait_for("all-ready", timeout=120)
    beta = str(tmp_path / "projects" / "beta")
    subprocess.run([TRAC_ADMIN, beta, "config", "set", "project", "descr", "x"], check=True, capture_output=True)
    stale = stale_reasons(launcher)
    assert [e["env"] for e in stale if "env" in e] == [beta]
    launcher.wait_for("mold-refreshed", timeout=120)
    assert b"beta" in fcgi_get(launcher.socket, "/beta/wiki", timeout=60).body
