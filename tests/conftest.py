import os
import signal
import sys
from pathlib import Path

import pytest

# The tests import their helpers (tests/) and the two modules under test (the
# checkout's top), whether or not the package is installed.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from stack import Postgres  # noqa: E402
from support import make_trac_env, start_launcher, worker_script  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the whole run, started on first use."""
    cluster = Postgres()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def trac_env(tmp_path_factory, request):
    """One real Trac environment (trac-admin initenv) for the whole run.

    On SQLite; TEST_DATABASE=postgres puts it on PostgreSQL instead, to run
    any suite on both.
    """
    path = tmp_path_factory.mktemp("trac") / "env"
    if os.environ.get("TEST_DATABASE") == "postgres":
        return make_trac_env(path, request.getfixturevalue("postgres").create_database("trac"))
    return make_trac_env(path)


@pytest.fixture
def started():
    """Everything a test starts, stopped at teardown newest first (the web server before Trac)."""
    things = []
    yield things
    problems = []
    for thing in reversed(things):
        try:
            thing.stop()
        except Exception as problem:  # noqa: BLE001 - stop the rest, then say so
            problems.append(problem)
    assert not problems, problems


@pytest.fixture
def launch(tmp_path):
    """Start launchers (every default: the mold on) on fresh sockets in tmp_path; stop them all at the end.

    A worker a test froze (SIGSTOP) is continued first, so that it drains as
    any other and the stop takes no longer than usual.
    """
    started = []

    def launch(*flags, env=None, worker=worker_script("hello.py"), name="launcher"):
        launcher = start_launcher(tmp_path, worker, *flags, env=env, name=name)
        started.append(launcher)
        return launcher

    yield launch
    for launcher in started:
        for event in launcher.events("spawn"):
            try:
                os.kill(int(event["pid"]), signal.SIGCONT)
            except ProcessLookupError:
                pass
        launcher.stop(timeout=40)
