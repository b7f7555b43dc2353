"""Smoke tests of the benchmarks: each `--quick` run exits 0 and prints its result row.

No timing is asserted; the numbers live in bench/RESULTS.md. All are in the slow set (`-m slow`):
each starts a Python with torch and builds models, which the default suite cannot afford.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "xd_metrics_seed0.npz"


def _quick(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_step_quick_losses_equal():
    out = _quick("bench_step.py")
    assert "| B1 training step" in out
    assert "losses equal" in out and "gradients equal" in out


@pytest.mark.slow
def test_eval_quick():
    out = _quick("bench_eval.py")
    assert "| B2 test-set evaluation vs training epoch" in out
    assert "% of an epoch" in out


@pytest.mark.slow
def test_data_quick_rows_equal():
    out = _quick("bench_data.py")
    assert "| B3 epoch data time" in out and "rows equal" in out
    assert "| B3 resident memory, 2 process(es)" in out


@pytest.mark.slow
@pytest.mark.skipif(not FIXTURE.is_file(), reason="needs ../shared/fixtures")
def test_map_quick():
    assert "| segment mAP, XD fixture" in _quick("bench_map.py")


@pytest.mark.slow  # a few model builds and two worker processes: minutes on 2 busy cores
def test_gpu_bench_quick_runs_on_cpu():
    # B6's code path (fp32/bf16 steps, packed workers) on tiny CPU shapes; figures need a GPU.
    rows = [line for line in _quick("bench_gpu.py").splitlines() if line.startswith("| B6 ")]
    assert len(rows) == 3, rows
    assert "fp32" in rows[0] and "bf16" in rows[0]
    assert all("steps/s in all" in r for r in rows[1:]), rows


@pytest.mark.slow  # a 50-trial study on a local Ray with 16 workers, PostgreSQL, mlflow server
def test_scale_quick_every_trial_once():
    """bench_scale.py --quick on the real search only (the stock-Ray and SQLite legs are the
    benchmark's comparisons): every trial once in Optuna and in MLflow, with every epoch."""
    sys.path.insert(0, str(REPO / "tests" / "tune"))
    from postgres import unavailable

    problem = unavailable()
    if problem and os.environ.get("CI") != "true":
        pytest.skip(f"no PostgreSQL: {problem}")
    bench = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "bench_scale.py"), "--quick", "--legs", "tune-pg"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        stdout, stderr = bench.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops its leg, Ray, mlflow server and PostgreSQL by PID
        stdout, stderr = bench.communicate(timeout=300)
        pytest.fail(f"bench_scale.py --quick ran past 1500 s: {stdout[-2000:]}")
    result = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "tune-pg: 50 trials" in result.stdout
    assert "exactly once: True (50 in Optuna, 50 MLflow runs)" in result.stdout
    assert "| B8 scale (50 trials" in result.stdout
