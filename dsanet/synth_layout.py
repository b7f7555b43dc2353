"""Layout of a synthetic benchmark: which videos exist, their names, labels, lengths and segments.

Calibrated to the real lists by `dsanet/presets/synth.yaml`; feature values live in
`synth_features.py` and file writing in `synth.py`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from dsanet.datasets import PRESET_DIR, DatasetSpec
from dsanet.errors import brief
from dsanet.yamlio import load_yaml_file

CALIBRATION_PATH = PRESET_DIR / "synth.yaml"
SPLITS = ("train", "test")
_YOUTUBE_ID = string.ascii_letters + string.digits + "-_"


@dataclass(frozen=True)
class Segment:
    start: int  # first frame
    end: int  # one past the last frame
    label: str  # class label, an entry of spec.class_labels


@dataclass(frozen=True)
class VideoPlan:
    name: str  # video name, without the crop suffix
    folder: str | None  # class folder where the list path has one (UCF)
    label: str  # the list's label string
    classes: tuple[int, ...]  # class indices, 0 = normal
    length: int  # T, feature rows
    frames: int  # raw frame count, T * frames_per_snippet + (0 .. frames_per_snippet - 1)
    segments: tuple[Segment, ...]  # anomalous intervals in frames (gt order); empty if normal

    @property
    def is_normal(self) -> bool:
        return self.classes == (0,)


@dataclass(frozen=True)
class SynthPreset:
    name: str
    dataset: str
    scale: dict[str, float]  # split -> multiplier of the real video counts
    length_range: tuple[int, int] | None
    pinned_test_lengths: tuple[int, ...]


@lru_cache(maxsize=1)
def load_calibration() -> dict[str, Any]:
    """The parsed `synth.yaml` (presets, per-dataset statistics, feature model)."""
    return load_yaml_file(CALIBRATION_PATH)


MAX_SCALE = 100.0  # xd-full x100 would be 1.6 TB: larger is a typo


def resolve_preset(name: str, scale: float = 1.0) -> SynthPreset:
    """A preset name (`xd-mini`, ...) and a count multiplier -> `SynthPreset`."""
    presets = load_calibration()["presets"]
    if name not in presets:
        raise ValueError(f"unknown synthetic preset {name!r}; choose one of {sorted(presets)}")
    if not 0 < scale <= MAX_SCALE:
        raise ValueError(
            f"--scale {brief(scale)}: give a multiplier of the preset's video counts in "
            f"(0, {MAX_SCALE}] (xd-full at scale 1 is 16 GB)"
        )
    raw = presets[name]
    length_range = tuple(raw["length_range"]) if raw.get("length_range") else None
    return SynthPreset(
        name=name,
        dataset=raw["dataset"],
        scale={split: float(raw["scale"][split]) * scale for split in SPLITS},
        length_range=length_range,
        pinned_test_lengths=tuple(raw.get("pinned_test_lengths", ())),
    )


def apportion(weights: dict[str, int], total: int, rng: np.random.Generator) -> dict[str, int]:
    """Split `total` over the keys in proportion to `weights` (largest remainder, random ties)."""
    keys = list(weights)
    w = np.array([weights[k] for k in keys], dtype=float)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(int)
    remainder = quota - counts + rng.random(len(keys)) * 1e-9
    counts[np.argsort(-remainder)[: total - counts.sum()]] += 1
    return dict(zip(keys, counts.tolist(), strict=True))


def scaled_labels(
    spec: DatasetSpec, histogram: dict[str, int], scale: float, rng: np.random.Generator
) -> list[str]:
    """Label strings of `scale * N` videos keeping the normal share and multi-label mix.

    Strata are "classes per video" (normal, 1, 2, 3); every stratum of the real list keeps at
    least one video so small presets still hold multi-label videos.
    """
    strata: dict[str, dict[str, int]] = {}
    for label, count in histogram.items():
        classes = spec.parse_label(str(label))
        key = "0" if classes == (0,) else str(len(classes))
        strata.setdefault(key, {})[str(label)] = count
    total = max(len(strata), round(sum(histogram.values()) * scale))
    per_stratum = apportion({k: sum(v.values()) for k, v in strata.items()}, total, rng)
    for key in strata:
        if per_stratum[key] == 0:
            per_stratum[max(per_stratum, key=per_stratum.get)] -= 1
            per_stratum[key] = 1
    labels: list[str] = []
    for key, members in strata.items():
        for label, count in apportion(members, per_stratum[key], rng).items():
            labels += [label] * count
    return labels


def sample_lengths(
    table: dict[str, Any], kind: str, n: int, rng: np.random.Generator, bounds: Any = None
) -> np.ndarray:
    """`n` video lengths (snippets) from a quantile table, log-linear between quantiles."""
    probs = np.asarray(table["probs"], dtype=float)
    log_q = np.log(np.asarray(table[kind], dtype=float))
    lo, hi = (0.0, 1.0) if bounds is None else np.interp(np.log(bounds), log_q, probs)
    u = rng.uniform(lo, hi, n)
    return np.maximum(1, np.rint(np.exp(np.interp(u, probs, log_q)))).astype(int)


def _segment_count(cal: dict[str, Any], label: str, rng: np.random.Generator) -> int:
    table = cal["segments_per_video"]
    hist = np.asarray(table.get(label, table.get("default")), dtype=float)
    return int(rng.choice(len(hist), p=hist / hist.sum())) + 1


def plan_segments(
    spec: DatasetSpec, cal: dict[str, Any], labels: list[str], frames: int, rng: np.random.Generator
) -> tuple[Segment, ...]:
    """Anomalous intervals of one video of classes `labels`, in frames, in gt order.

    Each class draws its segment count from its real histogram; the anomalous share is
    logit-normal around the classes' median; Dirichlet splits it into segment lengths and the
    remaining frames into uniform gaps, so segment centres are roughly uniform.
    """
    fraction_cal = cal["anomalous_fraction"]
    min_len = int(cal["min_segment_frames"])
    per_class = [_segment_count(cal, label, rng) for label in labels]
    logit = np.mean([np.log(m / (1 - m)) for m in (fraction_cal["median"][c] for c in labels)])
    reference = np.interp(0.5, cal["length"]["probs"], cal["length"]["anomalous"])
    logit += fraction_cal["length_slope"] * np.log(frames / spec.frames_per_snippet / reference)
    fraction = 1 / (1 + np.exp(-(logit + fraction_cal["logit_sd"] * rng.standard_normal())))
    anomalous = max(round(max(fraction, fraction_cal["min"]) * frames), len(labels) * min_len)
    anomalous = min(anomalous, frames)
    while sum(per_class) * cal["frames_per_segment"] > anomalous and max(per_class) > 1:
        per_class[int(np.argmax(per_class))] -= 1
    n = sum(per_class)
    lengths = min_len + rng.dirichlet(np.full(n, cal["segment_alpha"])) * (anomalous - n * min_len)
    gaps = rng.dirichlet(np.ones(n + 1)) * (frames - anomalous)
    ends = np.cumsum(lengths + gaps[:n])
    starts, ends = np.rint(ends - lengths).astype(int), np.rint(ends).astype(int)
    order = rng.permutation(
        [label for label, k in zip(labels, per_class, strict=True) for _ in range(k)]
    )
    segments = [
        Segment(int(s), int(e), str(c)) for s, e, c in zip(starts, ends, order, strict=True)
    ]
    if len(labels) > 1 and rng.random() < cal["overlap_share"]:
        # Real multi-class gt lists overlapping segments of two classes, out of order.
        base = segments[int(rng.integers(n))]
        start = base.start + int(rng.uniform(0.2, 0.8) * (base.end - base.start))
        end = min(frames, start + max(min_len, int(rng.uniform(0.3, 1.0) * (base.end - start))))
        other = [c for c in labels if c != base.label]
        segments.append(Segment(start, end, str(rng.choice(other))))
    return tuple(segments)


def _xd_name(label: str, seconds: int, cal: dict[str, Any], rng: np.random.Generator) -> str:
    if rng.random() < cal["untimed_share"]:
        return f"v={''.join(rng.choice(list(_YOUTUBE_ID), 11))}__#1_label_{label}"
    start = int(rng.integers(0, 2 * 3600))
    one_digit_hour = rng.random() < 0.1  # some real movie names write the hour with one digit

    def stamp(t: int) -> str:
        return f"{t // 3600:{'d' if one_digit_hour else '02d'}}-{t // 60 % 60:02d}-{t % 60:02d}"

    year = int(rng.integers(1970, 2020))
    source = f"Film{int(rng.integers(0, 500)):03d}.{year}"
    return f"{source}__#{stamp(start)}_{stamp(start + seconds)}_label_{label}"


def _xd_names(
    spec: DatasetSpec,
    cal: dict[str, Any],
    drafts: list[tuple[str, int]],
    rng: np.random.Generator,
    taken: set[str],
) -> list[tuple[str, str | None]]:
    names: list[tuple[str, str | None]] = []
    for label, length in drafts:
        seconds = max(1, round(length * spec.frames_per_snippet / spec.fps))
        name = _xd_name(label, seconds, cal, rng)
        while name in taken:
            name = _xd_name(label, seconds, cal, rng)
        taken.add(name)
        names.append((name, None))
    return names


def plan_dataset(
    spec: DatasetSpec, preset: SynthPreset, rng: np.random.Generator
) -> dict[str, list[VideoPlan]]:
    """Video plans of both splits, each in list order (anomalous first, sorted by name)."""
    cal = load_calibration()["datasets"][preset.dataset]
    fps16 = spec.frames_per_snippet
    drafts: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        labels = scaled_labels(spec, cal["labels"][split], preset.scale[split], rng)
        normal = np.array([spec.parse_label(label) == (0,) for label in labels])
        lengths = np.empty(len(labels), dtype=int)
        for kind, mask in (("normal", normal), ("anomalous", ~normal)):
            lengths[mask] = sample_lengths(
                cal["length"], kind, int(mask.sum()), rng, preset.length_range
            )
        if split == "test" and preset.pinned_test_lengths:
            pinned_lengths = preset.pinned_test_lengths[: len(labels)]
            lengths[rng.choice(len(labels), len(pinned_lengths), replace=False)] = pinned_lengths
        drafts[split] = list(zip(labels, lengths.tolist(), strict=True))
    names = _name_videos(spec, cal, drafts, rng)
    plans: dict[str, list[VideoPlan]] = {}
    for split in SPLITS:
        plans[split] = []
        for (label, length), (name, folder) in zip(drafts[split], names[split], strict=True):
            classes = spec.parse_label(label)
            frames = length * fps16 + int(rng.integers(fps16))
            segments = ()
            if classes != (0,):
                segments = plan_segments(
                    spec, cal, [spec.class_labels[c] for c in classes], frames, rng
                )
            plans[split].append(VideoPlan(name, folder, label, classes, length, frames, segments))
        plans[split].sort(key=lambda p: (p.is_normal, p.folder or "", p.name))
    return plans


def _name_videos(
    spec: DatasetSpec,
    cal: dict[str, Any],
    drafts: dict[str, list[tuple[str, int]]],
    rng: np.random.Generator,
) -> dict[str, list[tuple[str, str | None]]]:
    """(name, folder) per draft; names are unique across both splits."""
    if cal["naming"] == "xd":
        taken: set[str] = set()
        names = {split: _xd_names(spec, cal, drafts[split], rng, taken) for split in SPLITS}
        for split in SPLITS:  # three real YouTube ids contain "__": keep that trap in every split
            for i, (_, (name, folder)) in enumerate(zip(drafts[split], names[split], strict=True)):
                if name.startswith("v="):
                    names[split][i] = (f"v=x__{name[5:]}", folder)
                    break
        return names
    numbers: dict[str, list[int]] = {}
    for label in sorted({label for split in SPLITS for label, _ in drafts[split]}):
        counts = [sum(lab == label for lab, _ in drafts[split]) for split in SPLITS]
        numbers[label] = (rng.permutation(sum(counts) + sum(counts) // 8) + 1).tolist()
    names = {split: [] for split in SPLITS}
    for split in SPLITS:
        for label, _ in drafts[split]:
            number = numbers[label].pop()
            if spec.parse_label(label) == (0,):
                stem, folder = cal["normal_stems"][split], cal["normal_folders"][split]
            else:
                stem, folder = label, label
            names[split].append((f"{stem}{number:03d}_x264", folder))
    return names
