"""The benchmark cannot rot: its quick mode runs end to end, and its report is its records'.

Neither test looks at a figure: how fast or lean the code is belongs to
`make bench` and bench/README.md, not to timed unit tests.
"""
import json
import os
import subprocess
import sys

import pytest

from support import PYTHON, ROOT

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402


def test_the_committed_report_is_what_report_py_makes_from_the_committed_records():
    record = json.loads(report.COMMITTED.read_text())
    latest_md = report.markdown(record)
    assert latest_md == (BENCH / "results" / "latest.md").read_text()
    assert report.bench_readme(latest_md) == (BENCH / "README.md").read_text()
    assert report.readme_section(record) in (ROOT / "README.md").read_text()


def test_quick_mode_runs_every_stage_of_the_benchmark_and_writes_a_report(tmp_path):
    env = dict(os.environ, BENCH_QUICK="1", BENCH_OUT=str(tmp_path / "results"), BENCH_WORK=str(tmp_path / "work"))
    env.pop("BENCH_ROWS", None), env.pop("BENCH_ONLY", None)
    driver = subprocess.run([PYTHON, str(BENCH / "driver.py")], env=env, capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    records = tmp_path / "results" / "latest.json"
    subprocess.run([PYTHON, str(BENCH / "report.py"), str(records)], check=True, timeout=120)

    record = json.loads(records.read_text())
    ran = [row["name"] for row in record["rows"] if row["run"]]
    assert ran, record["rows"]
    for name in ran:
        scenarios = {r["scenario"] for r in record["rounds"] if r["row"] == name}
        assert {"steady", "open"} <= scenarios, (name, scenarios)
    opened = [r for r in record["rounds"] if r["scenario"] == "open"]
    assert all(r["load"]["latency_ms"] and r["samples"] for r in opened)
    assert set(record["experiments"]) == {"freeze_memory", "mold_memory", "handoff", "only_worker_killed",
                                          "recycle_cpu", "config_set_cpu", "launcher"}

    text = (tmp_path / "results" / "latest.md").read_text()
    for heading in ("## Capacity (closed loop)", "## Latency (open loop)", "### 80% of capacity", "## Targets"):
        assert heading in text
    assert (tmp_path / "results" / "latest.png").stat().st_size > 0


@pytest.mark.parametrize("path", sorted(p.name for p in BENCH.glob("*.py")))
def test_no_benchmark_module_is_over_400_lines(path):
    assert len((BENCH / path).read_text().splitlines()) <= 400
