"""The README's tables say what the code does: they are checked against the code's own tables."""
import re
import signal
import subprocess

import launcher
import trac_fcgi
from support import LAUNCHER, PYTHON, ROOT

README = (ROOT / "README.md").read_text()


def table_rows(heading_text):
    """{first cell: other cells} of the first Markdown table after HEADING_TEXT."""
    rest = README[README.index(heading_text):]
    rows = {}
    for line in rest.splitlines()[1:]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not set(cells[0]) <= set("- "):
                rows[cells[0]] = cells[1:]
        elif rows:
            break
    return rows


def plain(text):
    return text.replace("`", "")


def test_the_readme_signals_table_matches_the_launcher():
    rows = table_rows("To the launcher:")
    assert {plain(name) for name in rows} - {"signal"} == {signal.Signals(s).name for s in launcher.SIGNALS} | {"others"}
    for signum, effect in launcher.SIGNALS.items():
        assert plain(rows["`%s`" % signal.Signals(signum).name][0]) == effect
    assert plain(rows["others"][0]) == launcher.IGNORED_EFFECT


def test_the_readme_lists_every_worker_setting_with_its_default():
    rows = {plain(name): cells for name, cells in table_rows("| variable | default | meaning |").items()}
    for name, _, default, _ in trac_fcgi.SETTINGS:
        assert name in rows
        if default is not None:
            assert plain(rows[name][0]).startswith(default)


def test_the_readme_lists_every_launcher_flag_with_its_environment_variable_and_default():
    rows = {plain(name).split()[0]: cells for name, cells in table_rows("| flag | environment |").items()}
    for flag, env, _, default, _, _ in launcher.SETTINGS:
        assert plain(rows[flag][0]) == env
        if isinstance(default, str):
            assert plain(rows[flag][1]) == default
        elif default is not None:
            assert float(rows[flag][1]) == float(default)


def test_launcher_help_documents_every_flag_variable_and_signal():
    text = subprocess.run([PYTHON, LAUNCHER, "--help"], capture_output=True, text=True, check=True).stdout
    for flag, env, *_ in launcher.SETTINGS:
        assert flag in text and env in text
    for signum in launcher.SIGNALS:
        assert signal.Signals(signum).name in text
    assert "WORKER_PATH" in text and "NOTIFY_SOCKET" in text


def test_the_readme_opens_with_make_demo_and_make_test():
    opening = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    assert opening.split("\n")[0].startswith("make demo") and opening.split("\n")[1].startswith("make test")


def test_the_readme_nginx_fronts_table_is_bench_results_fronts_md():
    table = [line for line in (ROOT / "bench/results/fronts.md").read_text().splitlines() if line.startswith("|")]
    assert table and "\n".join(table) in README


def test_every_test_the_failure_modes_table_cites_exists():
    table = README[README.index("## Failure modes"):README.index("## Benchmark")]
    cited = set(re.findall(r"`(test_\w+)`", table))
    defined = set(re.findall(r"^def (test_\w+)", "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")),
                             re.M))
    assert cited and cited <= defined, cited - defined


def test_the_readme_metrics_table_is_the_launchers_metrics_table():
    rows = table_rows("| metric | type | labels | meaning |")
    assert [plain(name) for name in rows] == [name for name, *_ in launcher.METRICS]
    for name, kind, labels, meaning in launcher.METRICS:
        assert [plain(cell) for cell in rows["`%s`" % name]] == [kind, labels, meaning]


def test_the_readme_lists_every_recycle_reason_with_its_meaning():
    rows = table_rows("| reason | the worker left its slot because |")
    assert {plain(reason): plain(cells[0]) for reason, cells in rows.items()} == launcher.RECYCLE_REASONS


def tracked_text_files():
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, names.decode().split("\0")):
        path = ROOT / name
        if path.is_file() and path.suffix not in (".png", ".json"):
            yield path


def test_every_link_in_the_readme_and_the_examples_opens_in_the_repository():
    for doc in [ROOT / "README.md", *(ROOT / "examples").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            if not re.match(r"\w+://", target):
                assert (doc.parent / target).exists(), "%s links to %s, which is not there" % (doc.name, target)


def test_nothing_cites_notes_a_reader_cannot_open():
    # Team notes and issue numbers live outside the repository.
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        found = re.findall(r"DESIGN\.md|\bissue [0-9]+|\.\./shared", text)
        assert not found, "%s cites %s" % (path.relative_to(ROOT), found)
