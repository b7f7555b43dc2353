"""Packed, memory-mapped feature cache: built once per dataset, shared through the page cache.

Training rows are stored resampled to the fixed length (N, T, D) with their true lengths and
multi-hot targets, so an epoch opens no small files; test videos are stored ragged (ΣT_v, D)
with offsets. A cache is keyed by its inputs (lists, feature file sizes and times, T, D) and
written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsanet.data import VideoList, load_feature_file, resample
from dsanet.npyio import open_npy

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackedTrain:
    features: np.ndarray  # (N, T, D) memory-mapped
    lengths: np.ndarray  # (N,) int64
    targets: np.ndarray  # (N, C) float32


@dataclass(frozen=True)
class PackedTest:
    features: np.ndarray  # (ΣT_v, D) memory-mapped
    offsets: np.ndarray  # (V+1,) int64
    targets: np.ndarray  # (V, C) float32

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def video(self, index: int) -> np.ndarray:
        return np.asarray(self.features[self.offsets[index] : self.offsets[index + 1]])


def cache_key(kind: str, videos: VideoList, length: int, width: int) -> str:
    """Digest of everything the packed arrays depend on."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{kind}|{length}|{width}".encode())
    for path, label in zip(videos.paths, videos.labels, strict=False):
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"feature file {path} not found; check data.feature_root (list paths keep "
                f"their last components and are joined to it)"
            ) from exc
        digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"{kind}-{digest.hexdigest()[:20]}"


def open_train(cache_dir: Path, videos: VideoList, length: int, width: int) -> PackedTrain:
    """Open (building first if needed) the fixed-length training cache."""
    folder = _ensure(
        cache_dir,
        cache_key("train", videos, length, width),
        lambda tmp: _build_train(tmp, videos, length, width),
    )
    return PackedTrain(
        _open_packed(folder, "features.npy", mmap_mode="r"),
        _open_packed(folder, "lengths.npy"),
        _open_packed(folder, "targets.npy"),
    )


def open_test(cache_dir: Path, videos: VideoList, width: int) -> PackedTest:
    """Open (building first if needed) the ragged test cache."""
    folder = _ensure(
        cache_dir, cache_key("test", videos, 0, width), lambda tmp: _build_test(tmp, videos, width)
    )
    return PackedTest(
        _open_packed(folder, "features.npy", mmap_mode="r"),
        _open_packed(folder, "offsets.npy"),
        _open_packed(folder, "targets.npy"),
    )


def _open_packed(folder: Path, name: str, mmap_mode: str | None = None) -> np.ndarray:
    """One array of a finished cache; a damaged one names the folder to delete."""
    fix = f"the feature cache {folder} is damaged: delete that folder and the next run rebuilds it"
    return open_npy(folder / name, what="feature cache file", fix=fix, mmap_mode=mmap_mode)


def _ensure(cache_dir: Path, key: str, build) -> Path:
    folder = cache_dir / key
    if (folder / "meta.json").is_file():
        return folder
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"cannot create the feature cache folder {cache_dir} ({exc}); set "
            f"data.cache_dir to a writable folder"
        ) from exc
    # One builder per machine: others wait on the lock, then find the finished cache.
    with open(cache_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "meta.json").is_file():
            return folder
        tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.perf_counter()
        try:
            meta = build(tmp)
            meta.update(
                format_version=FORMAT_VERSION, seconds=round(time.perf_counter() - start, 2)
            )
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built feature cache %s in %.1f s", folder, time.perf_counter() - start)
    return folder


def _build_train(folder: Path, videos: VideoList, length: int, width: int) -> dict:
    out = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=np.float32, shape=(len(videos), length, width)
    )
    lengths = np.zeros(len(videos), dtype=np.int64)
    for i, path in enumerate(videos.paths):
        out[i], lengths[i] = resample(load_feature_file(path, width), length)
    out.flush()
    del out
    np.save(folder / "lengths.npy", lengths)
    np.save(folder / "targets.npy", videos.targets)
    return {"rows": len(videos), "length": length, "width": width}


def _build_test(folder: Path, videos: VideoList, width: int) -> dict:
    arrays = [load_feature_file(path, width) for path in videos.paths]
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
    out = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]), width)
    )
    for array, start in zip(arrays, offsets[:-1], strict=False):
        out[start : start + len(array)] = array
    out.flush()
    del out
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "targets.npy", videos.targets)
    return {"videos": len(videos), "rows": int(offsets[-1]), "width": width}
