"""Report artifacts of the search from small in-memory Optuna studies (the best model's test
plots are `dsanet.plots`'s, tested in tests/test_plots.py)."""

from __future__ import annotations

import csv

import optuna
import yaml
from conftest import write_space

from tune.report import write_study_artifacts
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
    assert {r["epochs_reported"] for r in rows} == {"2"}
    assert rows[2]["optim.lr"] == "3e-05"
    best = yaml.safe_load((study_dir / "report" / "study" / "best_config.yaml").read_text())
    assert best["optim"]["lr"] == 3e-05 and best["model"]["num_prototypes"] == 4


def test_few_trials_and_several_objectives(tmp_path):
    spec = write_space(tmp_path, "report-few", metric=["val_ap", "val_auc"], mode=["max"] * 2)
    write_study_artifacts(small_study(spec, [(COMPLETE, 0.5), (PRUNED, 0.2)]), spec, tmp_path)
    files = {p.name for p in (tmp_path / "report" / "study").iterdir()}
    assert {"history_val_ap.png", "history_val_auc.png", "parallel_val_auc.png"} <= files
    assert not any(name.startswith("importance") for name in files)  # one complete trial
