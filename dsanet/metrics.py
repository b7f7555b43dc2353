"""Evaluation metrics (DESIGN §5): frame-level AUC/AP, segment mAP@IoU and the metric key names.

Segment mAP (`detection_map`, `detection_ap_by_class`) lives in `dsanet.detection` and is
offered here too: this module is the one place to import metrics from.

Metric keys returned by `evaluate_videos` (see `metric_keys`):
- `auc`, `ap`: frame-level ROC-AUC / AP of σ(ℓ1) (DESIGN §5.2), the reported and selected numbers;
- `map_iou10` … `map_iou50`: reference segment mAP at IoU 0.1 … 0.5 (DESIGN §5.3), as a fraction
  like the others: every key is in [0, 1] (the official code and `detection_map` print percent);
- `map_avg`: their mean (the paper's "AVG");
- `map_iou10_corrected` …, `map_avg_corrected`: the same with class 0 left out of the mean when no
  ground truth maps to it (UCF, Q-M2); equal to the reference values on XD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from dsanet.detection import (
    DEFAULT_IOU_THRESHOLDS,
    DetectionAP,
    ap_from_frames,
    as_scores,
    detection_ap_by_class,
    detection_map,
)

if TYPE_CHECKING:
    from dsanet.datasets import DatasetSpec

__all__ = [
    "AP",
    "AUC",
    "DEFAULT_IOU_THRESHOLDS",
    "MAP_AVG",
    "MAP_AVG_CORRECTED",
    "DetectionAP",
    "class_probabilities",
    "detection_ap_by_class",
    "detection_map",
    "evaluate_videos",
    "frame_auc_ap",
    "frame_scores",
    "map_key",
    "metric_keys",
    "snippets_to_frames",
]


AUC = "auc"
AP = "ap"
MAP_AVG = "map_avg"
MAP_AVG_CORRECTED = "map_avg_corrected"


def map_key(iou_threshold: float, corrected: bool = False) -> str:
    """Metric key of the mAP at one IoU threshold: 0.1 -> "map_iou10" (or "map_iou10_corrected")."""
    return f"map_iou{100 * iou_threshold:g}" + ("_corrected" if corrected else "")


def metric_keys(iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS) -> tuple[str, ...]:
    """Every key `evaluate_videos` returns, in order."""
    reference = [map_key(t) for t in iou_thresholds]
    corrected = [map_key(t, corrected=True) for t in iou_thresholds]
    return (AUC, AP, *reference, MAP_AVG, *corrected, MAP_AVG_CORRECTED)


def snippets_to_frames(scores: np.ndarray, frames_per_snippet: int) -> np.ndarray:
    """(T, ...) per-snippet values -> (T·frames_per_snippet, ...): each row repeated, in order."""
    if (
        isinstance(frames_per_snippet, bool)
        or int(frames_per_snippet) != frames_per_snippet
        or frames_per_snippet < 1
    ):
        raise ValueError(
            f"frames_per_snippet must be a positive integer, got "
            f"{frames_per_snippet!r}; take it from the dataset spec"
        )
    return np.repeat(np.asarray(scores), int(frames_per_snippet), axis=0)


def frame_auc_ap(
    scores: np.ndarray | Sequence[np.ndarray], gt_frames: np.ndarray
) -> tuple[float, float]:
    """ROC-AUC and AP of frame scores (one array, or per-video arrays concatenated) vs 0/1 gt."""
    if not isinstance(scores, np.ndarray):
        scores = np.concatenate([np.ravel(s) for s in scores])
    scores, gt_frames = np.ravel(scores), np.ravel(gt_frames)
    if scores.shape != gt_frames.shape:
        raise ValueError(
            f"frame_auc_ap: {scores.size} frame scores but {gt_frames.size} gt "
            f"frames; expand snippet scores with snippets_to_frames and keep the "
            f"test-list order"
        )
    positive, negative = gt_frames == 1, gt_frames == 0
    if not (positive.any() and negative.any() and (positive | negative).all()):
        raise ValueError(
            "frame_auc_ap: gt_frames must be 0/1 and hold both values; check the "
            "frame ground truth (DESIGN §1.6) and that it covers the test videos"
        )
    return (
        float(roc_auc_score(gt_frames, scores)),
        float(average_precision_score(gt_frames, scores)),
    )


def evaluate_videos(
    logits_det: Sequence[Any],
    logits_align: Sequence[Any],
    *,
    spec: DatasetSpec,
    temperature: float,
    gt_frames: np.ndarray,
    gt_segments: Sequence[Any],
    gt_labels: Sequence[Any],
    class_probs: Literal["hbm", "softmax"] = "hbm",
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
) -> dict[str, float]:
    """Test metrics (keys: `metric_keys`, all fractions in [0, 1]) from per-video snippet logits
    ℓ1 (T_v, 1), ℓ2 (T_v, C).

    Class probabilities are the belief-modulated ones at `temperature` (β, DESIGN §5.1), or with
    `class_probs="softmax"` VadCLIP's plain softmax(ℓ2) (temperature unused). Arrays or tensors.
    """
    import torch  # imported here so that the numpy metrics above load without torch

    if len(logits_det) != len(logits_align) or len(logits_det) == 0:
        raise ValueError(
            f"evaluate_videos: {len(logits_det)} ℓ1 and {len(logits_align)} ℓ2 "
            f"arrays; pass one of each per test video, in test-list order"
        )
    lengths = [len(d) for d in logits_det]
    if lengths != [len(a) for a in logits_align]:
        raise ValueError(
            "evaluate_videos: ℓ1 and ℓ2 differ in length for some video; both must "
            "be cut to the video's T_v snippets"
        )
    with torch.no_grad():
        det = _stacked_det(logits_det)  # (ΣT_v, 1)
        align = torch.cat([torch.as_tensor(a) for a in logits_align]).float()  # (ΣT_v, C)
        probs = class_probabilities(det, align, temperature, class_probs).cpu().numpy()
    fps = spec.frames_per_snippet
    auc, ap = frame_auc_ap(frame_scores(logits_det, fps), gt_frames)
    frames = snippets_to_frames(as_scores(probs, "the stacked videos", spec.num_classes), fps)
    offsets = np.concatenate([[0], np.cumsum(lengths)]) * fps
    per_class = ap_from_frames(
        frames, offsets, gt_segments, gt_labels, spec.class_labels, iou_thresholds
    )
    result = {AUC: auc, AP: ap}
    thresholds = per_class.iou_thresholds
    for corrected, percent in (
        (False, per_class.reference_map()),
        (True, per_class.corrected_map()),
    ):
        maps = [value / 100 for value in percent]  # one unit for every key: fractions
        for t, value in zip(thresholds, maps, strict=True):
            result[map_key(t, corrected)] = value
        result[MAP_AVG_CORRECTED if corrected else MAP_AVG] = float(np.mean(maps))
    return {key: result[key] for key in metric_keys(thresholds)}


def frame_scores(logits_det: Sequence[Any], frames_per_snippet: int) -> list[np.ndarray]:
    """Per video, ℓ1 (T_v, 1) -> σ(ℓ1) per frame (T_v·frames_per_snippet,), float32: the scores
    whose frame AUC/AP `evaluate_videos` reports, bit for bit. Arrays or tensors."""
    import torch

    with torch.no_grad():
        scores = torch.sigmoid(_stacked_det(logits_det))[:, 0].cpu().numpy()  # (ΣT_v,)
    frames = snippets_to_frames(scores, frames_per_snippet)
    ends = np.cumsum([len(d) for d in logits_det])[:-1] * int(frames_per_snippet)
    return np.split(frames, ends)


def _stacked_det(logits_det: Sequence[Any]) -> Any:
    """Per-video ℓ1 arrays or tensors -> one float32 tensor (ΣT_v, 1)."""
    import torch

    return torch.cat([torch.as_tensor(d).reshape(len(d), 1) for d in logits_det]).float()


def class_probabilities(det: Any, align: Any, temperature: float, class_probs: str) -> Any:
    """Snippet class probabilities (T, C) from ℓ1 (T, 1) and ℓ2 (T, C) tensors: the belief-
    modulated ones at `temperature` (class_probs "hbm"), or softmax(ℓ2) ("softmax")."""
    if class_probs == "softmax":
        return align.softmax(dim=-1)
    if class_probs == "hbm":
        from dsanet.model import belief_modulation  # lazy: metrics must not import the model

        return belief_modulation(det, align, temperature)
    raise ValueError(f"class_probs={class_probs!r}; allowed: 'hbm', 'softmax'")
