"""Report artifacts of a study's search: plots and tables under `<study_dir>/report/study/`,
which the MLflow view logs to the study's parent run under `study/`. (The test-set plots of the
best model are a run's, drawn by `dsanet.plots`.)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from dsanet.config import ExperimentConfig
from dsanet.files import write_atomic
from tune.layout import StudyFolder
from tune.space import SpaceSpec, sampled_values, trial_config

log = logging.getLogger(__name__)

Target = Callable[[FrozenTrial], float] | None


# ---------------------------------------------------------------------------- the search


def write_study_artifacts(study: optuna.Study, spec: SpaceSpec, study_dir: Path) -> Path:
    """History, parameter importance and parallel coordinates per objective (PNG), every trial
    (trials.csv) and the best config (best_config.yaml), in `report/study/`."""
    folder = _folder(study_dir, "study")
    names = objective_names(study, spec)
    write_trials_csv(study, names, folder / "trials.csv")
    best = best_config(study, spec)
    if best is None:
        log.info("report: no complete trial yet, so no best_config.yaml")
    else:
        write_atomic(folder / "best_config.yaml", best.to_yaml())
    for index, name in enumerate(names):
        suffix = "" if len(names) == 1 else f"_{name}"
        target = None if len(names) == 1 else (lambda t, i=index: t.values[i])
        _optuna_plot("plot_optimization_history", study, target, name, folder / f"history{suffix}")
        _optuna_plot("plot_parallel_coordinate", study, target, name, folder / f"parallel{suffix}")
        _importance(study, target, name, folder / f"importance{suffix}")
    return folder


def objective_names(study: optuna.Study, spec: SpaceSpec) -> list[str]:
    if len(spec.metric) == len(study.directions):
        return list(spec.metric)
    return [f"objective{i}" for i in range(len(study.directions))]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial; with several objectives, the Pareto trial best on the first."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max(study.best_trials, key=lambda t: sign * t.values[0])


def best_config(study: optuna.Study, spec: SpaceSpec) -> ExperimentConfig | None:
    """The base config with the best trial's searched values, or None before any completes."""
    trial = best_trial(study)
    return None if trial is None else trial_config(spec, sampled_values(trial.params))


def write_trials_csv(study: optuna.Study, names: Sequence[str], path: Path) -> None:
    """One row per trial: state, values, epochs reported and the last one, params."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    attrs = sorted({k for t in trials for k in t.user_attrs})
    header = ["number", "state", *[f"value_{n}" for n in names]]
    header += ["epochs_reported", "last_step", "duration_s", *params]
    header += [f"attr.{a}" for a in attrs]
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(header)
    for t in trials:
        values = list(t.values) if t.values else [""] * len(names)
        steps = sorted(t.intermediate_values)
        duration = t.duration.total_seconds() if t.duration else ""
        row = [t.number, t.state.name, *values, len(steps), steps[-1] if steps else ""]
        row += [duration, *[t.params.get(p, "") for p in params]]
        writer.writerow(row + [t.user_attrs.get(a, "") for a in attrs])
    write_atomic(path, handle.getvalue().encode())


def _optuna_plot(name: str, study: optuna.Study, target: Target, label: str, stem: Path) -> None:
    import matplotlib.pyplot as plt  # optuna's matplotlib plots draw through pyplot
    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # axis cosmetics with one trial
        try:
            axes = getattr(plots, name)(study, target=target, target_name=label)
        except (ValueError, RuntimeError) as exc:
            log.warning("report: %s for %s skipped: %s", name, label, exc)
            return
    figure = np.ravel(axes)[0].figure
    figure.set_size_inches(10, 6)
    figure.savefig(stem.with_suffix(".png"), dpi=100, bbox_inches="tight")
    plt.close(figure)


def _importance(study: optuna.Study, target: Target, label: str, stem: Path) -> None:
    """fANOVA importance (Optuna's default); it needs two complete trials at least."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete < 2:
        log.info("report: parameter importance needs 2 complete trials, have %d", complete)
        return
    try:
        importance = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as exc:
        log.warning("report: parameter importance for %s skipped: %s", label, exc)
        return
    if not importance:
        return
    write_atomic(stem.with_suffix(".json"), json.dumps(importance, indent=1))
    figure = Figure(figsize=(8, 1.5 + 0.4 * len(importance)))
    ax = figure.subplots()
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {label} (fANOVA, sums to 1)")
    ax.set_title(f"Parameter importance over {complete} complete trials")
    figure.savefig(stem.with_suffix(".png"), dpi=100, bbox_inches="tight")


def _folder(study_dir: Path, part: str) -> Path:
    folder = StudyFolder(study_dir).report_dir(part)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
