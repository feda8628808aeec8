"""The benchmark scripts under bench/ keep working: each runs in its smoke mode (a few seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, require_program


@pytest.mark.parametrize(
    "script, rows", [("cluster.py", ("| 1 |", "| 2 |")), ("metrics_overhead.py", ("| 0 |", "| 1 |"))]
)
def test_benchmark_smoke_mode_runs(script, rows):
    require_program("taskset")
    if script == "cluster.py":
        require_program("redis-server")
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith(rows)]
    assert len(table) == 2, result.stdout
