"""VadCLIP-format features: list reading, length handling, ground truth, splits and batches.

Training rows come resampled/padded to a fixed length from the packed cache (`dsanet.cache`);
test videos are read whole and cut into fixed-length chunks (DESIGN §1.4, §1.5).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsanet.datasets import DatasetSpec
from dsanet.errors import brief, decode_utf8
from dsanet.npyio import GT_FIX, load_object_list, open_npy

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- length handling


def resample(features: np.ndarray, length: int = 256) -> tuple[np.ndarray, int]:
    """Training-time length handling: average into `length` bins if longer, else zero-pad.

    Bin edges are int(linspace(0, T, length+1)) (DESIGN §1.4); an empty bin copies its start row.
    Returns the (length, D) array and the true length (min(T, length)).
    """
    num_rows, dim = features.shape
    if num_rows <= length:
        out = np.zeros((length, dim), dtype=features.dtype)
        out[:num_rows] = features
        return out, num_rows
    edges = np.linspace(0, num_rows, length + 1).astype(np.int32)
    starts, ends = edges[:-1], edges[1:]
    sums = np.add.reduceat(features.astype(np.float64), starts, axis=0)  # (length, D)
    counts = ends - starts
    empty = counts == 0  # never when num_rows > length; kept for the reference's fallback
    counts = np.maximum(counts, 1)[:, None]
    out = sums / counts
    out[empty] = features[starts[empty]]
    return out.astype(features.dtype), length


def split_chunks(features: np.ndarray, length: int = 256) -> tuple[np.ndarray, int]:
    """Test-time chunking into consecutive `length`-row chunks, the last zero-padded.

    Returns (n, length, D) with n = ceil(T / length) and the true length T. Unlike the
    reference, no all-padding chunk is added when T is a multiple of `length` (Q-D3).
    """
    num_rows, dim = features.shape
    num_chunks = max(1, -(-num_rows // length))
    out = np.zeros((num_chunks * length, dim), dtype=features.dtype)
    out[:num_rows] = features
    return out.reshape(num_chunks, length, dim), num_rows


def chunk_lengths(num_rows: int, length: int = 256) -> np.ndarray:
    """Valid rows in each chunk produced by `split_chunks`."""
    num_chunks = max(1, -(-num_rows // length))
    return np.minimum(length, num_rows - length * np.arange(num_chunks)).astype(np.int64)


# ---------------------------------------------------------------------------- lists


@dataclass(frozen=True)
class VideoList:
    """One CSV list, re-rooted: a row per (video, crop) feature file."""

    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    videos: tuple[str, ...]  # video name of each row (file name without the crop suffix)
    targets: np.ndarray  # (N, C) float32 multi-hot

    def __len__(self) -> int:
        return len(self.paths)


def read_list(csv_path: Path, feature_root: Path, spec: DatasetSpec) -> VideoList:
    """Read a `path,label` list; keep the last `spec.path_components` of each path."""
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"feature list {csv_path} not found; set data.list_dir to the folder holding "
            f"{spec.train_list} and {spec.test_list} (VadCLIP's list/ folder)"
        )
    header, rows = _csv_rows(csv_path)
    if header is None or [h.strip() for h in header[:2]] != ["path", "label"]:
        raise ValueError(f"{csv_path}: the header must be 'path,label', found {brief(header)}")
    if not rows:
        raise ValueError(f"{csv_path}: the list has a header but no rows")
    paths, labels, videos = [], [], []
    targets = np.zeros((len(rows), spec.num_classes), dtype=np.float32)
    for i, (line, row) in enumerate(rows):
        if len(row) < 2:
            raise ValueError(f"{csv_path}, line {line}: expected 'path,label', got {brief(row)}")
        raw_path, label = row[0].strip(), row[1].strip()
        parts = Path(raw_path.replace("\\", "/")).parts[-spec.path_components :]
        try:
            targets[i, list(spec.parse_label(label))] = 1.0
        except ValueError as exc:
            raise ValueError(f"{csv_path}, line {line}: {exc}") from exc
        paths.append(feature_root.joinpath(*parts))
        labels.append(label)
        videos.append(_video_name(parts[-1]))
    return VideoList(tuple(paths), tuple(labels), tuple(videos), targets)


def _read_utf8(path: Path, what: str) -> str:
    """A text file others wrote, decoded as UTF-8 (a leading BOM dropped); NUL bytes refused."""
    text = decode_utf8(path.read_bytes(), f"{what} {path}").removeprefix("\ufeff")
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise ValueError(
            f"{what} {path}, line {line}: a NUL byte, which no text list holds; re-download or "
            f"re-export it as UTF-8 text"
        )
    return text


def _csv_rows(csv_path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header, [(line number, row)]) of a list CSV, empty rows dropped."""
    reader = csv.reader(io.StringIO(_read_utf8(csv_path, "feature list"), newline=""))
    try:
        header = next(reader, None)
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise ValueError(
            f"feature list {csv_path}, line {reader.line_num}: not a readable CSV ({exc}); "
            f"it must be a 'path,label' CSV as VadCLIP's lists are"
        ) from exc
    return header, rows


def _video_name(file_name: str) -> str:
    stem = file_name[:-4] if file_name.endswith(".npy") else file_name
    head, sep, crop = stem.rpartition("__")
    return head if sep and crop.isdigit() else stem


def load_feature_file(path: Path, width: int) -> np.ndarray:
    """One `.npy` of shape (T, width), checked; float32."""
    if not path.is_file():
        raise FileNotFoundError(
            f"feature file {path} not found; check data.feature_root (list paths keep their "
            f"last components and are joined to it)"
        )
    array = open_npy(path, what="feature file", fix="re-extract or re-copy it")
    if array.ndim != 2 or array.shape[1] != width or array.shape[0] == 0:
        raise ValueError(
            f"feature file {path}: shape {array.shape}, expected (T>=1, {width}) "
            f"CLIP ViT-B/16 features (model.visual_width={width})"
        )
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"feature file {path} holds NaN or inf values; re-extract it")
    return array


# ---------------------------------------------------------------------------- ground truth


def read_annotation(path: Path, spec: DatasetSpec) -> dict[str, list[tuple[int, int]]]:
    """Binary temporal annotation: {video: [(start, end) frames]}."""
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {path} not found; it ships with the lists "
            f"({spec.annotation}); set data.list_dir to its folder"
        )
    out: dict[str, list[tuple[int, int]]] = {}
    for number, line in enumerate(_read_utf8(path, "annotation file").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        name = tokens[0].removesuffix(".mp4")
        values = tokens[1:] if spec.annotation_format == "xd" else tokens[2:]
        try:
            bounds = [int(v) for v in values]
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: frame bounds must be integers") from exc
        if len(bounds) % 2:
            raise ValueError(f"{path}, line {number}: an odd number of frame bounds")
        out[name] = [(s, e) for s, e in zip(bounds[::2], bounds[1::2], strict=False) if s != -1]
    return out


def frame_ground_truth(
    videos: list[str],
    lengths: np.ndarray,
    normal: np.ndarray,
    annotation: dict[str, list[tuple[int, int]]],
    frames_per_snippet: int,
) -> np.ndarray:
    """Concatenated 0/1 frame vector of length Σ frames_per_snippet·T_v (DESIGN §1.6).

    Annotated intervals are half-open and cut at the video's last frame.
    """
    total = int(lengths.sum()) * frames_per_snippet
    gt = np.zeros(total, dtype=np.float32)
    start = 0
    for name, num_rows, is_normal in zip(videos, lengths, normal, strict=False):
        num_frames = int(num_rows) * frames_per_snippet
        if not is_normal:
            if name not in annotation:
                raise ValueError(
                    f"anomalous test video {brief(name)} has no line in the annotation "
                    f"file; the list and the annotation do not belong together"
                )
            for s, e in annotation[name]:
                if s >= num_frames + frames_per_snippet:  # see check_gt_segments
                    raise ValueError(
                        f"annotation of test video {brief(name)}: interval [{s}, {e}) starts after "
                        f"its last frame ({num_rows} feature rows x {frames_per_snippet} = "
                        f"{num_frames} frames, plus the {frames_per_snippet - 1} raw frames a "
                        f"last partial snippet may hold); the features and the annotation do "
                        f"not belong together: check data.feature_root/test_feature_root and "
                        f"the list"
                    )
                gt[start + min(s, num_frames) : start + min(e, num_frames)] = 1.0
        start += num_frames
    return gt


def load_gt_segments(list_dir: Path, spec: DatasetSpec, num_videos: int) -> tuple[list, list]:
    """The shipped gt_segment / gt_label object arrays, checked against the test list length."""
    arrays = []
    for name in (spec.gt_segments, spec.gt_labels):
        path = list_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; it ships with the VadCLIP lists; set "
                f"data.list_dir to its folder"
            )
        arrays.append(load_object_list(path))
    segments, labels = arrays
    for name, values in ((spec.gt_segments, segments), (spec.gt_labels, labels)):
        if len(values) != num_videos:
            raise ValueError(
                f"{list_dir / name}: {len(values)} entries but the test list "
                f"{spec.test_list} has {num_videos} videos; they must be in step"
            )
    _check_gt_content(list_dir / spec.gt_segments, segments, list_dir / spec.gt_labels, labels)
    return segments, labels


SEGMENT_FORM = "a list of [start, end] frame pairs, ints or strings of ints ([['157', '180'], ...])"
LABEL_FORM = "a list of class-label strings, one per segment (['B1', 'G', ...])"


def _is_frame(value: object) -> bool:
    if isinstance(value, str):
        try:
            int(value)
        except ValueError:
            return False
        return True
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_segment_list(entry: object) -> bool:
    return isinstance(entry, list | tuple) and all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(map(_is_frame, pair))
        for pair in entry
    )


def _check_gt_content(segment_path: Path, segments: list, label_path: Path, labels: list) -> None:
    """Each gt entry is a list of [start, end] pairs with one label string per pair."""
    for index, (pairs, names) in enumerate(zip(segments, labels, strict=True)):
        if not _is_segment_list(pairs):
            raise ValueError(
                f"{segment_path}, entry {index}: {brief(pairs)} is not {SEGMENT_FORM}; {GT_FIX}"
            )
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"{label_path}, entry {index}: {brief(names)} is not {LABEL_FORM}; {GT_FIX}"
            )
        if len(names) != len(pairs):
            raise ValueError(
                f"{label_path}, entry {index}: {len(names)} labels for the {len(pairs)} segments "
                f"of {segment_path}; the two gt files must come from the same VadCLIP lists"
            )


def check_gt_segments(
    path: Path, segments: list, videos: list[str], lengths: np.ndarray, frames_per_snippet: int
) -> None:
    """Every gt segment must start inside its test video; ends past the last frame are cut.

    Feature extraction drops a video's last partial snippet (up to `frames_per_snippet - 1` raw
    frames, which the annotations still cover), so a segment may start that far past the
    features' last frame; further means the gt and the features are of different videos.
    """
    for index, (pairs, name, num_rows) in enumerate(zip(segments, videos, lengths, strict=True)):
        num_frames = int(num_rows) * frames_per_snippet
        for pair in pairs:
            if int(pair[0]) >= num_frames + frames_per_snippet:
                segment = [int(v) for v in pair]
                raise ValueError(
                    f"{path}, entry {index} ({brief(name)}): segment {segment} starts "
                    f"after the video's last frame ({num_frames} frames from {num_rows} feature "
                    f"rows, plus up to {frames_per_snippet - 1} raw frames of a dropped partial "
                    f"snippet); the gt file and the test features do not belong together"
                )


# ---------------------------------------------------------------------------- splits


def split_by_video(
    videos: tuple[str, ...], targets: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): whole videos go to one side, stratified by class set, seeded."""
    names, first, inverse = np.unique(np.asarray(videos), return_index=True, return_inverse=True)
    video_keys = [tuple(np.flatnonzero(targets[i])) for i in first]  # class set per video
    rng = np.random.default_rng(seed)
    val_videos = []
    for key in sorted(set(video_keys)):
        members = np.flatnonzero([k == key for k in video_keys])
        rng.shuffle(members)
        take = int(round(fraction * len(members)))
        val_videos.extend(members[:take].tolist())
    is_val = np.isin(inverse, np.asarray(val_videos, dtype=np.int64))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    features: np.ndarray  # (B, T, D) float32
    lengths: np.ndarray  # (B,) int64
    targets: np.ndarray  # (B, C) float32 multi-hot


def epoch_batches(
    rows: np.ndarray, targets: np.ndarray, sampling: str, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Row-index batches of one epoch, a pure function of (seed, epoch) so resume is exact.

    "mixed": one shuffled pass, last batch kept (XD). "paired": normal and anomalous rows
    shuffled apart, full batches only, each step = [normal half; anomalous half] (UCF).
    """
    rng = np.random.default_rng([seed, epoch])
    if sampling == "mixed":
        order = rng.permutation(rows)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    normal = rng.permutation(rows[targets[rows, 0] == 1])
    anomalous = rng.permutation(rows[targets[rows, 0] == 0])
    steps = min(len(normal), len(anomalous)) // batch_size
    if steps == 0:
        raise ValueError(
            f"paired sampling needs at least train.batch_size={batch_size} normal "
            f"and anomalous training rows; found {len(normal)} and {len(anomalous)}"
        )
    return [
        np.concatenate(
            [
                normal[i * batch_size : (i + 1) * batch_size],
                anomalous[i * batch_size : (i + 1) * batch_size],
            ]
        )
        for i in range(steps)
    ]


def iterate_batches(
    features: np.ndarray, lengths: np.ndarray, targets: np.ndarray, batches: list[np.ndarray]
) -> Iterator[Batch]:
    """Gather each batch from the (memory-mapped) fixed-length cache, in sorted row order."""
    for rows in batches:
        gathered = np.empty((len(rows), *features.shape[1:]), dtype=features.dtype)
        # Row by row straight into its slot: sequential reads from the memory map and one copy
        # (a fancy-indexed read and a reorder copied every batch twice: bench/RESULTS.md, B3).
        for slot in np.argsort(rows, kind="stable"):
            gathered[slot] = features[rows[slot]]
        yield Batch(gathered, lengths[rows].astype(np.int64), targets[rows])
