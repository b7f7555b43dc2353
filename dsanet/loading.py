"""Assemble what a run reads: lists, packed caches, the validation split and test ground truth.

All input checks happen here, before any model is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsanet.cache import PackedTest, PackedTrain, open_test, open_train
from dsanet.config import DataConfig
from dsanet.data import (
    VideoList,
    check_gt_segments,
    frame_ground_truth,
    load_gt_segments,
    read_annotation,
    read_list,
    split_by_video,
)
from dsanet.datasets import DatasetSpec, load_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSet:
    packed: PackedTest
    videos: VideoList
    gt_frames: np.ndarray  # (Σ frames,) 0/1
    gt_segments: list
    gt_labels: list


@dataclass(frozen=True)
class DataBundle:
    spec: DatasetSpec
    train: PackedTrain
    train_list: VideoList
    train_rows: np.ndarray  # row indices used for training
    # row indices held out for model selection (empty unless protocol 'validation')
    val_rows: np.ndarray
    test: TestSet | None  # None when loaded without the test split


def resolve_paths(cfg: DataConfig, spec: DatasetSpec) -> tuple[Path, Path, Path, Path]:
    """(list_dir, feature_root, test_feature_root, cache_dir), checked to exist."""
    if not cfg.list_dir:
        raise ValueError(
            "data.list_dir is not set: point it at the folder holding "
            f"{spec.train_list}, {spec.test_list} and the gt files"
        )
    if not cfg.feature_root:
        raise ValueError(
            "data.feature_root is not set: point it at the folder of the CLIP "
            "feature .npy files (VadCLIP publishes them; for a synthetic set run "
            "`python -m dsanet synth --preset xd-mini --out DIR`)"
        )
    list_dir = Path(cfg.list_dir).expanduser()
    root = Path(cfg.feature_root).expanduser()
    test_root = Path(cfg.test_feature_root).expanduser() if cfg.test_feature_root else root
    for name, path in (
        ("data.list_dir", list_dir),
        ("data.feature_root", root),
        ("data.test_feature_root", test_root),
    ):
        if not path.is_dir():
            raise FileNotFoundError(
                f"{name}={str(path)!r} is not a folder; fix the path "
                f"(features of XD-Violence/UCF-Crime are published by "
                f"VadCLIP; a synthetic set comes from `python -m dsanet "
                f"synth`)"
            )
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else root / ".dsanet-cache"
    return list_dir, root, test_root, cache


@dataclass(frozen=True)
class TestInputs:
    """The test list with its ground truth, read and checked; no test feature read yet."""

    videos: VideoList
    gt_segments: list
    gt_labels: list
    annotation: dict[str, list[tuple[int, int]]]


def read_test_inputs(cfg: DataConfig, spec: DatasetSpec | None = None) -> TestInputs:
    """The test list, gt files and annotation, checked against each other; the feature files
    are only looked up. A search checks these before its trials, which never read the test set."""
    spec = spec or load_spec(cfg.dataset)
    list_dir, _, test_root, _ = resolve_paths(cfg, spec)
    videos = read_list(list_dir / spec.test_list, test_root, spec)
    gt_segments, gt_labels = load_gt_segments(list_dir, spec, len(videos))
    annotation = read_annotation(list_dir / spec.annotation, spec)
    rows = np.arange(len(videos))
    _check_both_classes(list_dir / spec.test_list, videos, rows, "test list", "")
    missing = [path for path in videos.paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"test feature file {missing[0]} not found ({len(missing)} of {len(videos)} missing); "
            f"check data.test_feature_root (or data.feature_root): list paths keep their last "
            f"components and are joined to it"
        )
    return TestInputs(videos, gt_segments, gt_labels, annotation)


def load_data(cfg: DataConfig, length: int, width: int, test: bool = True) -> DataBundle:
    """Read and check every input of a run; build the caches on first use.

    Without `test`, nothing of the test split is read and `DataBundle.test` is None: a search's
    trials select on the validation split and never see the test set.
    """
    spec = load_spec(cfg.dataset)
    list_dir, root, _, cache = resolve_paths(cfg, spec)
    train_list = read_list(list_dir / spec.train_list, root, spec)
    test_inputs = read_test_inputs(cfg, spec) if test else None  # checked before any packing
    train = open_train(cache, train_list, length, width)
    if cfg.protocol != "validation":
        train_rows = np.arange(len(train_list))
        val_rows = np.zeros(0, dtype=np.int64)
        if cfg.protocol == "reference":
            log.warning(
                "protocol 'reference': model selection uses the TEST set, as the official "
                "code does; numbers are optimistic and only comparable with the paper"
            )
    else:
        train_rows, val_rows = split_by_video(
            train_list.videos, train_list.targets, cfg.val_fraction, cfg.split_seed
        )
    _check_both_classes(list_dir / spec.train_list, train_list, train_rows, "training rows", "")
    if cfg.protocol == "validation":
        _check_both_classes(
            list_dir / spec.train_list,
            train_list,
            val_rows,
            f"validation split (data.val_fraction={cfg.val_fraction}, "
            f"data.split_seed={cfg.split_seed})",
            "; raise data.val_fraction or try another data.split_seed, so that the held-out "
            "videos include both kinds (val AP/AUC need both)",
        )
    test_set = _open_test(test_inputs, spec, list_dir, cache, width) if test_inputs else None
    return DataBundle(spec, train, train_list, train_rows, val_rows, test_set)


def _open_test(
    inputs: TestInputs, spec: DatasetSpec, list_dir: Path, cache: Path, width: int
) -> TestSet:
    """Pack (first time) and open the test features; build the frame-level ground truth."""
    videos = inputs.videos
    packed = open_test(cache, videos, width)
    check_gt_segments(
        list_dir / spec.gt_segments,
        inputs.gt_segments,
        list(videos.videos),
        packed.lengths,
        spec.frames_per_snippet,
    )
    gt_frames = frame_ground_truth(
        list(videos.videos),
        packed.lengths,
        videos.targets[:, 0] == 1,
        inputs.annotation,
        spec.frames_per_snippet,
    )
    if not 0 < gt_frames.sum() < len(gt_frames):
        raise ValueError(
            f"{list_dir / spec.annotation}: the annotated frames of the test videos are "
            f"{'none' if gt_frames.sum() == 0 else 'all'} of them; frame AUC/AP need both "
            f"normal and anomalous frames: check the annotation and the test list belong together"
        )
    return TestSet(packed, videos, gt_frames, inputs.gt_segments, inputs.gt_labels)


def _check_both_classes(
    path: Path, videos: VideoList, rows: np.ndarray, what: str, fix: str
) -> None:
    """MIL training, AP and AUC all need normal and anomalous videos among `rows`."""
    normal = videos.targets[rows, 0] == 1
    if len(rows) and normal.any() and not normal.all():
        return
    found = "no" if not len(rows) else f"only {'normal' if normal.all() else 'anomalous'}"
    fix = fix or "; the list must hold both normal videos and anomalous ones"
    raise ValueError(f"{path}: the {what} hold {found} videos ({len(rows)} rows){fix}")
