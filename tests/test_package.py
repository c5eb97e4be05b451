"""The package installs with pip, and launcher.py needs nothing but the standard library."""
import configparser
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from support import copy_of_tracked_files

ROOT = Path(__file__).resolve().parent.parent


def version():
    """The version setup.cfg gives the package, which both programs' --version must print."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    return config["metadata"]["version"]


VERSION = version()


def test_both_scripts_are_executable_in_git_and_on_disk():
    # Both have a shebang: ./trac_fcgi.py and WORKER_PATH=<checkout>/trac_fcgi.py must run as checked out.
    staged = subprocess.run(["git", "ls-files", "-s", "launcher.py", "trac_fcgi.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    assert [line.split()[0] for line in staged if line] == ["100755", "100755"], staged
    for name in ("launcher.py", "trac_fcgi.py"):
        assert os.access(ROOT / name, os.X_OK)
        assert (ROOT / name).read_text().startswith("#!/usr/bin/env python3\n")


def test_launcher_imports_and_runs_with_the_standard_library_alone():
    # -S: no site-packages at all, so any third-party import would fail here.
    code = ("import sys, launcher; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
            " - {'launcher', '__main__'}))")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-S", "launcher.py", "--help"], cwd=ROOT,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "WORKER_PATH" in help_text.stdout


def test_pip_install_in_a_fresh_venv_gives_both_console_scripts(tmp_path):
    # The dependencies (Trac, flup, setuptools<81) come from the test run's
    # own environment, put on the new venv's path, so that no network is needed.
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test-run-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ensurepip's own setuptools may be too old to build a wheel; the build
    # then uses the test run's (pinned <81), as the dependencies do.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], capture_output=True)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation",
                              str(ROOT)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    for script, says in (("trac-fcgi-launcher", "WORKER_PATH"), ("trac-fcgi", "TRAC_FCGI_MAX_RSS")):
        out = subprocess.run([str(target / "bin" / script), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0 and says in out.stdout, out.stderr
        out = subprocess.run([str(target / "bin" / script), "--version"], cwd=tmp_path, capture_output=True,
                             text=True)
        assert out.returncode == 0 and out.stdout.strip() == VERSION, out
    show = "import launcher, trac_fcgi; print(launcher.__file__, trac_fcgi.__file__)"
    where = subprocess.run([str(python), "-c", show], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(path.startswith(site) for path in where), where


def test_building_the_package_prints_no_warning_box(tmp_path):
    # The builds that `make demo` (editable) and `pip install` (a wheel) run,
    # offline: setuptools' own backend, from a fresh copy of the checkout,
    # which warns in a box about what it deprecates or distrusts.
    checkout = copy_of_tracked_files(tmp_path / "checkout")
    for build in ("build_wheel", "build_editable"):
        done = subprocess.run([sys.executable, "-c", "import setuptools.build_meta as backend; "
                               "backend.%s(%r)" % (build, str(tmp_path))],
                              cwd=checkout, capture_output=True, text=True)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "!!" not in output and "Warning" not in output, (build, output)


def test_no_file_in_git_holds_a_merge_conflict_marker():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marked = []
    for name in tracked:
        try:
            lines = (ROOT / name).read_text().splitlines()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # a plot, or a file this checkout does not have
        marked += ["%s:%d" % (name, n + 1) for n, line in enumerate(lines)
                   if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert not marked
