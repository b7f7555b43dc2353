"""Smoke tests of the search benchmarks (B4, B5): each `--quick` mode runs and prints its row.

No timing is asserted; the studies run on a local Ray of their own, in a scratch folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_quick(script: str, tmp_path: Path, *args: str) -> str:
    env = {"DSANET_BENCH_SCRATCH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_startup_quick_prints_the_phases_and_its_row(tmp_path):
    out = run_quick("bench_startup.py", tmp_path)
    assert "data attach" in out and "text encoder" in out
    assert "| B4 trial start-up" in out and "reused worker" in out


@pytest.mark.slow
def test_search_quick_measures_slot_utilisation(tmp_path):
    out = run_quick("bench_search.py", tmp_path)
    assert "share of slot time:" in out
    assert "| B4 slot utilisation (4 tiny trials, 2 slots) |" in out


@pytest.mark.slow
def test_efficiency_quick_compares_both_searches(tmp_path):
    png = tmp_path / "curves.png"
    out = run_quick("bench_efficiency.py", tmp_path, "--plot", str(png))
    assert "| B5 search efficiency" in out and "| tpe+asha, seed 0 |" in out
    assert png.is_file() and png.stat().st_size > 0
