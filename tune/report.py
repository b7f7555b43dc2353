"""Report artifacts of a study's search: plots and tables under `<study_dir>/report/study/`,
which the MLflow view logs to the study's parent run under `study/`. (The test-set plots of the
best model are a run's, drawn by `dsanet.plots`.)
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from dsanet.config import ExperimentConfig
from dsanet.files import json_text, write_atomic
from tune import study_plots
from tune.layout import StudyFolder
from tune.space import SpaceSpec, sampled_values, trial_config

log = logging.getLogger(__name__)

Target = Callable[[FrozenTrial], float] | None
MIN_IMPORTANCE_TRIALS = 5  # complete trials; see importance_note


# ---------------------------------------------------------------------------- the search


def write_study_artifacts(study: optuna.Study, spec: SpaceSpec, study_dir: Path) -> Path:
    """Per objective: learning curves, history and parallel coordinates over every trial,
    pruned ones included (PNG, `tune.study_plots`), and parameter importance where there are
    enough complete trials (`importance_note`); every trial (trials.csv), the best config
    (best_config.yaml), and summary.json: trial counts, objectives, files, and `notes` saying
    why a plot is missing. All JSON is strict (no NaN/Infinity: null instead)."""
    folder = _folder(study_dir, "study")
    names = objective_names(study, spec)
    write_trials_csv(study, names, folder / "trials.csv")
    best = best_config(study, spec)
    notes = []
    if best is None:
        log.info("report: no complete trial yet, so no best_config.yaml")
        notes.append("no complete trial yet, so no best_config.yaml")
    else:
        write_atomic(folder / "best_config.yaml", best.to_yaml())
    for index, name in enumerate(names):
        suffix = "" if len(names) == 1 else f"_{name}"
        try:
            _objective_plots(study, spec, index, name, folder, suffix)
        except Exception as exc:  # a plot must not lose the rest of a finished search's report
            log.warning("report: plots for %s failed: %s", name, exc, exc_info=True)
            notes.append(f"plots{suffix}: failed: {exc}")
        note = importance_note(study, spec)
        if note:
            log.info("report: no parameter importance for %s: %s", name, note)
            notes.append(f"importance{suffix}: {note}")
        else:
            target = None if len(names) == 1 else (lambda t, i=index: t.values[i])
            _importance(study, target, name, folder / f"importance{suffix}")
    _write_summary(study, names, notes, folder)
    return folder


def _objective_plots(
    study: optuna.Study, spec: SpaceSpec, index: int, name: str, folder: Path, suffix: str
) -> None:
    maximize = study.directions[index] == optuna.study.StudyDirection.MAXIMIZE
    best = _best_on(study, index)  # with one objective, best_trial's (ties: the lower number)
    curves = study_plots.learning_curves(study, index)
    path = folder / f"curves{suffix}.png"
    study_plots.draw_curves(curves, best and best.number, name, _rungs(spec), path)
    points = study_plots.history_points(study, index)
    study_plots.draw_history(points, maximize, name, folder / f"history{suffix}.png")
    rows = study_plots.parallel_rows(study, spec, index)
    study_plots.draw_parallel(rows, spec.params, name, folder / f"parallel{suffix}.png")


def importance_note(study: optuna.Study, spec: SpaceSpec) -> str:
    """Why parameter importance is not computed, or "" when it is.

    fANOVA fits a random forest of the objective on the searched parameters and splits its
    variance between them. It needs at least MIN_IMPORTANCE_TRIALS complete trials and more
    complete trials than searched parameters: with fewer points than dimensions every split
    fits the points exactly, and with a handful of points the bootstrap resamples the same
    few trials, so the "importance" reflects which trials ASHA let finish rather than the
    parameters. Pruned trials do not count: their values come from earlier epochs.
    """
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    needed = max(MIN_IMPORTANCE_TRIALS, len(spec.params) + 1)
    if complete >= needed:
        return ""
    return (
        f"{complete} complete trials; fANOVA importance needs at least {needed} "
        f"({MIN_IMPORTANCE_TRIALS} and more than the {len(spec.params)} searched parameters)"
    )


def objective_names(study: optuna.Study, spec: SpaceSpec) -> list[str]:
    if len(spec.metric) == len(study.directions):
        return list(spec.metric)
    return [f"objective{i}" for i in range(len(study.directions))]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial (`best_of`), or None before one completes."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximize = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    return best_of(complete, maximize)


def best_of(complete: Iterable[FrozenTrial], maximize: Sequence[bool]) -> FrozenTrial | None:
    """The complete trial best on the first objective; ties go to the next objectives, then to
    the lower number. With several objectives it is on the Pareto front: no trial is better on
    the first, and none of those tied with it dominates it."""
    return max(complete, key=ranking(maximize), default=None)


def ranking(maximize: Sequence[bool]) -> Callable[[FrozenTrial], tuple]:
    """The key `best_of` maximises over complete trials: no two trials rank equal."""
    signs = [1.0 if m else -1.0 for m in maximize]

    def rank(t: FrozenTrial) -> tuple:
        return (*(s * v for s, v in zip(signs, t.values, strict=True)), -t.number)

    return rank


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


def _best_on(study: optuna.Study, index: int) -> FrozenTrial | None:
    """The complete trial best on objective `index` alone."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1.0 if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max(complete, key=lambda t: sign * t.values[index])


def _rungs(spec: SpaceSpec) -> list[float]:
    """ASHA's rung epochs, or none without ASHA (or where Ray cannot say)."""
    if spec.scheduler.kind == "none":
        return []
    try:
        from tune.scheduler import rung_epochs

        return rung_epochs(spec.scheduler)
    except Exception as exc:  # a plot's decoration must not fail the report
        log.warning("report: ASHA rungs not drawn: %s", exc)
        return []


def _write_summary(
    study: optuna.Study, names: Sequence[str], notes: list[str], folder: Path
) -> None:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    summary = {
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "objectives": list(names),
        "files": sorted(p.name for p in folder.iterdir() if p.name != "summary.json"),
        "notes": notes,
    }
    write_atomic(folder / "summary.json", json_text(summary))


def _importance(study: optuna.Study, target: Target, label: str, stem: Path) -> None:
    """fANOVA importance (Optuna's default), once `importance_note` allows it."""
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    try:
        importance = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as exc:
        log.warning("report: parameter importance for %s skipped: %s", label, exc)
        return
    if not importance:
        return
    write_atomic(stem.with_suffix(".json"), json_text(importance))
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
