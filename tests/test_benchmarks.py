"""The benchmark chain works: every benchmark runs (small loads) and the report (what
docs/results.md is made from) gets each one's headline figures. The figures of a quick run are
not checked: speed is measured in benchmarks, not in tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks._fleet import BENCH_MARK
from benchmarks._headlines import HEADLINES
from benchmarks.real_engine import manifest_path
from tests.helpers.servers import ROOT

pytestmark = pytest.mark.fleet


@pytest.mark.timeout(900)
def test_run_all_runs_every_benchmark_and_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "results.md"
    expected = set(HEADLINES)
    skip = []
    if not manifest_path().is_file():  # scripts/prepare_engines.py not run: said, not hidden
        expected.discard("real_engine")
        skip = ["--skip", "real_engine"]
    done = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--out", str(report),
         "--results", str(tmp_path / "results"), *skip],
        cwd=ROOT, capture_output=True, text=True, timeout=890, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert {row.split(" | ")[0].removeprefix("| ") for row in rows[1:]} == expected
    assert "failed" not in text and "--quick" in text
    for name in expected:
        assert (tmp_path / "results" / f"{name}.json").is_file()
    assert _benchmark_engines() == []  # every benchmark stopped the engines it started


def _benchmark_engines() -> list[int]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if BENCH_MARK in proc.environ():
                found.append(proc.pid)
    return found
