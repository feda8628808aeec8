"""The benchmark scripts under bench/ keep working: each runs in its smoke mode (a few seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, require_program


@pytest.mark.parametrize(
    "script, rows, needs",
    [
        ("cluster.py", ("| 1 |", "| 2 |"), "redis-server"),
        ("metrics_overhead.py", ("| 0 |", "| 1 |"), None),
        ("fanout.py", ("| fan-out, burst: delivered msgs/s |", "| targeted, spaced: server µs per delivered msg |"),
         "node"),
        ("soak.py", ("| 0 |", "| 600 |"), None),
        ("idle.py", ("| server RSS per connection (KiB) |", "| idle server CPU (% of one core) |"), "node"),
    ],
)
def test_benchmark_smoke_mode_runs(script, rows, needs):
    require_program("taskset")
    if needs:
        require_program(needs)
    result = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith(rows)]
    assert len(table) == 2, result.stdout
