"""Report artifacts from small in-memory Optuna studies, logged to a parent run on a real server;
the video selection on hand-made inputs; the best-model plots of a tiny run."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import optuna
import yaml
from conftest import write_space
from mlflow import MlflowClient

from dsanet.config import load_config
from dsanet.trainer import CONFIG, RESULT
from tune.report import pick_videos, write_best_trial_artifacts, write_study_artifacts
from tune.space import optuna_distributions
from tune.tracking import PARENT, MlflowTracker

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


def test_study_artifacts_are_logged_to_the_parent(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "report", mlflow_server.uri)
    study_dir = tmp_path / "study"
    tracker = MlflowTracker(study_dir, spec, mlflow_server.uri)
    parent = tracker.start_parent(resumed=False)
    outcomes = [(COMPLETE, 0.5), (PRUNED, 0.2), (COMPLETE, 0.7), (COMPLETE, 0.6), (PRUNED, 0.3)]
    write_study_artifacts(small_study(spec, outcomes), tracker, study_dir)
    tracker.close()

    logged = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(parent, "study")}
    expected = {"history.png", "parallel.png", "importance.png", "importance.json"}
    assert logged == {f"study/{name}" for name in expected | {"trials.csv", "best_config.yaml"}}
    with (study_dir / "report" / "study" / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE", "PRUNED"]
    assert rows[1]["value_val_ap"] == "" and rows[2]["value_val_ap"] == "0.7"
    assert {r["intermediate_values"] for r in rows} == {"2"}
    assert rows[2]["optim.lr"] == "3e-05"
    best = yaml.safe_load((study_dir / "report" / "study" / "best_config.yaml").read_text())
    assert best["optim"]["lr"] == 3e-05 and best["model"]["num_prototypes"] == 4


def test_few_trials_and_several_objectives(mlflow_server, tmp_path):
    spec = write_space(
        tmp_path, "report-few", mlflow_server.uri, metric=["val_ap", "val_auc"], mode=["max"] * 2
    )
    tracker = MlflowTracker(tmp_path / "study", spec, mlflow_server.uri)
    tracker.start_parent(resumed=False)
    write_study_artifacts(small_study(spec, [(COMPLETE, 0.5), (PRUNED, 0.2)]), tracker, tmp_path)
    tracker.close()
    files = {p.name for p in (tmp_path / "report" / "study").iterdir()}
    assert {"history_val_ap.png", "history_val_auc.png", "parallel_val_auc.png"} <= files
    assert not any(name.startswith("importance") for name in files)  # one complete trial


def test_pick_videos_mixes_anomalous_and_normal():
    normal = np.array([0, 0, 0, 1, 1, 1, 1, 0], dtype=bool)
    picked = pick_videos(normal, 4)
    assert len(picked) == 4 and normal[picked].sum() == 2
    assert pick_videos(np.array([1, 1, 0], dtype=bool), 4) == [0, 1, 2]  # all there are
    assert normal[pick_videos(normal, 5)].sum() == 2  # the odd one is anomalous


def test_best_model_artifacts_of_a_tiny_run(tiny_finished_run, tmp_path):
    """The plots draw what dsanet computes: metrics.json repeats the run's own test numbers."""
    run = tiny_finished_run  # a 1-epoch, 1-step fit on the tiny tree, validation protocol
    cfg = load_config(run / CONFIG)
    logged = []
    tracker = SimpleNamespace(log_artifact=lambda *args: logged.append(args))
    folder = write_best_trial_artifacts(run, tracker, tmp_path / "study")
    assert logged == [(PARENT, folder, "best")]
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
