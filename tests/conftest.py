import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import make_trac_env  # noqa: E402


@pytest.fixture(scope="session")
def trac_env(tmp_path_factory):
    """One real Trac environment (trac-admin initenv, SQLite) for the whole run."""
    return make_trac_env(tmp_path_factory.mktemp("trac") / "env")
