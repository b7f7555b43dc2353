"""Synthetic benchmark generator: on-disk format, calibration, determinism, hardness, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dsanet import synth
from dsanet.config import DataConfig
from dsanet.datasets import DatasetSpec, load_spec
from dsanet.loading import load_data
from dsanet.synth import SynthSummary, generate, main_synth
from dsanet.synth_features import build_feature_model, model_params, render_crops, render_video
from dsanet.synth_layout import Segment, VideoPlan, load_calibration, plan_dataset, resolve_preset


@pytest.fixture(scope="module")
def trees(synth_mini) -> Callable[[str], SynthSummary]:
    """`trees("xd")`: xd-mini (or ucf-mini) of seed 0, the session's, made at its first use."""
    return synth_mini


# The tests of the whole mini benchmarks are slow: generating xd-mini takes 11 s here and
# ucf-mini 5 s (the default suite's budget is 90 s); the generator's own tests below are not.
on_mini_trees = pytest.mark.slow


def read_list(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        return [(r["path"], r["label"]) for r in csv.DictReader(f)]


def feature_file(spec: DatasetSpec, summary: SynthSummary, list_path: str) -> Path:
    """The loader's re-rooting: keep the last `path_components` parts, join to feature_root."""
    return summary.feature_root.joinpath(*PurePosixPath(list_path).parts[-spec.path_components :])


def video_name(list_path: str) -> str:
    return PurePosixPath(list_path).name.rsplit("__", 1)[0]


def read_annotation(spec: DatasetSpec, path: Path) -> dict[str, list[tuple[int, int]]]:
    out = {}
    for line in path.read_text().splitlines():
        t = line.split()
        if spec.annotation_format == "xd":
            out[t[0]] = [(int(t[j]), int(t[j + 1])) for j in range(1, len(t), 2)]
        else:
            v = list(map(int, t[2:6]))
            out[t[0]] = [(v[k], v[k + 1]) for k in (0, 2) if v[k] != -1]
    return out


@on_mini_trees
@pytest.mark.parametrize("name", ["xd", "ucf"])
def test_tree_counts(trees: Callable[[str], SynthSummary], name: str) -> None:
    summary, spec = trees(name), load_spec(name)
    record = json.loads((summary.out / synth.MARKER).read_text())
    assert record["complete"] and record["preset"] == f"{name}-mini"
    files = sorted(summary.feature_root.rglob("*.npy"))
    counts = summary.counts
    assert counts["train"]["files"] == counts["train"]["videos"] * spec.crops
    assert len(files) == counts["train"]["files"] + counts["test"]["files"]
    assert 120 <= counts["train"]["videos"] <= 200 and 60 <= counts["test"]["videos"] <= 100
    assert not list(summary.out.parent.glob(".*tmp-*"))


@on_mini_trees
@pytest.mark.parametrize("name", ["xd", "ucf"])
def test_lists_match_the_real_format(trees: Callable[[str], SynthSummary], name: str) -> None:
    summary, spec = trees(name), load_spec(name)
    for split, crops in (("train", list(range(spec.crops))), ("test", [spec.test_crop])):
        raw = (summary.list_dir / getattr(spec, f"{split}_list")).read_bytes()
        assert raw.startswith(b"path,label\r\n") and raw.count(b"\n") == raw.count(b"\r\n")
        rows = read_list(summary.list_dir / getattr(spec, f"{split}_list"))
        normal = [spec.parse_label(label) == (0,) for _, label in rows]
        assert normal == sorted(normal) and 0 < sum(normal) < len(rows)  # anomalous rows first
        for i in range(0, len(rows), len(crops)):
            block = rows[i : i + len(crops)]
            assert [int(p.rsplit("__", 1)[1][:-4]) for p, _ in block] == crops
            assert len({video_name(p) for p, _ in block}) == 1 and len({lb for _, lb in block}) == 1
        for path, _ in rows[:: max(1, len(rows) // 7)]:
            assert path.startswith("/synthetic/")
            x = np.load(feature_file(spec, summary, path))
            assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 512
            assert np.allclose(np.linalg.norm(x, axis=1).mean(), 10.0, rtol=0.05)


@on_mini_trees
@pytest.mark.parametrize("name", ["xd", "ucf"])
def test_gt_and_annotation(trees: Callable[[str], SynthSummary], name: str) -> None:
    summary, spec = trees(name), load_spec(name)
    rows = read_list(summary.list_dir / spec.test_list)
    segments = np.load(summary.list_dir / spec.gt_segments, allow_pickle=True)
    labels = np.load(summary.list_dir / spec.gt_labels, allow_pickle=True)
    assert segments.dtype == object and segments.shape == (len(rows),) == labels.shape
    annotation = read_annotation(spec, summary.list_dir / spec.annotation)
    fps16 = spec.frames_per_snippet
    for (path, label), segs, labs in zip(rows, segments, labels, strict=True):
        length = np.load(feature_file(spec, summary, path), mmap_mode="r").shape[0]
        assert isinstance(segs, list) and len(segs) == len(labs)
        if spec.parse_label(label) == (0,):
            assert segs == [[0, length * fps16]] and labs == [spec.gt_normal_label]
            assert annotation.get(video_name(path), []) == []
            continue
        classes = {spec.class_labels[c] for c in spec.parse_label(label)}
        assert set(labs) == classes
        pairs = [(int(s), int(e)) for s, e in segs]
        assert all(isinstance(v, str) for pair in segs for v in pair)
        # Like the real annotations, ends may pass 16 T by < 16 frames (raw frame count).
        assert all(0 <= s < e <= (length + 1) * fps16 for s, e in pairs)
        mask = np.zeros((length + 1) * fps16, dtype=bool)
        for s, e in pairs:
            mask[s:e] = True
        binary = np.zeros_like(mask)
        for s, e in annotation[video_name(path)]:
            binary[s:e] = True
        assert (mask == binary).all()
    text = (summary.list_dir / spec.annotation).read_text()
    assert text.endswith("\n") == (spec.annotation_format == "ucf")


@on_mini_trees
def test_xd_mini_has_multilabel_and_chunking_cases(trees: Callable[[str], SynthSummary]) -> None:
    summary, spec = trees("xd"), load_spec("xd")
    assert (
        summary.counts["train"]["multi_label"] >= 3 and summary.counts["test"]["multi_label"] >= 2
    )
    rows = read_list(summary.list_dir / spec.test_list)
    lengths = [np.load(feature_file(spec, summary, p), mmap_mode="r").shape[0] for p, _ in rows]
    assert {256, 512} <= set(lengths) and sum(t > 256 for t in lengths) >= 3
    assert any("v=x__" in p for p, _ in rows)  # a YouTube id with "__", as in the real lists


@pytest.mark.slow  # generates two trees byte for byte
def test_same_seed_same_bytes(tmp_path: Path) -> None:
    runs = {  # "b" renders in two worker processes: the bytes must not depend on that
        k: generate("xd-mini", tmp_path / k, seed=s, scale=0.15, workers=w)
        for k, s, w in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1))
    }
    spec = load_spec("xd")
    rel = [f"lists/{spec.train_list}", f"lists/{spec.gt_segments}", f"lists/{spec.annotation}"]
    first = next(iter(sorted((tmp_path / "a" / "features").iterdir())))
    rel.append(f"features/{first.name}")
    for r in rel:
        assert (tmp_path / "a" / r).read_bytes() == (tmp_path / "b" / r).read_bytes(), r
    assert (tmp_path / "a" / rel[0]).read_bytes() != (tmp_path / "c" / rel[0]).read_bytes()
    assert runs["a"].counts == runs["b"].counts


def test_layout_does_not_depend_on_hash_seed() -> None:
    """Names and segments must not follow set order, which PYTHONHASHSEED changes."""
    code = (
        "import numpy as np; from dsanet.datasets import load_spec; "
        "from dsanet.synth_layout import plan_dataset, resolve_preset; "
        "print(plan_dataset(load_spec('ucf'), resolve_preset('ucf-mini'), "
        "np.random.default_rng(0)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2)
    }
    assert len(outputs) == 1


def test_scaled_full_keeps_the_mix() -> None:
    spec, calibration = load_spec("xd"), load_calibration()["datasets"]["xd"]
    plans = plan_dataset(spec, resolve_preset("xd-full", 0.05), np.random.default_rng(0))
    for split in ("train", "test"):
        real = calibration["labels"][split]
        n_real = sum(real.values())
        assert len(plans[split]) == round(0.05 * n_real)
        normal = sum(p.is_normal for p in plans[split]) / len(plans[split])
        assert normal == pytest.approx(real["A"] / n_real, abs=0.02)
        for c in range(1, spec.num_classes):
            want = sum(n for lb, n in real.items() if c in spec.parse_label(str(lb))) / n_real
            got = sum(c in p.classes for p in plans[split]) / len(plans[split])
            assert got == pytest.approx(want, abs=0.03), spec.class_labels[c]
        assert any(len(p.classes) == 2 for p in plans[split])


def test_full_preset_generates(tmp_path: Path) -> None:
    summary = generate("ucf-full", tmp_path / "ucf", scale=0.01)
    assert summary.counts["train"]["videos"] == 16 and summary.counts["test"]["videos"] == 3


@pytest.mark.parametrize("length", [1, 2, 5])
def test_very_short_videos_render(length: int) -> None:
    spec = load_spec("xd")
    params = model_params("xd", load_calibration())
    model = build_feature_model(spec, params, np.random.default_rng(0))
    frames = length * spec.frames_per_snippet
    plan = VideoPlan("v", None, "B1-0-0", (1,), length, frames, (Segment(0, frames, "B1"),))
    signal = render_video(model, plan, spec.frames_per_snippet, np.random.default_rng(1))
    crops = render_crops(model, signal, [np.random.default_rng(2), np.random.default_rng(3)])
    assert crops.shape == (2, length, 512) and crops.dtype == np.float32


@on_mini_trees
@pytest.mark.parametrize("name", ["xd", "ucf"])
def test_trivial_scorer_is_beatable(trees: Callable[[str], SynthSummary], name: str) -> None:
    """Projection on the train mean anomaly direction: clearly above chance, far from perfect."""
    summary, spec = trees(name), load_spec(name)
    train = [r for r in read_list(summary.list_dir / spec.train_list) if r[0].endswith("__0.npy")]
    means = np.stack([np.load(feature_file(spec, summary, p)).mean(0) for p, _ in train])
    anomalous = np.array([spec.parse_label(label) != (0,) for _, label in train])
    direction = means[anomalous].mean(0) - means[~anomalous].mean(0)
    annotation = read_annotation(spec, summary.list_dir / spec.annotation)
    scores, truth = [], []
    for path, _ in read_list(summary.list_dir / spec.test_list):
        x = np.load(feature_file(spec, summary, path))
        gt = np.zeros(len(x) * spec.frames_per_snippet)
        for s, e in annotation.get(video_name(path), []):
            gt[s : min(e, len(gt))] = 1
        scores.append(np.repeat(x @ direction, spec.frames_per_snippet))
        truth.append(gt)
    auc = roc_auc_score(np.concatenate(truth), np.concatenate(scores))
    assert 0.6 < auc < 0.95


def test_errors_and_replacement(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        generate("xd-huge", tmp_path / "x")
    for bad in (0, -1, 1e300, float("nan")):
        with pytest.raises(ValueError, match=r"--scale .*: give a multiplier .* in \(0, 100"):
            generate("xd-mini", tmp_path / "x", scale=bad)
    with pytest.raises(ValueError, match=r"--seed -1: give a seed in \[0, 2\*\*32\)"):
        generate("xd-mini", tmp_path / "x", seed=-1)
    with pytest.raises(ValueError, match="--workers 0: give 1 to 256"):
        generate("xd-mini", tmp_path / "x", workers=0)
    assert not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a synthetic benchmark"):
        generate("xd-mini", tmp_path / "mine", scale=0.1)
    generate("xd-mini", tmp_path / "s", scale=0.1)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate("xd-mini", tmp_path / "s", scale=0.1)
    summary = generate("xd-mini", tmp_path / "s", seed=1, scale=0.1, overwrite=True)
    assert json.loads((tmp_path / "s" / synth.MARKER).read_text())["seed"] == summary.seed == 1


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_annotation", fail)
    with pytest.raises(KeyboardInterrupt):
        generate("ucf-mini", tmp_path / "u", scale=0.1)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert (
        main_synth(
            [
                "--preset",
                "ucf-mini",
                "--out",
                str(out),
                "--scale",
                "0.1",
                "--seed",
                "2",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    record = json.loads((out / synth.MARKER).read_text())
    assert record["seed"] == 2 and record["feature_root"] == "features"
    with pytest.raises(SystemExit):
        main_synth(["--preset", "nope", "--out", str(out)])


@pytest.mark.parametrize(
    "preset",
    # xd-full is generated; ucf-mini's feature files are all read and cached (6 s here)
    [pytest.param(preset, marks=pytest.mark.slow) for preset in ("xd-full", "ucf-mini")],
)
def test_loader_reads_synthetic_trees_like_real_ones(tmp_path, preset, synth_mini):
    """The data loader on generated trees (beside the tests of the trees: with `--dist loadfile`
    this module's worker builds the session's ucf-mini once)."""
    if preset == "xd-full":
        summary = generate(preset, tmp_path / preset, seed=1, scale=0.03)
    else:  # the session's whole ucf-mini (seed 0), which test_synth checks too
        summary = synth_mini("ucf")
    spec = load_spec(preset.split("-")[0])
    cfg = DataConfig(
        dataset=spec.name,
        list_dir=str(summary.list_dir),
        feature_root=str(summary.feature_root),
        cache_dir=str(tmp_path / "cache"),
    )
    bundle = load_data(cfg, 256, 512)
    counts = summary.counts
    assert len(bundle.train_list) == counts["train"]["files"]
    assert len(bundle.test.videos) == counts["test"]["videos"]
    lengths = bundle.test.packed.lengths
    assert lengths.sum() == counts["test"]["snippets"]
    for index in (0, len(lengths) - 1):  # lengths come from the feature files themselves
        assert np.load(bundle.test.videos.paths[index]).shape[0] == lengths[index]
    assert len(bundle.test.gt_frames) == spec.frames_per_snippet * lengths.sum()
    assert bundle.test.gt_frames.mean() == pytest.approx(summary.test_positive_rate, abs=1e-4)
    assert bundle.test.gt_frames[: 16 * lengths[0]].any()  # anomalous rows come first
