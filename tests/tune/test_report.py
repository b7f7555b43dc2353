"""Report artifacts of the search from small in-memory Optuna studies (the best model's test
plots are `dsanet.plots`'s, tested in tests/test_plots.py)."""

from __future__ import annotations

import csv
import json
import math

import optuna
import pytest
import yaml
from conftest import write_space

from tune import study_plots
from tune.report import write_study_artifacts
from tune.space import optuna_distributions

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
FAIL = optuna.trial.TrialState.FAIL
LRS = (1e-5, 2e-5, 3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 8e-5, 9e-5, 1e-4)


def small_study(spec, outcomes: list[tuple[optuna.trial.TrialState, float]]) -> optuna.Study:
    """Trials with given states and final values. As the searcher records them: complete
    trials two epochs, others one (ASHA's first rung); the `epochs` user attribute with every
    objective, and, with one objective, Optuna's intermediate values too."""
    directions = ["maximize"] * len(spec.metric)
    study = optuna.create_study(directions=directions)
    distributions = optuna_distributions(spec)
    for i, (state, value) in enumerate(outcomes):
        params = {"optim.lr": LRS[i], "model.num_prototypes": (4, 8)[i % 2]}
        complete = state == COMPLETE
        values = [value + 0.01 * k for k in range(len(directions))]
        per_epoch = {1: [v - 0.1 for v in values], 2: values}
        if not complete:
            per_epoch = {1: values}
        epochs = {str(s): {"values": v, "select": v[0], "time": 1.0} for s, v in per_epoch.items()}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                values=values if complete else None,
                intermediate_values={s: v[0] for s, v in per_epoch.items()}
                if len(directions) == 1
                else None,
                user_attrs={"epochs": epochs},
                state=state,
            )
        )
    return study


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_study_artifacts(tmp_path):
    spec = write_space(tmp_path, "report")
    study_dir = tmp_path / "study"
    outcomes = [(COMPLETE, 0.5), (PRUNED, 0.2), (COMPLETE, 0.7), (COMPLETE, 0.6), (PRUNED, 0.3)]
    outcomes += [(COMPLETE, 0.4), (COMPLETE, 0.65)]  # 5 complete: enough for importance
    folder = write_study_artifacts(small_study(spec, outcomes), spec, study_dir)
    assert folder == study_dir / "report" / "study"  # the MLflow view logs it to the parent
    expected = {"curves.png", "history.png", "parallel.png", "importance.png", "importance.json"}
    expected |= {"trials.csv", "best_config.yaml", "summary.json"}
    assert {p.name for p in folder.iterdir()} == expected
    with (folder / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["state"] for r in rows][:5] == [
        "COMPLETE",
        "PRUNED",
        "COMPLETE",
        "COMPLETE",
        "PRUNED",
    ]
    assert rows[1]["value_val_ap"] == "" and rows[2]["value_val_ap"] == "0.7"
    assert [r["epochs_reported"] for r in rows][:3] == ["2", "1", "2"]
    assert rows[2]["optim.lr"] == "3e-05"
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best["optim"]["lr"] == 3e-05 and best["model"]["num_prototypes"] == 4
    summary = strict_json((folder / "summary.json").read_text())
    assert summary["trials"] == {"complete": 5, "pruned": 2} and summary["notes"] == []
    assert set(strict_json((folder / "importance.json").read_text())) == set(optuna_params(spec))


def optuna_params(spec):
    return [p.name for p in spec.params]


def test_few_trials_and_several_objectives(tmp_path):
    spec = write_space(tmp_path, "report-few", metric=["val_ap", "val_auc"], mode=["max"] * 2)
    write_study_artifacts(small_study(spec, [(COMPLETE, 0.5), (PRUNED, 0.2)]), spec, tmp_path)
    folder = tmp_path / "report" / "study"
    files = {p.name for p in folder.iterdir()}
    plots = {
        f"{kind}_{name}.png" for kind in ("curves", "history", "parallel") for name in spec.metric
    }
    assert plots <= files
    assert not any(name.startswith("importance") for name in files)  # one complete trial
    notes = strict_json((folder / "summary.json").read_text())["notes"]
    assert [n.split(":")[0] for n in notes] == ["importance_val_ap", "importance_val_auc"]
    assert "1 complete trials" in notes[0] and "at least 5" in notes[0]


def test_importance_threshold(tmp_path):
    spec = write_space(tmp_path, "report-threshold")
    four = [(COMPLETE, 0.1 * k) for k in range(1, 5)] + [(PRUNED, 0.2)] * 4
    write_study_artifacts(small_study(spec, four), spec, tmp_path)  # 4 complete, 8 trials
    folder = tmp_path / "report" / "study"
    assert not (folder / "importance.png").exists() and not (folder / "importance.json").exists()
    assert "4 complete trials" in strict_json((folder / "summary.json").read_text())["notes"][0]


def test_curves_and_history_include_pruned_and_failed(tmp_path):
    spec = write_space(tmp_path, "report-series")
    outcomes = [(COMPLETE, 0.5), (PRUNED, 0.2), (FAIL, 0.1), (COMPLETE, 0.7), (PRUNED, 0.9)]
    study = small_study(spec, outcomes)
    curves = study_plots.learning_curves(study, 0)
    assert [c.outcome for c in curves.values()] == [
        "complete", "pruned", "failed", "complete", "pruned"
    ]  # fmt: skip
    assert curves[0].epochs == [1, 2] and curves[0].values == pytest.approx([0.4, 0.5])
    assert curves[1].epochs == [1] and curves[1].values == pytest.approx([0.2])
    points = study_plots.history_points(study, 0)
    assert [(p.number, p.outcome) for p in points] == [
        (0, "complete"), (1, "pruned"), (3, "complete"), (4, "pruned")
    ]  # fmt: skip
    assert points[3].value == pytest.approx(0.9)  # a pruned trial at its last reported value
    assert study_plots.best_so_far(points, maximize=True) == ([0, 3], [0.5, 0.7])
    assert study_plots.best_so_far(points, maximize=False) == ([0, 3], [0.5, 0.5])


def test_parallel_rows_normalise_log_categorical_and_absent(tmp_path):
    spec = write_space(tmp_path, "report-parallel")
    study = small_study(spec, [(COMPLETE, 0.5), (PRUNED, 0.2)])
    rows = study_plots.parallel_rows(study, spec, 0)
    lr, prototypes = spec.params[0], spec.params[1]
    assert [p.name for p in spec.params] == ["optim.lr", "model.num_prototypes"]
    assert rows[0].coords[0] == pytest.approx(0.0)  # 1e-5, the low end of a log axis
    assert study_plots.normalise(lr, 1e-4) == pytest.approx(0.5)  # half way on log10
    assert [r.coords[1] for r in rows] == [0.0, 1.0]  # categorical 4, 8
    assert study_plots.normalise(prototypes, 8) == 1.0
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": 1e-3},
            distributions={"optim.lr": optuna_distributions(spec)["optim.lr"]},
            values=[0.3],
            state=COMPLETE,
        )
    )
    last = study_plots.parallel_rows(study, spec, 0)[-1]
    assert last.coords[0] == pytest.approx(1.0) and math.isnan(last.coords[1])


def test_report_json_is_strict_with_nan_values(tmp_path):
    spec = write_space(tmp_path, "report-nan")
    outcomes = [(COMPLETE, 0.1 * k) for k in range(1, 7)] + [(PRUNED, math.nan)]
    write_study_artifacts(small_study(spec, outcomes), spec, tmp_path)
    folder = tmp_path / "report" / "study"
    texts = [p.read_text() for p in folder.glob("*.json")]
    assert len(texts) == 2  # importance.json and summary.json
    for text in texts:
        strict_json(text)


def test_empty_and_running_study(tmp_path):
    spec = write_space(tmp_path, "report-empty")
    study = optuna.create_study(direction="maximize")
    study.ask()  # one running trial, nothing reported
    folder = write_study_artifacts(study, spec, tmp_path)
    files = {p.name for p in folder.iterdir()}
    assert {"curves.png", "history.png", "parallel.png", "trials.csv", "summary.json"} <= files
    summary = strict_json((folder / "summary.json").read_text())
    assert summary["trials"] == {"running": 1}
    assert not any(n.startswith("plots") for n in summary["notes"])  # no plot failed
