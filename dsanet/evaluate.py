"""Evaluation passes: test-set inference (chunked, batched across videos), validation scores,
and the video-level class guesses of the test set.

The class text features are encoded once per pass, not per video (Q-T1 fixed), and SG-NM
never runs here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from dsanet import metrics
from dsanet.config import EvalConfig
from dsanet.data import chunk_lengths, split_chunks
from dsanet.loading import DataBundle, TestSet
from dsanet.losses import topk_mean

VAL_AUC, VAL_AP, VAL_CLASS_ACC = "val_auc", "val_ap", "val_class_acc"
VAL_NO_SKILL_AP = "val_no_skill_ap"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _chunk_batches(
    test: TestSet, length: int, max_chunks: int
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Groups of whole videos whose chunks fit in one batch of at most `max_chunks`."""
    group: list[int] = []
    chunks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for index in range(len(test.videos)):
        video_chunks, _ = split_chunks(test.packed.video(index), length)
        if group and sum(len(c) for c in chunks) + len(video_chunks) > max_chunks:
            yield group, np.concatenate(chunks), np.concatenate(lengths)
            group, chunks, lengths = [], [], []
        group.append(index)
        chunks.append(video_chunks)
        lengths.append(chunk_lengths(int(test.packed.lengths[index]), length))
    if group:
        yield group, np.concatenate(chunks), np.concatenate(lengths)


@torch.no_grad()
def predict_test(
    model: torch.nn.Module,
    test: TestSet,
    device: torch.device,
    precision: str = "fp32",
    max_chunks: int = 64,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per test video, in list order: (ℓ1 (T_v, 1), ℓ2 (T_v, C)) as float32 numpy arrays."""
    model.eval()
    length = model.cfg.visual_length
    text = model.encode_classes()  # once per pass
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for group, chunks, lengths in _chunk_batches(test, length, max_chunks):
        features = torch.from_numpy(chunks).to(device)
        with autocast(device, precision):
            result = model(features, torch.from_numpy(lengths).to(device), text_features=text)
        det = result.logits_det.float().reshape(-1, 1).cpu().numpy()  # (n·T, 1)
        align = result.logits_align.float().reshape(det.shape[0], -1).cpu().numpy()
        start = 0
        for index in group:
            num_rows = int(test.packed.lengths[index])
            span = -(-num_rows // length) * length
            out.append((det[start : start + num_rows], align[start : start + num_rows]))
            start += span
    return out


def test_metrics(
    predictions: list[tuple[np.ndarray, np.ndarray]], bundle: DataBundle, cfg: EvalConfig
) -> dict[str, float]:
    """Frame AUC/AP of σ(ℓ1) and segment mAP of the class probabilities (DESIGN §5)."""
    return metrics.evaluate_videos(
        [p[0] for p in predictions],
        [p[1] for p in predictions],
        gt_frames=bundle.test.gt_frames,
        gt_segments=bundle.test.gt_segments,
        gt_labels=bundle.test.gt_labels,
        spec=bundle.spec,
        temperature=cfg.temperature,
        class_probs=cfg.class_probs,
        iou_thresholds=cfg.iou_thresholds,
    )


@torch.no_grad()
def video_class_scores(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]], cfg: EvalConfig, topk_divisor: int
) -> np.ndarray:
    """(V, C) per test video: its class probabilities (eval.class_probs at eval.temperature, as
    the segment mAP uses them) pooled over snippets by the top-k mean, k = T_v // topk_divisor
    + 1 (the MIL pooling of the losses and of validation)."""
    pooled = []
    for det, align in predictions:
        det_t = torch.as_tensor(det).reshape(len(det), 1).float()
        probs = metrics.class_probabilities(
            det_t, torch.as_tensor(align).float(), cfg.temperature, cfg.class_probs
        )  # (T_v, C)
        pooled.append(topk_mean(probs[None], torch.tensor([len(probs)]), topk_divisor)[0])
    return torch.stack(pooled).cpu().numpy()


def video_class_predictions(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]], cfg: EvalConfig, topk_divisor: int
) -> np.ndarray:
    """(V,) int per test video: the anomaly class (1 … C-1) of highest `video_class_scores`."""
    return video_class_scores(predictions, cfg, topk_divisor)[:, 1:].argmax(axis=1) + 1


def class_confusion(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C-1, C-1) video counts over the anomalous videos: row = true, column = predicted class.

    `predicted` (V,) holds classes 1 … C-1 (`video_class_predictions`), `targets` (V, C) the
    multi-hot labels. A multi-label video is right when the prediction is any of its classes
    (counted on the diagonal); otherwise it counts in the row of its first class.
    """
    size = targets.shape[1] - 1
    matrix = np.zeros((size, size), dtype=np.int64)
    for guess, target in zip(predicted, targets, strict=True):
        true = np.flatnonzero(target[1:]) + 1
        if target[0] == 1 or len(true) == 0:
            continue
        matrix[(guess if guess in true else true[0]) - 1, guess - 1] += 1
    return matrix


@torch.no_grad()
def validation_metrics(
    model: torch.nn.Module,
    bundle: DataBundle,
    device: torch.device,
    batch_size: int,
    topk_divisor: int,
    precision: str = "fp32",
) -> dict[str, float]:
    """Video-level scores on the held-out training videos (they carry video labels only).

    A row's anomaly score is the top-k mean of σ(ℓ1) (the MIL pooling of L1); a video's is the
    mean over its crops. Class accuracy: arg-max of the top-k pooled ℓ2 over anomaly classes,
    on anomalous videos, counted right when it names one of the video's classes.
    """
    model.eval()
    rows = np.sort(bundle.val_rows)  # sequential reads from the memory map
    text = model.encode_classes()
    scores = np.zeros(len(rows))
    classes = np.zeros((len(rows), bundle.spec.num_classes))
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        features = torch.from_numpy(np.asarray(bundle.train.features[batch])).to(device)
        lengths = torch.from_numpy(bundle.train.lengths[batch]).to(device)
        with autocast(device, precision):
            result = model(features, lengths, text_features=text)
        det = torch.sigmoid(result.logits_det.float())  # (B, T, 1)
        align = result.logits_align.float()  # (B, T, C)
        span = slice(start, start + len(batch))
        scores[span] = topk_mean(det, lengths, topk_divisor)[:, 0].cpu().numpy()
        classes[span] = topk_mean(align, lengths, topk_divisor).cpu().numpy()
    video_ids = np.unique(np.asarray(bundle.train_list.videos)[rows], return_inverse=True)[1]
    return _video_scores(scores, classes, video_ids, bundle.train.targets[rows])


def _video_scores(
    scores: np.ndarray, classes: np.ndarray, video_ids: np.ndarray, targets: np.ndarray
) -> dict[str, float]:
    num_videos = int(video_ids.max()) + 1
    counts = np.bincount(video_ids, minlength=num_videos)
    video_score = np.bincount(video_ids, weights=scores, minlength=num_videos) / counts
    video_classes = (
        np.stack(
            [
                np.bincount(video_ids, weights=classes[:, c], minlength=num_videos)
                for c in range(classes.shape[1])
            ],
            axis=1,
        )
        / counts[:, None]
    )
    video_targets = np.zeros((num_videos, targets.shape[1]))
    video_targets[video_ids] = targets
    anomalous = video_targets[:, 0] == 0
    result = {
        VAL_AUC: float("nan"),
        VAL_AP: float("nan"),
        VAL_CLASS_ACC: float("nan"),
        VAL_NO_SKILL_AP: float(anomalous.mean()),  # the AP of a random scorer
    }
    if 0 < anomalous.sum() < num_videos:
        result[VAL_AUC] = float(roc_auc_score(anomalous, video_score))
        result[VAL_AP] = float(average_precision_score(anomalous, video_score))
    if anomalous.any():
        guess = video_classes[anomalous, 1:].argmax(1) + 1
        result[VAL_CLASS_ACC] = float(video_targets[anomalous][np.arange(len(guess)), guess].mean())
    return result
