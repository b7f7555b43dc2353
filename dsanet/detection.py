"""Segment mAP@IoU (DESIGN §5.3) exactly as the reference `{xd,ucf}_detectionMAP.py` computes it,
quirks included (DESIGN §9: Q-M2..Q-M5; Q-M1's unused `excludeNormal` is not offered), but
vectorised: about 95 s for the XD test set in the reference, well under 1 s here.

Exactly tied proposal scores are ordered by numpy's default argsort, as in the reference, and that
order depends on the CPU's sort kernels (AVX2 vs AVX-512), so, like the reference, the mAP can
differ across machines by ~1e-6 percent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)

# Constants of the reference mAP definition itself (not dataset facts): a frame joins a proposal
# when its score exceeds max - 0.6·(max - min) of its video's column; a proposal scores its peak
# plus 0.7·κ, where κ is the mean of the top ⌊F/16⌋ frame values of the column (the top 1/16);
# runs shorter than 2 frames are dropped.
PROPOSAL_DROP = 0.6
CONFIDENCE_WEIGHT = 0.7
CONFIDENCE_TOP_DIVISOR = 16
MIN_PROPOSAL_FRAMES = 2


@dataclass(frozen=True)
class DetectionAP:
    """Per-class segment AP; `ap` is (len(iou_thresholds), C), fractions in [0, 1]."""

    class_names: tuple[str, ...]
    iou_thresholds: tuple[float, ...]
    ap: np.ndarray
    num_gt: np.ndarray  # (C,) ground-truth segments per class
    num_proposals: np.ndarray  # (C,) proposals per class, over all videos

    def reference_map(self) -> list[float]:
        """Percent mAP per threshold exactly as the reference: mean over all C classes (Q-M2)."""
        return self._mean(np.ones(len(self.class_names), dtype=bool))

    def corrected_map(self) -> list[float]:
        """As `reference_map`, but class 0 is left out when no ground truth maps to it (Q-M2)."""
        scored = np.ones(len(self.class_names), dtype=bool)
        scored[0] = self.num_gt[0] > 0
        return self._mean(scored)

    def _mean(self, scored: np.ndarray) -> list[float]:
        if (self.num_proposals[scored] == 0).any():
            return [0.0] * len(self.iou_thresholds)  # Q-M3: the reference returns 0 for the θ
        return [float(100 * np.mean(row[scored])) for row in self.ap]


def detection_map(
    predictions: Sequence[np.ndarray],
    gt_segments: Sequence[Any],
    gt_labels: Sequence[Any],
    class_names: Sequence[str],
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
) -> list[float]:
    """Reference segment mAP in percent, one value per IoU threshold (DESIGN §5.3).

    `predictions`: per test video, frame-level class scores (F_v, C) in `class_names` order;
    `gt_segments` / `gt_labels`: as loaded from the shipped `gt_segment*.npy` / `gt_label*.npy`.
    """
    return detection_ap_by_class(
        predictions, gt_segments, gt_labels, class_names, iou_thresholds
    ).reference_map()


def detection_ap_by_class(
    predictions: Sequence[np.ndarray],
    gt_segments: Sequence[Any],
    gt_labels: Sequence[Any],
    class_names: Sequence[str],
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
) -> DetectionAP:
    """Per-class AP behind `detection_map`; same arguments. Use it for the Q-M2-corrected mean."""
    if len(predictions) == 0:
        raise ValueError("detection_map: no predictions; pass one (F_v, C) array per test video")
    frames = np.concatenate(
        [as_scores(p, f"video {i}", len(class_names)) for i, p in enumerate(predictions)]
    )
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in predictions])])
    return ap_from_frames(frames, offsets, gt_segments, gt_labels, class_names, iou_thresholds)


def as_scores(array: Any, where: str, num_classes: int) -> np.ndarray:
    """A (F, C) float array; other float widths and integers become float64."""
    array = np.asarray(array)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != num_classes or array.shape[0] == 0:
        raise ValueError(
            f"predictions for {where}: shape {array.shape}, expected "
            f"(frames > 0, {num_classes}) with columns in class_names order"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"predictions for {where} hold NaN or inf; check the model outputs")
    return np.ascontiguousarray(array)


def ap_from_frames(
    frames: np.ndarray,
    offsets: np.ndarray,
    gt_segments: Sequence[Any],
    gt_labels: Sequence[Any],
    class_names: Sequence[str],
    iou_thresholds: Sequence[float],
) -> DetectionAP:
    """`detection_ap_by_class` on stacked frames (ΣF_v, C); video v is rows offsets[v:v+2]."""
    thresholds = tuple(float(t) for t in iou_thresholds)
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"iou_thresholds={list(iou_thresholds)}: give values in (0, 1]")
    num_videos, num_classes = len(offsets) - 1, len(class_names)
    gt_video, gt_bounds, gt_class = _gt_table(gt_segments, gt_labels, class_names, num_videos)
    confidence = _video_confidence(frames, offsets)  # (V, C) κ
    ap = np.zeros((len(thresholds), num_classes))
    num_proposals = np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        video, bounds = _class_proposals(frames[:, c], offsets, confidence[:, c])
        num_proposals[c] = len(video)
        mine = gt_class == c
        pairs = _pair_iou(video, bounds, gt_video[mine], gt_bounds[mine], num_videos)
        for k, theta in enumerate(thresholds):
            hits = _greedy_hits(video, pairs, int(mine.sum()), theta)
            ap[k, c] = _average_precision(hits, int(mine.sum()))
    if (num_proposals == 0).any():
        missing = [class_names[c] for c in np.flatnonzero(num_proposals == 0)]
        logger.warning(
            "segment mAP: no video yields a proposal for class(es) %s, so the "
            "reference mAP is 0 at every IoU threshold (quirk Q-M3)",
            missing,
        )
    num_gt = np.bincount(gt_class[gt_class >= 0], minlength=num_classes)
    return DetectionAP(tuple(class_names), thresholds, ap, num_gt, num_proposals)


def _gt_table(
    gt_segments: Sequence[Any],
    gt_labels: Sequence[Any],
    class_names: Sequence[str],
    num_videos: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened gt in the reference's order: video (G,), int [start, end) (G, 2), class (G,).

    A label outside `class_names` gets class -1 and never matches (UCF's 'A', Q-M2).
    """
    if len(gt_segments) != num_videos or len(gt_labels) != num_videos:
        raise ValueError(
            f"{len(gt_segments)} gt segment lists and {len(gt_labels)} label lists "
            f"for {num_videos} predicted videos; they must follow the test list"
        )
    index = {name: c for c, name in enumerate(class_names)}
    rows = []
    for v, (segments, labels) in enumerate(zip(gt_segments, gt_labels, strict=True)):
        if len(segments) != len(labels):
            raise ValueError(
                f"gt video {v}: {len(segments)} segments but {len(labels)} labels; "
                f"gt_segment and gt_label files do not belong together"
            )
        for (start, end), label in zip(segments, labels, strict=True):
            rows.append((v, int(start), int(end), index.get(str(label), -1)))
    unmatched = sorted({str(lab) for labs in gt_labels for lab in labs} - set(index))
    if unmatched:
        logger.debug("gt labels %s are not in class_names and never match (Q-M2)", unmatched)
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return table[:, 0], table[:, 1:3], table[:, 3]


def _video_confidence(frames: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """κ (V, C): per video and class, the mean of the top ⌊F_v/16⌋ frame values (NaN if none)."""
    kappa = np.full((len(offsets) - 1, frames.shape[1]), np.nan, dtype=frames.dtype)
    for v in range(len(offsets) - 1):
        block = frames[offsets[v] : offsets[v + 1]]
        k = len(block) // CONFIDENCE_TOP_DIVISOR
        if k == 0:
            continue  # the reference's mean of nothing is NaN, and NaN > 0 disables the video
        top = -np.partition(-block, k - 1, axis=0)[:k]  # (k, C) the top k, unordered
        # Sum the top k in descending order, row by row, as the reference's float32 mean does.
        kappa[v] = (-np.sort(-top, axis=0)).mean(axis=0)
    return kappa


def _class_proposals(
    column: np.ndarray, offsets: np.ndarray, kappa: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One class's proposals over all videos, in the reference's rank order.

    Returns video (P,) and frame [start, end) (P, 2) within the video.
    """
    starts = offsets[:-1]
    peak, low = np.maximum.reduceat(column, starts), np.minimum.reduceat(column, starts)
    # The reference forms max - min in the score dtype, then scales and compares in float64.
    cut = peak.astype(np.float64) - (peak - low).astype(np.float64) * PROPOSAL_DROP
    cut[~(kappa > 0)] = np.inf  # the reference zeroes columns with κ <= 0 (or NaN): no runs
    marked = (column > np.repeat(cut, np.diff(offsets))).view(np.int8)  # (ΣF,)
    edges = np.diff(marked, prepend=0, append=0)  # +1 at run starts, -1 at exclusive ends
    inner = offsets[1:-1]
    split = inner[(marked[inner - 1] == 1) & (marked[inner] == 1)]  # runs crossing videos
    run_start = np.sort(np.concatenate([np.flatnonzero(edges == 1), split]))
    run_end = np.sort(np.concatenate([np.flatnonzero(edges == -1), split]))
    if run_start.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    bounds = np.stack([run_start, run_end], axis=1).ravel()  # s0 e0 s1 e1 …
    if bounds[-1] == len(column):
        bounds = bounds[:-1]  # reduceat cannot index past the end; the last run reaches it anyway
    run_peak = np.maximum.reduceat(column, bounds)[::2]
    keep = run_end - run_start >= MIN_PROPOSAL_FRAMES
    run_start, run_end, run_peak = run_start[keep], run_end[keep], run_peak[keep]
    video = np.searchsorted(offsets, run_start, side="right") - 1
    score = (run_peak + CONFIDENCE_WEIGHT * kappa[video]).astype(np.float64)
    order = _reference_rank(video, score)
    local = np.stack([run_start, run_end], axis=1) - offsets[video][:, None]
    return video[order], local[order]


def _reference_rank(video: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The reference's order: per video argsort(-score), pooled, then argsort(-score) again.

    Both sorts are numpy's default (unstable) kind, so tied scores are ordered as the reference
    orders them on the same machine (Q-M5). Proposals arrive grouped by video, in temporal order.
    """
    pooled = np.lexsort((-score, video))  # a stable per-video sort by descending score
    tied = (video[pooled][1:] == video[pooled][:-1]) & (score[pooled][1:] == score[pooled][:-1])
    for v in np.unique(video[pooled][1:][tied]):
        # With ties only numpy's own unstable sort reproduces the reference's order.
        rows = np.flatnonzero(video == v)
        pooled[rows] = rows[np.argsort(-score[rows])]
    return pooled[np.argsort(-score[pooled])]


def _pair_iou(
    video: np.ndarray,
    bounds: np.ndarray,
    gt_video: np.ndarray,
    gt_bounds: np.ndarray,
    num_videos: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (proposal, gt of the same video) pair: proposal (Q,), gt (Q,), IoU (Q,).

    IoU of half-open integer intervals, as the reference's set arithmetic (e.g. [16, 48) vs
    [20, 50) -> 28/34). `gt_video` is sorted, so gt indices are the reference's list positions.
    """
    count = np.bincount(gt_video, minlength=num_videos)
    first = np.cumsum(count) - count
    per_proposal = count[video]  # (P,)
    proposal = np.repeat(np.arange(len(video)), per_proposal)
    within = np.arange(len(proposal)) - np.repeat(
        np.cumsum(per_proposal) - per_proposal, per_proposal
    )
    gt = np.repeat(first[video], per_proposal) + within
    (p_start, p_end), (g_start, g_end) = bounds[proposal].T, gt_bounds[gt].T
    inter = np.clip(np.minimum(p_end, g_end) - np.maximum(p_start, g_start), 0, None)
    union = (p_end - p_start) + np.clip(g_end - g_start, 0, None) - inter
    return proposal, gt, inter / union


def _greedy_hits(
    video: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray], num_gt: int, theta: float
) -> np.ndarray:
    """(P,) bool: the reference's greedy matching of ranked proposals at IoU `theta`.

    A proposal hits if a remaining gt of its video has IoU >= theta; the best such gt (first
    listed on ties) is removed. Videos are independent, so the k-th candidate proposal of every
    video is matched in the same vectorised round.
    """
    hits = np.zeros(len(video), dtype=bool)
    proposal, gt, iou = (a[pairs[2] >= theta] for a in pairs)
    if proposal.size == 0:
        return hits
    ranked = np.unique(proposal)  # proposals with a candidate, best rank first
    turn = _rank_within(video[ranked])  # 0 for a video's best candidate proposal, 1 next, …
    pair_turn = turn[np.searchsorted(ranked, proposal)]
    order = np.lexsort((gt, -iou, proposal, pair_turn))  # per turn, per proposal: best gt first
    free = np.ones(num_gt, dtype=bool)
    for chunk in np.split(order, np.flatnonzero(np.diff(pair_turn[order])) + 1):
        chunk = chunk[free[gt[chunk]]]
        if chunk.size == 0:
            continue
        won = chunk[np.r_[True, proposal[chunk][1:] != proposal[chunk][:-1]]]
        hits[proposal[won]] = True
        free[gt[won]] = False
    return hits


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """Position of each element among the elements of its group: [5, 3, 5, 5] -> [0, 0, 1, 2]."""
    order = np.argsort(groups, kind="stable")
    grouped = groups[order]
    position = np.arange(len(groups))
    head = np.r_[True, grouped[1:] != grouped[:-1]]
    rank = np.empty(len(groups), dtype=np.int64)
    rank[order] = position - np.maximum.accumulate(np.where(head, position, 0))
    return rank


def _average_precision(hits: np.ndarray, num_gt: int) -> float:
    """Non-interpolated AP: Σ precision@k over hits / num_gt; 0 without any hit."""
    if not hits.any():
        return 0.0
    tp = hits.astype(np.float64)
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1.0 - tp)
    return float(np.sum(tp_cum / (fp_cum + tp_cum) * tp) / num_gt)
