"""Smoke test of the GPU benchmark's code path (B6), run on the CPU with tiny shapes.

It checks that the script runs its fp32/bf16 comparison and its packed workers to the end and
prints a row for each; no timing is asserted (the numbers need a GPU: bench/RESULTS.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a few model builds and two worker processes: about a minute on 2 cores
def test_gpu_bench_quick_runs_on_cpu():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| B6 ")]
    assert len(rows) == 3, result.stdout
    assert "fp32" in rows[0] and "bf16" in rows[0]
    assert all("steps/s in all" in r for r in rows[1:]), rows
