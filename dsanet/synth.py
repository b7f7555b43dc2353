"""Synthetic XD-Violence / UCF-Crime benchmarks in the real VadCLIP on-disk format.

`generate("xd-mini", out)` writes `out/lists` (list CSVs, gt_segment/gt_label, the binary
annotation) and `out/features` (one (T, D) float32 `.npy` per video and crop), which the real
loader reads unchanged. Layout: `synth_layout.py`; feature model: `synth_features.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dsanet.datasets import DatasetSpec, load_spec
from dsanet.synth_features import (
    FeatureModel,
    build_feature_model,
    model_params,
    render_crops,
    render_video,
)
from dsanet.synth_layout import (
    SPLITS,
    SynthPreset,
    VideoPlan,
    load_calibration,
    plan_dataset,
    resolve_preset,
)

logger = logging.getLogger(__name__)

MARKER = "synth.json"  # written last: a tree without it is not a finished synthetic benchmark
FEATURES, LISTS, TRUTH = "features", "lists", "train_truth.json"
_worker_model: FeatureModel | None = None


@dataclass(frozen=True)
class SynthSummary:
    preset: str
    dataset: str
    seed: int
    scale: float
    out: Path
    feature_root: Path  # pass as data.feature_root
    list_dir: Path  # pass as data.list_dir
    counts: dict[str, dict[str, int]]  # split -> videos, normal, anomalous, multi_label, files, ...
    test_positive_rate: float  # share of anomalous frames in the test gt vector
    seconds: float


def generate(
    preset: str,
    out: Path | str,
    seed: int = 0,
    scale: float = 1.0,
    workers: int = 1,
    overwrite: bool = False,
) -> SynthSummary:
    """Write the synthetic benchmark `preset` (scaled video counts) to `out`, atomically.

    The tree is built in a sibling `.<name>.tmp-*` folder and renamed into place once complete;
    an existing `out` is replaced only if `overwrite` and it is a finished synthetic tree.
    """
    started = time.perf_counter()
    if not 0 <= seed < 2**32:  # numpy's seed range
        raise ValueError(f"--seed {seed}: give a seed in [0, 2**32)")
    if not 1 <= workers <= 256:
        raise ValueError(f"--workers {workers}: give 1 to 256 writer processes")
    synth_preset = resolve_preset(preset, scale)
    spec = load_spec(synth_preset.dataset)
    out = Path(out).resolve()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        counts, positive_rate = _write_tree(tmp, spec, synth_preset, seed, workers)
        summary = SynthSummary(
            preset=preset,
            dataset=spec.name,
            seed=seed,
            scale=scale,
            out=out,
            feature_root=out / FEATURES,
            list_dir=out / LISTS,
            counts=counts,
            test_positive_rate=positive_rate,
            seconds=round(time.perf_counter() - started, 2),
        )
        record = {**asdict(summary), "out": None, "feature_root": FEATURES, "list_dir": LISTS}
        record.update(complete=True, train_truth=TRUTH)
        record["model"] = model_params(synth_preset.dataset, load_calibration())
        (tmp / MARKER).write_text(json.dumps(record, indent=1))
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info(
        "wrote synthetic %s (seed %d) to %s in %.1fs: %s",
        preset,
        seed,
        out,
        summary.seconds,
        ", ".join(f"{s} {c['videos']} videos / {c['files']} files" for s, c in counts.items()),
    )
    logger.info("use it with: data.feature_root=%s data.list_dir=%s", out / FEATURES, out / LISTS)
    return summary


def _write_tree(
    tmp: Path, spec: DatasetSpec, preset: SynthPreset, seed: int, workers: int
) -> tuple[dict[str, dict[str, int]], float]:
    """Features, lists, gt, annotation and train truth under `tmp`; (counts, test positive rate)."""
    calibration = load_calibration()
    plans = plan_dataset(spec, preset, np.random.default_rng([seed, 1]))
    params = model_params(preset.dataset, calibration)
    model = build_feature_model(spec, params, np.random.default_rng([seed, 0]))
    roots = calibration["datasets"][preset.dataset]["roots"]
    paths = {s: [_list_path(spec, roots[s], p) for p in plans[s]] for s in SPLITS}
    snippets = _write_features(tmp, spec, plans, paths, model, seed, workers)
    (tmp / LISTS).mkdir()
    for split in SPLITS:
        file = tmp / LISTS / getattr(spec, f"{split}_list")
        _write_list(file, plans[split], paths[split], _crops(spec, split))
    _write_gt(tmp / LISTS, spec, plans["test"])
    _write_annotation(tmp / LISTS / spec.annotation, spec, plans["test"])
    truth = {  # the frame truth the weak train labels hide, for diagnostics
        p.name: {"length": p.length, "frames": p.frames, "segments": _triples(p)}
        for p in plans["train"]
    }
    (tmp / TRUTH).write_text(json.dumps(truth))
    counts = {s: _counts(plans[s], _crops(spec, s), snippets[s]) for s in SPLITS}
    return counts, _positive_rate(spec, plans["test"])


def _triples(plan: VideoPlan) -> list[list[int | str]]:
    return [[s.start, s.end, s.label] for s in plan.segments]


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MARKER).is_file():
        raise ValueError(
            f"{out} exists and is not a synthetic benchmark (no {MARKER}); "
            f"choose an empty or new output folder"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds a synthetic benchmark; pass overwrite=True (--overwrite) "
            f"to replace it or choose another output folder"
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tree to `out`; an old tree is moved aside first, then deleted."""
    stale = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*") if p != tmp)
    if stale:
        logger.warning("unfinished synthetic trees from interrupted runs: %s (delete them)", stale)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "tree")
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _crops(spec: DatasetSpec, split: str) -> list[int]:
    return list(range(spec.crops)) if split == "train" else [spec.test_crop]


def _list_path(spec: DatasetSpec, root: str, plan: VideoPlan) -> PurePosixPath:
    """Absolute list path of crop 0 on the fake foreign machine (the `__<k>` suffix is added)."""
    path = PurePosixPath(root, *([plan.folder] if plan.folder else []), plan.name)
    components = len(path.parts) - len(PurePosixPath(root).parts)
    if components != spec.path_components:
        raise ValueError(
            f"synthetic names of {spec.name!r} carry {components} path components but the "
            f"spec keeps path_components={spec.path_components}; "
            f"fix the naming in dsanet/presets/synth.yaml"
        )
    return path


def _crop_file(path: PurePosixPath, crop: int) -> PurePosixPath:
    return path.with_name(f"{path.name}__{crop}.npy")


def _render_files(job: tuple[Any, ...]) -> int:
    """Render one video and save its crops; runs in a worker or inline."""
    model, fps16, seed, split_id, index, plan, files = job
    model = model or _worker_model
    signal = render_video(model, plan, fps16, np.random.default_rng([seed, 2, split_id, index]))
    rngs = [np.random.default_rng([seed, 3, split_id, index, crop]) for crop, _ in files]
    for (_, file), crop in zip(files, render_crops(model, signal, rngs), strict=True):
        np.save(file, crop)
    return plan.length * len(files)


def _init_worker(model: FeatureModel) -> None:
    global _worker_model
    _worker_model = model


def _write_features(
    tmp: Path,
    spec: DatasetSpec,
    plans: dict[str, list[VideoPlan]],
    paths: dict[str, list[PurePosixPath]],
    model: FeatureModel,
    seed: int,
    workers: int,
) -> dict[str, int]:
    """Save every (video, crop) file under tmp/features; returns snippet rows per split."""
    jobs = []
    for split_id, split in enumerate(SPLITS):
        for index, (plan, path) in enumerate(zip(plans[split], paths[split], strict=True)):
            rel = PurePosixPath(*path.parts[-spec.path_components :])
            (tmp / FEATURES / rel).parent.mkdir(parents=True, exist_ok=True)
            files = [(c, tmp / FEATURES / _crop_file(rel, c)) for c in _crops(spec, split)]
            jobs.append(
                (
                    split,
                    (
                        None if workers > 1 else model,
                        spec.frames_per_snippet,
                        seed,
                        split_id,
                        index,
                        plan,
                        files,
                    ),
                )
            )
    rows = {split: 0 for split in SPLITS}
    step = max(1, len(jobs) // 10)
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(model,)) as pool:
            done = pool.map(_render_files, [job for _, job in jobs], chunksize=8)
            for i, ((split, _), n) in enumerate(zip(jobs, done, strict=True)):
                rows[split] += n
                if (i + 1) % step == 0:
                    logger.info("features: %d/%d videos", i + 1, len(jobs))
    else:
        for i, (split, job) in enumerate(jobs):
            rows[split] += _render_files(job)
            if (i + 1) % step == 0:
                logger.info("features: %d/%d videos", i + 1, len(jobs))
    return rows


def _write_list(
    file: Path,
    plans: list[VideoPlan],
    paths: list[PurePosixPath],
    crops: list[int],
) -> None:
    lines = ["path,label"] + [
        f"{_crop_file(path, c)},{plan.label}"
        for plan, path in zip(plans, paths, strict=True)
        for c in crops
    ]
    file.write_bytes("".join(line + "\r\n" for line in lines).encode())  # CRLF like the real lists


def _write_gt(lists: Path, spec: DatasetSpec, plans: list[VideoPlan]) -> None:
    """gt_segment / gt_label: pickled 1-D object arrays of lists, one per test row."""
    segments = np.empty(len(plans), dtype=object)
    labels = np.empty(len(plans), dtype=object)
    for i, plan in enumerate(plans):
        if plan.is_normal:  # real files: one int pair [0, 16 T] labelled gt_normal_label
            segments[i] = [[0, plan.length * spec.frames_per_snippet]]
            labels[i] = [spec.gt_normal_label]
        else:  # real files: the annotation's strings, in annotation order
            segments[i] = [[str(s.start), str(s.end)] for s in plan.segments]
            labels[i] = [s.label for s in plan.segments]
    np.save(lists / spec.gt_segments, segments, allow_pickle=True)
    np.save(lists / spec.gt_labels, labels, allow_pickle=True)


def _merged(plan: VideoPlan) -> list[tuple[int, int]]:
    """Union of a video's segments as sorted, disjoint intervals (the binary annotation)."""
    merged: list[list[int]] = []
    for s in sorted(plan.segments, key=lambda s: s.start):
        if merged and s.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s.end)
        else:
            merged.append([s.start, s.end])
    return [(s, e) for s, e in merged]


def _write_annotation(file: Path, spec: DatasetSpec, plans: list[VideoPlan]) -> None:
    if spec.annotation_format == "xd":  # anomalous videos only, no newline after the last line
        lines = [
            " ".join([p.name] + [f"{s} {e}" for s, e in _merged(p)])
            for p in plans
            if not p.is_normal
        ]
        file.write_text("\n".join(lines))
        return
    lines = []
    for p in plans:  # "<video>  <class>  s1  e1  s2  e2  ", -1 where there is no segment
        pairs = [v for s, e in _merged(p) for v in (s, e)]
        if len(pairs) > 4:
            raise ValueError(f"{p.name}: the {spec.name!r} annotation holds at most 2 segments")
        label = spec.normal_label if p.is_normal else p.segments[0].label
        fields = [p.name, label] + [str(v) for v in pairs + [-1] * (4 - len(pairs))]
        lines.append("  ".join(fields) + "  ")
    file.write_text("\n".join(lines) + "\n")


def _counts(plans: list[VideoPlan], crops: list[int], snippets: int) -> dict[str, int]:
    normal = sum(p.is_normal for p in plans)
    return {
        "videos": len(plans),
        "normal": normal,
        "anomalous": len(plans) - normal,
        "multi_label": sum(len(p.classes) > 1 for p in plans),
        "files": len(plans) * len(crops),
        "snippets": snippets,  # feature rows over all files
    }


def _positive_rate(spec: DatasetSpec, plans: list[VideoPlan]) -> float:
    fps16 = spec.frames_per_snippet
    total = sum(p.length * fps16 for p in plans)
    positive = sum(
        min(e, p.length * fps16) - min(s, p.length * fps16) for p in plans for s, e in _merged(p)
    )
    return round(positive / total, 4)


def main_synth(argv: Sequence[str] | None = None) -> int:
    """`python -m dsanet synth --preset xd-mini --out DIR [--seed N] [--scale X] ...`."""
    presets = sorted(load_calibration()["presets"])
    parser = argparse.ArgumentParser(
        prog="dsanet synth", description="Write a synthetic benchmark in the VadCLIP format."
    )
    parser.add_argument("--preset", required=True, choices=presets)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the video counts")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering features")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier synth tree")
    args = parser.parse_args(argv)
    generate(args.preset, args.out, args.seed, args.scale, args.workers, args.overwrite)
    return 0
