"""Smoke tests of the search benchmarks (B4, B7): each `--quick` mode runs and prints its row.

No timing is asserted; the studies run on a local Ray of their own, in a scratch folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = ("random", "stock", "ours", "gp", "promotion")  # bench_search_quality.METHODS


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
    # the promotion variant: the space copy with another scheduler, and paused trials' attempts
    out = run_quick("bench_search.py", tmp_path, "--scheduler", "asha-promotion")
    assert "share of slot time:" in out
    assert "| B4 slot utilisation (4 tiny trials, asha-promotion, 2 slots) |" in out


@pytest.mark.slow
def test_search_quality_quick_runs_every_method_on_the_same_budget(tmp_path):
    png, figures = tmp_path / "curves.png", tmp_path / "b7.json"
    out = run_quick("bench_search_quality.py", tmp_path, "--plot", str(png), "--json", str(figures))
    assert "| B7 search quality (xd-mini x0.5, tiny DSANet, budget 4 epochs, max_t 2," in out
    assert png.is_file() and png.stat().st_size > 0
    studies = json.loads(figures.read_text())["studies"]
    assert sorted(studies) == sorted(f"{m}/0" for m in METHODS)
    # random + FIFO: every trial runs max_t (2 trials of 2 epochs: the budget)
    assert studies["random/0"]["trials"] == 2 and len(studies["random/0"]["aps"]) == 4
    assert len(studies["random/0"]["full_trials"]) == 2
    for method in ("stock", "ours", "gp", "promotion"):  # ASHA: 4 trials, each 1 or 2 epochs
        study = studies[f"{method}/0"]
        assert study["trials"] == 4 and 4 <= len(study["aps"]) <= 8, (method, study)
        assert 0.0 <= study["test"]["auc"] <= 1.0 and 0.0 < study["utilisation"] <= 1.0
    assert "rank agreement with the last epoch, 2 random-search trials" in out


@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_search_quality

    return bench_search_quality


def test_best_so_far_is_a_running_maximum_cut_or_held_at_the_budget(quality):
    aps = [0.5, float("nan"), 0.7, 0.6, 0.9]
    assert quality.best_so_far(aps, 4) == [0.5, 0.5, 0.7, 0.7]  # a NaN epoch counts, adds 0
    assert quality.best_so_far(aps[:3], 5) == [0.5, 0.5, 0.7, 0.7, 0.7]  # study ended early
    assert quality.epochs_to_reach([0.5, 0.5, 0.7, 0.7], 0.7) == 3
    assert quality.epochs_to_reach([0.5, 0.6], 0.7) is None


def test_rank_agreement_equals_the_textbook_formulas(quality):
    rng = np.random.default_rng(3)
    trials = rng.random((9, 4))  # 9 trials, 4 epochs, no ties
    got = quality.rank_agreement(trials.tolist())
    n, last = len(trials), trials[:, -1]
    rank_last = np.argsort(np.argsort(last))
    top_last = {i for i in range(n) if rank_last[i] >= n - n // 2}
    for k in (1, 2, 3):
        rank_k = np.argsort(np.argsort(trials[:, k - 1]))
        rho = 1 - 6 * np.sum((rank_k - rank_last) ** 2) / (n * (n * n - 1))
        top_k = {i for i in range(n) if rank_k[i] >= n - n // 2}
        assert got[k]["spearman"] == pytest.approx(rho)
        assert got[k]["top_half_kept"] == len(top_k & top_last) / (n // 2)


def test_summary_measures_each_method_against_stocks_final_best(quality):
    size = quality.Size(scale=1, max_t=2, steps=1, reduction_factor=2, random_trials=2,
                        asha_trials=3, startup_trials=1, gp_startup=1)  # fmt: skip

    def study(aps, trials=3):
        return {"aps": aps, "trials": trials, "test": {"auc": 0.6, "ap": 0.5},
                "utilisation": 0.9, "full_trials": [[0.1, 0.2], [0.3, 0.1]]}  # fmt: skip

    results = {
        "stock/0": study([0.2, 0.4, 0.5, 0.5]), "stock/1": study([0.6, 0.6]),
        "ours/0": study([0.5, 0.1, 0.1, 0.1]), "ours/1": study([0.1, 0.2, 0.3, 0.4]),
    }  # fmt: skip
    curves, summary = quality.summarise(results, ["stock", "ours"], 2, size)
    assert curves["stock"][1] == [0.6, 0.6, 0.6, 0.6]  # held past its last epoch
    ours = summary["methods"]["ours"]
    assert ours["epochs_to_stock_final"] == [1, None]  # seed 1 never reaches 0.6
    assert ours["median_share_to_stock_final"] == pytest.approx((1 + 5) / 2 / 4)
    assert summary["goal_met"] is False and "rank_agreement" not in summary
