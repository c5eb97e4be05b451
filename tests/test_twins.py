"""The code written twice on purpose, once in launcher.py and once in trac_fcgi.py, is the same code.

Each file must run alone (the launcher with the standard library only, the
worker copied over a trac.fcgi), so what both need is copied, not imported.
Every pair is named here.  A pair is compared as syntax trees, docstrings
left out, after renaming only what is meant to differ (the name each file
gives the function); a pair whose difference is deliberate in its text is
compared on one table of inputs instead.
"""
import ast
import os
import subprocess
import sys

import pytest

import launcher
import trac_fcgi
from support import ROOT

# (name in launcher.py, name in trac_fcgi.py)
SAME_CODE = [
    ("size_bytes", "size"),
    ("on_off", "on_off"),
    ("address", "address"),
    ("log", "log"),
    ("bind_socket", "bind_socket"),
    ("bind_unix", "bind_unix"),
    ("socket_directory_fix", "socket_directory_fix"),
    ("remove_stale_socket", "remove_stale_socket"),
    ("user_name", "user_name"),
]
# Same job, text that differs on purpose: the worker reads its own /proc/self
# by default, the launcher always names a pid.
SAME_BEHAVIOUR = [("shared_memory", "smaps_rollup")]


def functions(path):
    tree = ast.parse((ROOT / path).read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def normalised(function, name):
    """FUNCTION's syntax tree, as text, under NAME and without its docstring or comments."""
    node = ast.parse(ast.unparse(function)).body[0]
    node.name = name
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:]
    return ast.dump(node, include_attributes=False)


LAUNCHER, WORKER = functions("launcher.py"), functions("trac_fcgi.py")


@pytest.mark.parametrize("names", SAME_CODE, ids=lambda pair: "/".join(pair))
def test_each_deliberate_copy_is_the_same_code_in_both_files(names):
    ours, theirs = names
    assert ours in LAUNCHER and theirs in WORKER, "a twin was renamed or removed: update SAME_CODE"
    assert normalised(LAUNCHER[ours], theirs) == normalised(WORKER[theirs], theirs), (
        "launcher.py's %s and trac_fcgi.py's %s have drifted apart:\n--- launcher.py\n%s\n--- trac_fcgi.py\n%s"
        % (ours, theirs, ast.unparse(LAUNCHER[ours]), ast.unparse(WORKER[theirs])))


def test_both_files_refuse_bad_input_with_one_exception_of_one_name():
    assert launcher.BadInput.__name__ == trac_fcgi.BadInput.__name__ == "BadInput"
    assert "BadSetting" not in (ROOT / "launcher.py").read_text() + (ROOT / "trac_fcgi.py").read_text()


def test_both_files_name_the_effective_user_the_one_file_access_is_checked_as():
    assert launcher.user_name() == trac_fcgi.user_name()
    assert "getuid()" not in ast.unparse(LAUNCHER["user_name"]) + ast.unparse(WORKER["user_name"])


@pytest.mark.parametrize("names", SAME_BEHAVIOUR, ids=lambda pair: "/".join(pair))
def test_each_copy_that_differs_in_text_gives_the_same_answers(names):
    ours, theirs = names
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)"],
                               stdout=subprocess.PIPE)
    try:
        sleeper.stdout.readline()  # asleep from now on
        # A process starting or ending elsewhere moves a PSS (shared pages are
        # divided among their sharers): two reads agree once in a few tries,
        # copies that drifted apart never do.
        pairs = [(getattr(launcher, ours)(sleeper.pid), getattr(trac_fcgi, theirs)(sleeper.pid))
                 for _ in range(20)]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert any(a == b and a[0] for a, b in pairs), pairs
    never = 2 ** 22 + 1  # above the kernel's largest pid
    assert getattr(launcher, ours)(never) == getattr(trac_fcgi, theirs)(never) == (None, None)


def test_both_logs_write_the_same_entry_for_the_same_event(capfd):
    facts = dict(path="/wiki/a b\nforged event=x", seconds=1.5, none=None, count=3)
    launcher.log("same", details=["first line", "second"], **facts)
    trac_fcgi.log("same", details=["first line", "second"], **facts)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 6, lines
    assert lines[0].split(" ", 1)[1] == lines[3].split(" ", 1)[1], lines
    assert lines[0].endswith("event=same path='/wiki/a b\\nforged event=x' seconds=1.500 count=3"), lines
    assert lines[1:3] == lines[4:6] == ["  first line", "  second"], lines
