"""Test-set plots of a trained model: what a run's scores look like against the ground truth.

`write_test_plots(run, folder)` draws, for a run loaded by `dsanet.runs.load_run`:
- videos.png: σ(ℓ1) per frame against the frame ground truth for a few test videos;
- roc.png, pr.png: frame-level ROC and precision-recall curves with AUC and AP;
- confusion.png/.json: video-level class confusion over the anomalous test videos;
- metrics.json: which model (seed, protocol) and the numbers the plots show.
The numbers come from `dsanet.evaluate` and `dsanet.metrics`; this module only draws. Used by
`dsanet evaluate --plots DIR` and by the search's final stage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dsanet.config import ExperimentConfig
from dsanet.evaluate import class_confusion, video_class_predictions
from dsanet.metrics import frame_auc_ap, frame_scores
from dsanet.runs import LoadedRun

log = logging.getLogger(__name__)


def write_test_plots(run: LoadedRun, folder: Path, num_videos: int = 4) -> Path:
    """Test-set plots of a loaded run (`dsanet.runs.load_run`, split test) in `folder`.

    videos.png: σ(ℓ1) per frame against the ground truth for `num_videos` test videos, about
    half anomalous and half normal, spread over the test list. roc.png / pr.png: frame-level
    curves. confusion.png/.json: video-level class confusion over the anomalous test videos
    (`dsanet.evaluate.class_confusion`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    cfg, test, shown = run.cfg, run.bundle.test, model_label(run.cfg)
    predictions = run.predict_test()
    scores = frame_scores([det for det, _ in predictions], run.bundle.spec.frames_per_snippet)
    picked = pick_videos(test.videos.targets[:, 0] == 1, num_videos)
    _plot_videos(scores, test, picked, folder, shown)
    metrics = _plot_curves(np.concatenate(scores), test.gt_frames, folder, shown)
    guesses = video_class_predictions(predictions, cfg.eval, cfg.loss.topk_divisor)
    matrix = class_confusion(guesses, test.videos.targets)
    metrics["class_acc"] = _plot_confusion(matrix, run.bundle.spec, folder, shown)
    _compare_with_result(metrics, run.checkpoint.parent)
    described = {"model": shown, "seed": cfg.train.seed, "protocol": cfg.data.protocol}
    (folder / "metrics.json").write_text(json.dumps({**described, **metrics}, indent=1))
    return folder


def model_label(cfg: ExperimentConfig) -> str:
    """Which model the plots show: a search's final-stage retrain of one seed, or a run."""
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
    (folder / "confusion.json").write_text(json.dumps(table, indent=1))
    return accuracy


def _compare_with_result(metrics: dict[str, float], model_dir: Path) -> None:
    """Warn when the plots do not show the model the run evaluated (e.g. a changed data set)."""
    result = model_dir / "result.json"
    if not result.is_file():
        return
    test = json.loads(result.read_text()).get("test", {})
    if "auc" in test and abs(test["auc"] - metrics["frame_auc"]) > 1e-4:
        log.warning(
            "plots: test AUC recomputed from %s is %.4f, its result.json says %.4f; the plots "
            "may not show the evaluated model",
            model_dir,
            metrics["frame_auc"],
            test["auc"],
        )
