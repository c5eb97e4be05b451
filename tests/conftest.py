import sys
from pathlib import Path

import pytest

# The tests import their helpers (tests/) and the two modules under test (the
# checkout's top), whether or not the package is installed.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from support import make_trac_env  # noqa: E402


@pytest.fixture(scope="session")
def trac_env(tmp_path_factory):
    """One real Trac environment (trac-admin initenv, SQLite) for the whole run."""
    return make_trac_env(tmp_path_factory.mktemp("trac") / "env")
