"""The package installs and both modules import with the standard library only."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_launcher_imports_only_the_standard_library():
    code = (
        "import sys, launcher; "
        "third = [m for m in sys.modules if m.split('.')[0] in ('flup', 'trac', 'pkg_resources')]; "
        "print(third)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
