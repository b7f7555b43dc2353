"""Report artifacts from small in-memory Optuna studies, logged to a parent run on a real server;
the video selection on hand-made inputs; the best-model plots of a tiny run."""

from __future__ import annotations

import csv
import json

import numpy as np
import optuna
import yaml
from conftest import tiny_run_overrides, write_space, write_tiny_tree

from dsanet.config import load_config
from dsanet.trainer import RESULT, fit
from tune.report import pick_videos, write_best_trial_artifacts, write_study_artifacts
from tune.space import optuna_distributions

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


def small_study(spec, outcomes: list[tuple[optuna.trial.TrialState, float]]) -> optuna.Study:
    """Trials with given states and final values, two intermediate values each."""
    directions = ["maximize"] * len(spec.metric)
    study = optuna.create_study(directions=directions)
    distributions = optuna_distributions(spec)
    for i, (state, value) in enumerate(outcomes):
        params = {
            "optim.lr": (1e-5, 2e-5, 3e-5, 4e-5, 5e-5)[i],
            "model.num_prototypes": (4, 8)[i % 2],
        }
        complete = state == COMPLETE
        values = [value + 0.01 * k for k in range(len(directions))]
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                values=values if complete else None,
                intermediate_values={0: value - 0.1, 1: value},
                state=state,
            )
        )
    return study


def test_study_artifacts(tmp_path):
    spec = write_space(tmp_path, "report")
    study_dir = tmp_path / "study"
    outcomes = [(COMPLETE, 0.5), (PRUNED, 0.2), (COMPLETE, 0.7), (COMPLETE, 0.6), (PRUNED, 0.3)]
    folder = write_study_artifacts(small_study(spec, outcomes), spec, study_dir)
    assert folder == study_dir / "report" / "study"  # the MLflow view logs it to the parent
    expected = {"history.png", "parallel.png", "importance.png", "importance.json"}
    assert {p.name for p in folder.iterdir()} == expected | {"trials.csv", "best_config.yaml"}
    with (study_dir / "report" / "study" / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE", "PRUNED"]
    assert rows[1]["value_val_ap"] == "" and rows[2]["value_val_ap"] == "0.7"
    assert {r["intermediate_values"] for r in rows} == {"2"}
    assert rows[2]["optim.lr"] == "3e-05"
    best = yaml.safe_load((study_dir / "report" / "study" / "best_config.yaml").read_text())
    assert best["optim"]["lr"] == 3e-05 and best["model"]["num_prototypes"] == 4


def test_few_trials_and_several_objectives(tmp_path):
    spec = write_space(tmp_path, "report-few", metric=["val_ap", "val_auc"], mode=["max"] * 2)
    write_study_artifacts(small_study(spec, [(COMPLETE, 0.5), (PRUNED, 0.2)]), spec, tmp_path)
    files = {p.name for p in (tmp_path / "report" / "study").iterdir()}
    assert {"history_val_ap.png", "history_val_auc.png", "parallel_val_auc.png"} <= files
    assert not any(name.startswith("importance") for name in files)  # one complete trial


def test_pick_videos_mixes_anomalous_and_normal():
    normal = np.array([0, 0, 0, 1, 1, 1, 1, 0], dtype=bool)
    picked = pick_videos(normal, 4)
    assert len(picked) == 4 and normal[picked].sum() == 2
    assert pick_videos(np.array([1, 1, 0], dtype=bool), 4) == [0, 1, 2]  # all there are
    assert normal[pick_videos(normal, 5)].sum() == 2  # the odd one is anomalous


def test_best_model_artifacts_of_a_tiny_run(tmp_path):
    """The plots draw what dsanet computes: metrics.json repeats the run's own test numbers."""
    data = write_tiny_tree(tmp_path / "tiny")
    extra = ["train.epochs=1", "train.max_steps_per_epoch=1", "data.val_fraction=0.5"]
    cfg = load_config("demo", tiny_run_overrides(data, tmp_path / "run") + extra)
    run = fit(cfg).out_dir
    folder = write_best_trial_artifacts(run, tmp_path / "study")
    assert folder == tmp_path / "study" / "report" / "best"  # the MLflow view logs it
    expected = {"videos.png", "roc.png", "pr.png", "confusion.png", "confusion.json"}
    assert {p.name for p in folder.iterdir()} == expected | {"metrics.json"}
    shown = json.loads((folder / "metrics.json").read_text())
    assert list(shown) == ["model", "seed", "protocol", "frame_auc", "frame_ap", "class_acc"]
    seed = cfg.train.seed
    assert shown["model"] == f"validation-protocol run, seed {seed}" and shown["seed"] == seed
    test = json.loads((run / RESULT).read_text())["test"]
    assert (shown["frame_auc"], shown["frame_ap"]) == (test["auc"], test["ap"])
    table = json.loads((folder / "confusion.json").read_text())
    assert len(table["classes"]) == 6 and np.sum(table["matrix"]) == 1  # one anomalous video
    assert table["accuracy"] == shown["class_acc"]
