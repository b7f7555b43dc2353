"""Report artifacts of a study: search plots and tables, and test-set plots of the best model.

Files are written under `<study_dir>/report/study/` and `<study_dir>/report/best/` (see
`tune/layout.py`), then logged to the study's parent MLflow run under `study/` and `best/`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from dsanet.config import ExperimentConfig
from dsanet.files import write_atomic
from dsanet.metrics import frame_auc_ap, frame_scores
from tune.layout import StudyFolder
from tune.space import SpaceSpec, sampled_values, trial_config
from tune.tracking import PARENT, MlflowTracker

log = logging.getLogger(__name__)

Target = Callable[[FrozenTrial], float] | None


# ---------------------------------------------------------------------------- the search


def write_study_artifacts(study: optuna.Study, tracker: MlflowTracker, study_dir: Path) -> None:
    """History, parameter importance and parallel coordinates per objective (PNG), every trial
    (trials.csv) and the best config (best_config.yaml); logged to the parent under `study/`."""
    folder = _folder(study_dir, "study")
    names = objective_names(study, tracker.spec)
    write_trials_csv(study, names, folder / "trials.csv")
    best = best_config(study, tracker.spec)
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
    tracker.log_artifact(PARENT, folder, "study")


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
    """One row per trial: state, values, intermediate values (count, last step), params."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    attrs = sorted({k for t in trials for k in t.user_attrs})
    header = ["number", "state", *[f"value_{n}" for n in names]]
    header += ["intermediate_values", "last_step", "duration_s", *params]
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


# ---------------------------------------------------------------------------- the best model


def write_best_trial_artifacts(
    model_dir: Path, tracker: MlflowTracker, study_dir: Path, num_videos: int = 4
) -> Path:
    """Test-set plots of the model saved in `model_dir` (a fit's run folder), under `best/`.

    videos.png: σ(ℓ1) per frame against the ground truth for `num_videos` test videos, about
    half anomalous and half normal, spread over the test list. roc.png / pr.png: frame-level
    curves. confusion.png/.json: video-level class confusion over the anomalous test videos
    (`dsanet.evaluate.class_confusion`).
    """
    from dsanet.evaluate import class_confusion, video_class_predictions
    from dsanet.runs import load_run

    folder = _folder(study_dir, "best")
    run = load_run(model_dir)
    cfg, test, shown = run.cfg, run.bundle.test, model_label(run.cfg)
    predictions = run.predict_test()
    scores = frame_scores([det for det, _ in predictions], run.bundle.spec.frames_per_snippet)
    picked = pick_videos(test.videos.targets[:, 0] == 1, num_videos)
    _plot_videos(scores, test, picked, folder, shown)
    metrics = _plot_curves(np.concatenate(scores), test.gt_frames, folder, shown)
    guesses = video_class_predictions(predictions, cfg.eval, cfg.loss.topk_divisor)
    matrix = class_confusion(guesses, test.videos.targets)
    metrics["class_acc"] = _plot_confusion(matrix, run.bundle.spec, folder, shown)
    _compare_with_result(metrics, Path(model_dir))
    described = {"model": shown, "seed": cfg.train.seed, "protocol": cfg.data.protocol}
    write_atomic(folder / "metrics.json", json.dumps({**described, **metrics}, indent=1))
    tracker.log_artifact(PARENT, folder, "best")
    return folder


def model_label(cfg: ExperimentConfig) -> str:
    """Which model a best-model plot shows: a final-stage seed's retrain, or a run's."""
    if cfg.data.protocol == "final":
        return f"final-stage retrain, seed {cfg.train.seed}"
    return f"{cfg.data.protocol}-protocol run, seed {cfg.train.seed}"


def pick_videos(normal: np.ndarray, count: int) -> list[int]:
    """`count` test-list indices: about half anomalous, half normal, spread evenly."""
    anomalous, normal_ids = np.flatnonzero(~normal), np.flatnonzero(normal)
    num_anomalous = min(len(anomalous), max((count + 1) // 2, count - len(normal_ids)))
    num_normal = min(len(normal_ids), count - num_anomalous)

    def spread(ids: np.ndarray, n: int) -> list[int]:
        return [int(ids[i]) for i in np.linspace(0, len(ids) - 1, n).round().astype(int)]

    return sorted(set(spread(anomalous, num_anomalous) + spread(normal_ids, num_normal)))


def _plot_videos(
    scores: Sequence[np.ndarray], test: Any, picked: list[int], folder: Path, shown: str
) -> None:
    """σ(ℓ1) per frame (`scores`, one array per test video) against the frame ground truth."""
    gt = np.split(test.gt_frames, np.cumsum([len(s) for s in scores])[:-1])
    figure = Figure(figsize=(10, 1.2 + 2.0 * len(picked)), layout="constrained")
    axes = figure.subplots(len(picked), 1, squeeze=False)[:, 0]
    for ax, index in zip(axes, picked, strict=True):
        frames = np.arange(len(scores[index]))
        ax.fill_between(
            frames,
            0,
            1,
            where=gt[index] > 0,
            color="tab:red",
            alpha=0.25,
            step="mid",
            label="ground truth",
        )
        ax.plot(frames, scores[index], color="tab:blue", linewidth=1, label="σ(ℓ1)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{test.videos.videos[index]} ({test.videos.labels[index]})", fontsize=9)
        ax.set_ylabel("score")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("frame")
    figure.suptitle(f"Test videos: σ(ℓ1) of the {shown}", fontsize=10)
    figure.savefig(folder / "videos.png", dpi=100, bbox_inches="tight")


def _plot_curves(scores: np.ndarray, gt: np.ndarray, folder: Path, shown: str) -> dict[str, float]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(gt, scores)
    precision, recall, _ = precision_recall_curve(gt, scores)
    frame_auc, frame_ap = frame_auc_ap(scores, gt)
    result = {"frame_auc": frame_auc, "frame_ap": frame_ap}
    for name, x, y, xlabel, ylabel, score in (
        ("roc", fpr, tpr, "false positive rate", "true positive rate", "AUC"),
        ("pr", recall, precision, "recall", "precision", "AP"),
    ):
        figure = Figure(figsize=(5, 5))
        ax = figure.subplots()
        value = result["frame_auc" if score == "AUC" else "frame_ap"]
        ax.plot(x, y, linewidth=1.5, label=f"{score} = {value:.4f}")
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        ax.set_title(f"Frame-level {name.upper()} on the test set\n{shown}", fontsize=10)
        ax.legend(loc="lower right" if name == "roc" else "lower left")
        figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
    return result


def _plot_confusion(matrix: np.ndarray, spec: Any, folder: Path, shown: str) -> float:
    classes = [f"{c}: {p[0]}"[:24] for c, p in zip(spec.class_labels, spec.prompts, strict=True)]
    classes = classes[1:]  # the anomaly classes
    total = int(matrix.sum())
    accuracy = float(np.trace(matrix) / total) if total else float("nan")
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(1.5 + 0.8 * len(classes), 1.2 + 0.8 * len(classes)))
    ax = figure.subplots()
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if rows[i, j] > 0.5 else "black",
        )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(
        f"Video-level classes, anomalous test videos (accuracy {accuracy:.3f})\n{shown}",
        fontsize=10,
    )
    figure.savefig(folder / "confusion.png", dpi=100, bbox_inches="tight")
    table = {"classes": list(classes), "matrix": matrix.tolist(), "accuracy": accuracy}
    write_atomic(folder / "confusion.json", json.dumps(table, indent=1))
    return accuracy


def _compare_with_result(metrics: dict[str, float], model_dir: Path) -> None:
    """Warn when the plots do not show the model the run evaluated (e.g. a changed data set)."""
    result = model_dir / "result.json"
    if not result.is_file():
        return
    test = json.loads(result.read_text()).get("test", {})
    if "auc" in test and abs(test["auc"] - metrics["frame_auc"]) > 1e-4:
        log.warning(
            "report: test AUC recomputed from %s is %.4f, its result.json says %.4f; the plots "
            "may not show the evaluated model",
            model_dir,
            metrics["frame_auc"],
            test["auc"],
        )


def _folder(study_dir: Path, part: str) -> Path:
    folder = StudyFolder(study_dir).report_dir(part)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
