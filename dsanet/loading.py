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
    val_rows: (
        np.ndarray
    )  # row indices held out for model selection (empty unless protocol 'validation')
    test: TestSet


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


def load_data(cfg: DataConfig, length: int, width: int) -> DataBundle:
    """Read and check every input of a run; build the caches on first use."""
    spec = load_spec(cfg.dataset)
    list_dir, root, test_root, cache = resolve_paths(cfg, spec)
    train_list = read_list(list_dir / spec.train_list, root, spec)
    test_list = read_list(list_dir / spec.test_list, test_root, spec)
    gt_segments, gt_labels = load_gt_segments(list_dir, spec, len(test_list))
    annotation = read_annotation(list_dir / spec.annotation, spec)
    train = open_train(cache, train_list, length, width)
    packed_test = open_test(cache, test_list, width)
    check_gt_segments(
        list_dir / spec.gt_segments,
        gt_segments,
        list(test_list.videos),
        packed_test.lengths,
        spec.frames_per_snippet,
    )
    gt_frames = frame_ground_truth(
        list(test_list.videos),
        packed_test.lengths,
        test_list.targets[:, 0] == 1,
        annotation,
        spec.frames_per_snippet,
    )
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
    _check_both_classes(
        list_dir / spec.test_list, test_list, np.arange(len(test_list)), "test list", ""
    )
    if not 0 < gt_frames.sum() < len(gt_frames):
        raise ValueError(
            f"{list_dir / spec.annotation}: the annotated frames of the test videos are "
            f"{'none' if gt_frames.sum() == 0 else 'all'} of them; frame AUC/AP need both "
            f"normal and anomalous frames: check the annotation and the test list belong together"
        )
    test = TestSet(packed_test, test_list, gt_frames, gt_segments, gt_labels)
    return DataBundle(spec, train, train_list, train_rows, val_rows, test)


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
