"""Test-set plots of a run (`dsanet.plots`), directly and through `dsanet evaluate --plots`.

The plots draw what dsanet computes: metrics.json repeats the run's own test numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error

from dsanet.cli import main
from dsanet.plots import pick_videos, write_test_plots
from dsanet.runs import load_run
from dsanet.trainer import RESULT

PLOTS = {"videos.png", "roc.png", "pr.png", "confusion.png", "confusion.json", "metrics.json"}


@pytest.fixture
def tiny_run(tiny_finished_run) -> Path:
    """tests/conftest.py's finished tiny run (validation protocol, one anomalous test video)."""
    return tiny_finished_run


def test_pick_videos_mixes_anomalous_and_normal():
    normal = np.array([0, 0, 0, 1, 1, 1, 1, 0], dtype=bool)
    picked = pick_videos(normal, 4)
    assert len(picked) == 4 and normal[picked].sum() == 2
    assert pick_videos(np.array([1, 1, 0], dtype=bool), 4) == [0, 1, 2]  # all there are
    assert normal[pick_videos(normal, 5)].sum() == 2  # the odd one is anomalous


def test_plots_of_a_tiny_run(tiny_run, tmp_path):
    run = load_run(tiny_run)
    folder = write_test_plots(run, tmp_path / "plots")
    assert {p.name for p in folder.iterdir()} == PLOTS
    shown = json.loads((folder / "metrics.json").read_text())
    assert list(shown) == ["model", "seed", "protocol", "frame_auc", "frame_ap", "class_acc"]
    seed = run.cfg.train.seed
    assert shown["model"] == f"validation-protocol run, seed {seed}" and shown["seed"] == seed
    test = json.loads((tiny_run / RESULT).read_text())["test"]
    assert (shown["frame_auc"], shown["frame_ap"]) == (test["auc"], test["ap"])
    table = json.loads((folder / "confusion.json").read_text())
    assert len(table["classes"]) == 6 and np.sum(table["matrix"]) == 1  # one anomalous video
    assert table["accuracy"] == shown["class_acc"]


@pytest.mark.slow  # a second dsanet subprocess (test_trainer's CLI smoke is the default suite's)
def test_evaluate_plots_from_the_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["evaluate", "--checkpoint", str(tiny_run), "--plots", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"plots in {out}" in printed
    assert {p.name for p in out.iterdir()} == PLOTS
    metrics = json.loads(printed[: printed.rindex("}") + 1])
    assert json.loads((out / "metrics.json").read_text())["frame_auc"] == metrics["auc"]
    status = main(["evaluate", "--checkpoint", str(tiny_run), "--split", "val", "--plots", "x"])
    one_error(capsys, status, "--plots draws the test set")
    assert not Path("x").exists()
