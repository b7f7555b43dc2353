"""Tests for dsanet.metrics: fixture parity, a naive loop reference, hand-built mAP cases."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dsanet import metrics
from dsanet.datasets import load_spec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
DATA = REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------- naive reference


def _naive_runs(marked: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for f in range(len(marked) + 1):
        on = f < len(marked) and bool(marked[f])
        if on and start is None:
            start = f
        elif not on and start is not None:
            runs.append((start, f))
            start = None
    return runs


def _naive_class_ap(predictions, gt_segments, gt_labels, class_names, theta):
    """The reference algorithm as plain loops with set IoU: (AP per class, proposals per class)."""
    kappas, cleaned = [], []
    for p in predictions:
        ranked = -np.sort(-p, axis=0)  # every column descending, as the reference sorts them
        k = p.shape[0] // 16
        kappa = ranked[:k].mean(axis=0) if k else np.full(p.shape[1], np.nan, p.dtype)
        kappas.append(kappa)
        cleaned.append(p * (kappa > 0))
    aps, counts = [], []
    for c, name in enumerate(class_names):
        proposals = []
        for v, p in enumerate(cleaned):
            col = p[:, c]
            cut = np.max(col) - (np.max(col) - np.min(col)) * np.float64(0.6)
            rows = [
                [v, s, e, np.max(col[s:e]) + 0.7 * kappas[v][c]]
                for s, e in _naive_runs(col > cut)
                if e - s >= 2
            ]
            if rows:
                rows = np.array(rows)
                proposals.extend(rows[np.argsort(-rows[:, 3])])
        counts.append(len(proposals))
        if not proposals:
            aps.append(0.0)
            continue
        proposals = np.array(proposals)
        proposals = proposals[np.argsort(-proposals[:, 3])]
        gts = [
            [v, s, e]
            for v in range(len(gt_segments))
            for (s, e), label in zip(gt_segments[v], gt_labels[v], strict=True)
            if label == name
        ]
        num_gt = len(gts)
        tp = []
        for v, s, e, _ in proposals:
            mine = set(range(int(s), int(e)))
            best, best_j = 0.0, None
            for j, (gv, gs, ge) in enumerate(gts):
                if gv != v:
                    continue
                theirs = set(range(int(gs), int(ge)))
                iou = len(mine & theirs) / len(mine | theirs)
                if iou >= theta and iou > best:
                    best, best_j = iou, j
            if best_j is not None:
                del gts[best_j]
            tp.append(0.0 if best_j is None else 1.0)
        tp = np.array(tp)
        if tp.sum() == 0:
            aps.append(0.0)
        else:
            tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1.0 - tp)
            aps.append(np.sum(tp_cum / (fp_cum + tp_cum) * tp) / num_gt)
    return np.array(aps), counts


def _naive_map(predictions, gt_segments, gt_labels, class_names, thresholds):
    result = []
    for theta in thresholds:
        aps, counts = _naive_class_ap(predictions, gt_segments, gt_labels, class_names, theta)
        result.append(0.0 if min(counts) == 0 else float(100 * np.mean(aps)))
    return result


def _random_case(seed: int):
    """Random videos with multi-segment gt, built to hit the tie-breaking paths.

    Values are continuous, coarse (tied peaks across videos) or a 0/1 comb (many runs with tied
    scores inside one video); some videos are ragged or under 16 frames; gt bounds are often on
    an 8-frame grid (tied IoUs), as strings or ints, and sometimes unknown labels.
    """
    rng = np.random.default_rng(seed)
    class_names = ("N", "B1", "B2", "G")[: int(rng.integers(2, 5))]
    num_classes = len(class_names)
    dtype = np.float32 if seed % 3 else np.float64
    predictions, segments, labels = [], [], []
    for _ in range(int(rng.integers(3, 9))):
        style = rng.integers(0, 3)
        snippets = int(rng.integers(1, 40 if style == 2 else 12))
        values = rng.random((snippets, num_classes))
        if style == 1:
            values = np.round(values * 4) / 4
        elif style == 2:
            values = np.round(values)
        frames = np.repeat(values, 16, axis=0).astype(dtype)
        if rng.random() < 0.3:
            frames = frames[: int(rng.integers(1, len(frames) + 1))]
        grid = 8 if rng.random() < 0.5 else 1
        video_segments, video_labels = [], []
        for _ in range(int(rng.integers(0, 5))):
            start = grid * int(rng.integers(0, len(frames) // grid + 1))
            end = start + grid * int(rng.integers(1, 64 // grid))
            c = int(rng.integers(0, num_classes))
            frames[start:end, c] += dtype(0.5)  # signal inside the segment, for some hits
            video_segments.append([str(start), str(end)] if rng.random() < 0.5 else [start, end])
            video_labels.append(class_names[c] if rng.random() < 0.9 else "A")
        predictions.append(frames)
        segments.append(video_segments)
        labels.append(video_labels)
    return predictions, segments, labels, class_names


# ----------------------------------------------------------------------------- fixture parity


@pytest.fixture(scope="module")
def xd_fixture():
    with np.load(FIXTURES / "xd_metrics_seed0.npz") as npz:
        arrays = dict(npz)  # NpzFile would re-read an array on every access
    meta = json.loads((FIXTURES / "xd_metrics_seed0.json").read_text())
    offsets = arrays["offsets"]
    probs = arrays["probs_modulated"]
    rows = [slice(offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
    return {
        "arrays": arrays,
        "meta": meta,
        "rows": rows,
        "frame_probs": [np.repeat(probs[r], 16, axis=0) for r in rows],
        "gt_segments": np.load(DATA / "xd" / "gt_segment.npy", allow_pickle=True),
        "gt_labels": np.load(DATA / "xd" / "gt_label.npy", allow_pickle=True),
    }


def test_fixture_frame_auc_ap(xd_fixture):
    arrays, expected = xd_fixture["arrays"], xd_fixture["meta"]["expected"]
    det = torch.sigmoid(torch.from_numpy(arrays["logits_det"]))[:, 0].numpy()
    auc, ap = metrics.frame_auc_ap(metrics.snippets_to_frames(det, 16), arrays["gt_frames"])
    assert auc == pytest.approx(expected["auc_det"], abs=1e-6)
    assert ap == pytest.approx(expected["ap_det"], abs=1e-6)
    modulated = 1 - arrays["probs_modulated"][:, 0]
    auc, ap = metrics.frame_auc_ap(
        [metrics.snippets_to_frames(modulated[r], 16) for r in xd_fixture["rows"]],
        arrays["gt_frames"],
    )
    assert auc == pytest.approx(expected["auc_mod"], abs=1e-6)
    assert ap == pytest.approx(expected["ap_mod"], abs=1e-6)


def test_fixture_map(xd_fixture):
    """In process: equal up to the order of exactly tied scores (see the next test)."""
    expected = xd_fixture["meta"]["expected"]
    result = metrics.detection_map(
        xd_fixture["frame_probs"],
        xd_fixture["gt_segments"],
        xd_fixture["gt_labels"],
        xd_fixture["meta"]["classes"],
        expected["iou"],
    )
    np.testing.assert_allclose(result, expected["map"], rtol=0, atol=1e-5)
    assert np.mean(result) == pytest.approx(expected["map_avg"], abs=1e-5)


def test_fixture_map_exact_with_fixture_sort_kernels():
    """Exact parity (1e-6) with numpy's sort kernels of the machine that made the fixture.

    Float32 proposal scores tie exactly (75 of class 0's 20,988 proposals here), and numpy's
    default argsort, which the reference uses (Q-M5), orders ties differently with its AVX-512
    kernels than with its AVX2 ones: 1.7e-6 apart at IoU 0.1. The fixture came from an AVX2
    path, so the check runs in a subprocess with numpy's (>= 2) AVX-512 dispatch targets disabled.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the fixture's tie order comes from numpy's x86 AVX2 sort kernels")
    from numpy._core._multiarray_umath import __cpu_dispatch__

    disabled = " ".join(f for f in __cpu_dispatch__ if "AVX512" in f or f == "X86_V4")
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from dsanet import metrics
        fixtures, data = {str(FIXTURES)!r}, {str(DATA / "xd")!r}
        arrays = np.load(fixtures + "/xd_metrics_seed0.npz")
        meta = json.load(open(fixtures + "/xd_metrics_seed0.json"))
        offsets, probs = arrays["offsets"], arrays["probs_modulated"]
        frames = [np.repeat(probs[offsets[i]:offsets[i + 1]], 16, axis=0)
                  for i in range(len(offsets) - 1)]
        result = metrics.detection_map(
            frames, np.load(data + "/gt_segment.npy", allow_pickle=True),
            np.load(data + "/gt_label.npy", allow_pickle=True), meta["classes"],
            meta["expected"]["iou"])
        json.dump({{"map": result, "expected": meta["expected"]}}, sys.stdout)
    """)
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    out = json.loads(done.stdout)
    np.testing.assert_allclose(out["map"], out["expected"]["map"], rtol=0, atol=1e-6)
    assert np.mean(out["map"]) == pytest.approx(out["expected"]["map_avg"], abs=1e-6)


def test_belief_modulation_fixture(xd_fixture):
    from dsanet.model import belief_modulation

    arrays = xd_fixture["arrays"]
    probs = belief_modulation(
        torch.from_numpy(arrays["logits_det"]),
        torch.from_numpy(arrays["logits_align"]),
        xd_fixture["meta"]["temp"],
    )
    np.testing.assert_allclose(probs.numpy(), arrays["probs_modulated"], rtol=0, atol=1e-6)


def test_evaluate_videos_fixture(xd_fixture):
    arrays, meta = xd_fixture["arrays"], xd_fixture["meta"]
    rows, expected = xd_fixture["rows"], meta["expected"]
    result = metrics.evaluate_videos(
        [arrays["logits_det"][r] for r in rows],
        [arrays["logits_align"][r] for r in rows],
        spec=load_spec("xd"),
        temperature=meta["temp"],
        gt_frames=arrays["gt_frames"],
        gt_segments=xd_fixture["gt_segments"],
        gt_labels=xd_fixture["gt_labels"],
        iou_thresholds=expected["iou"],
    )
    assert tuple(result) == metrics.metric_keys(expected["iou"])
    assert result[metrics.AUC] == pytest.approx(expected["auc_det"], abs=1e-6)
    assert result[metrics.AP] == pytest.approx(expected["ap_det"], abs=1e-6)
    maps = [100 * result[metrics.map_key(t)] for t in expected["iou"]]  # fractions; fixture: %
    np.testing.assert_allclose(maps, expected["map"], rtol=0, atol=1e-5)  # tie order: see above
    assert 100 * result[metrics.MAP_AVG] == pytest.approx(expected["map_avg"], abs=1e-5)
    assert result[metrics.MAP_AVG_CORRECTED] == result[metrics.MAP_AVG]  # XD scores class 0


# ----------------------------------------------------------------------------- naive parity


@pytest.mark.parametrize("seed", range(24))
def test_matches_naive_reference(seed):
    predictions, segments, labels, class_names = _random_case(seed)
    thresholds = (0.1, 0.3, 0.5, 0.7)
    per_class = metrics.detection_ap_by_class(
        predictions, segments, labels, class_names, thresholds
    )
    for k, theta in enumerate(thresholds):
        aps, counts = _naive_class_ap(predictions, segments, labels, class_names, theta)
        assert per_class.ap[k].tolist() == aps.tolist()
        assert per_class.num_proposals.tolist() == counts
    assert per_class.reference_map() == _naive_map(
        predictions, segments, labels, class_names, thresholds
    )


def test_naive_cases_are_not_degenerate():
    """Most random cases yield proposals for every class and some hits."""
    scored = sum(max(metrics.detection_map(*_random_case(seed))) > 0 for seed in range(24))
    assert scored >= 20


# ----------------------------------------------------------------------------- hand-built cases


def _column(num_frames: int, runs: dict[tuple[int, int], float]) -> np.ndarray:
    """(num_frames, 1) zeros with the given [start, end) runs set to a value."""
    column = np.zeros((num_frames, 1))
    for (start, end), value in runs.items():
        column[start:end] = value
    return column


def test_iou_convention():
    # Proposal [16, 48) against gt [20, 50): |∩| = 28, |∪| = 34 on half-open frame sets.
    frames = _column(64, {(16, 48): 1.0})
    iou = 28 / 34
    result = metrics.detection_map(
        [frames], [[["20", "50"]]], [["X"]], ["X"], (iou, np.nextafter(iou, 1))
    )
    assert result == [100.0, 0.0]


def test_single_video_hit_and_false_positive():
    frames = _column(64, {(0, 16): 1.0, (32, 48): 0.8})  # ranked [0, 16) first, then [32, 48)
    assert metrics.detection_map([frames], [[[32, 48]]], [["X"]], ["X"], (0.5,)) == [50.0]
    assert metrics.detection_map([frames], [[[0, 16]]], [["X"]], ["X"], (0.5,)) == [100.0]
    assert metrics.detection_map([frames], [[[0, 48]]], [["X"]], ["X"], (0.5,)) == [0.0]


def test_match_removes_the_best_gt():
    # [0, 32) overlaps gt [0, 40) (IoU 0.8) and gt [0, 30) (IoU 0.9375): it takes [0, 30), so
    # [36, 40) can still hit [0, 40) at IoU exactly 0.1.
    frames = _column(64, {(0, 32): 1.0, (36, 40): 0.9})
    gt = [[[0, 40], [0, 30]]]
    assert metrics.detection_map([frames], gt, [["X", "X"]], ["X"], (0.1, 0.2)) == [100.0, 50.0]


def test_iou_tie_removes_the_first_listed_gt():
    # [16, 48) has IoU 32/48 with both [0, 48) and [16, 64); it takes [0, 48), listed first, so
    # [52, 64) still hits [16, 64) (IoU 0.25) at 0.2.
    frames = _column(64, {(16, 48): 1.0, (52, 64): 0.9})
    gt = [[[0, 48], [16, 64]]]
    assert metrics.detection_map([frames], gt, [["X", "X"]], ["X"], (0.2, 0.3)) == [100.0, 50.0]


def test_gt_of_other_videos_and_classes_never_match():
    # Same run in both videos; video 1 ranks first but its only gt is labelled Y (not a class).
    frames = [_column(64, {(0, 32): 0.8}), _column(64, {(0, 32): 1.0})]
    result = metrics.detection_ap_by_class(
        frames, [[[0, 32]], [[0, 32]]], [["X"], ["Y"]], ["X"], (0.5,)
    )
    assert result.ap.tolist() == [[0.5]]  # a miss (video 1), then a hit (video 0)
    assert result.num_gt.tolist() == [1] and result.num_proposals.tolist() == [2]


@pytest.mark.parametrize(
    "other",
    [np.full((64, 1), 0.3), _column(64, {(0, 8): 0.5}) - 1.0],
    ids=["constant", "confidence<=0"],
)
def test_no_proposal_returns_zero(other, caplog):
    frames = [np.concatenate([_column(64, {(0, 32): 1.0}), other], axis=1)]
    with caplog.at_level(logging.WARNING, logger="dsanet.detection"):
        result = metrics.detection_ap_by_class(frames, [[[0, 32]]], [["X"]], ["X", "Y"])
    assert result.reference_map() == [0.0] * 5  # Q-M3: one empty class zeroes every θ
    assert result.ap[:, 0].tolist() == [1.0] * 5  # the per-class AP is still there
    assert "Q-M3" in caplog.text and "'Y'" in caplog.text


def test_ucf_class0_never_matches():
    segments = np.load(DATA / "ucf" / "gt_segment_ucf.npy", allow_pickle=True)
    labels = np.load(DATA / "ucf" / "gt_label_ucf.npy", allow_pickle=True)
    spec = load_spec("ucf")
    fps = spec.frames_per_snippet
    rng = np.random.default_rng(0)
    index = {name: c for c, name in enumerate(spec.class_labels)}
    predictions = []
    for video_segments, video_labels in zip(segments, labels, strict=True):
        snippets = max(int(e) for _, e in video_segments) // fps + 4
        probs = rng.random((snippets, spec.num_classes)).astype(np.float32)
        for (start, end), label in zip(video_segments, video_labels, strict=True):
            probs[int(start) // fps : int(end) // fps, index.get(label, 0)] += 1.0
        predictions.append(metrics.snippets_to_frames(probs, fps))
    result = metrics.detection_ap_by_class(predictions, segments, labels, spec.class_labels)
    assert result.num_gt[0] == 0 and (result.num_gt[1:] > 0).all()
    assert (result.ap[:, 0] == 0).all() and (result.ap[:, 1:].sum(axis=1) > 0).all()
    reference, corrected = result.reference_map(), result.corrected_map()
    np.testing.assert_allclose(corrected, 100 * result.ap[:, 1:].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(reference, np.multiply(corrected, 13 / 14), rtol=1e-12)


# ----------------------------------------------------------------------------- helpers and errors


def test_metric_keys():
    assert metrics.map_key(0.1) == "map_iou10"
    assert metrics.map_key(0.3, corrected=True) == "map_iou30_corrected"
    keys = metrics.metric_keys()
    assert keys[:3] == ("auc", "ap", "map_iou10") and "map_avg" in keys
    assert keys[-1] == "map_avg_corrected" and len(set(keys)) == len(keys) == 14


def test_snippets_to_frames():
    scores = np.arange(6.0).reshape(3, 2)
    frames = metrics.snippets_to_frames(scores, 4)
    assert frames.shape == (12, 2) and frames[4:8].tolist() == [[2.0, 3.0]] * 4
    with pytest.raises(ValueError, match="frames_per_snippet must be a positive integer"):
        metrics.snippets_to_frames(scores, 0)


def test_frame_scores_are_the_ranked_scores_per_video():
    rng = np.random.default_rng(4)
    det = [rng.normal(size=(n, 1)).astype(np.float32) for n in (5, 1, 9)]
    scores = metrics.frame_scores(det, 4)
    assert [len(s) for s in scores] == [20, 4, 36] and all(s.dtype == np.float32 for s in scores)
    expected = 1 / (1 + np.exp(-det[2][1, 0].astype(np.float64)))
    np.testing.assert_allclose(scores[2][4:8], [expected] * 4, rtol=1e-6)
    assert metrics.frame_scores([torch.from_numpy(d) for d in det], 4)[0].tolist() == (
        scores[0].tolist()
    )


def test_evaluate_videos_softmax_matches_parts():
    spec = load_spec("xd")
    rng = np.random.default_rng(3)
    lengths = [5, 9, 4]
    det = [rng.normal(size=(n, 1)).astype(np.float32) for n in lengths]
    align = [rng.normal(size=(n, spec.num_classes)).astype(np.float32) for n in lengths]
    gt_frames = np.zeros(sum(lengths) * spec.frames_per_snippet, dtype=np.float32)
    gt_frames[10:40] = 1
    segments, labels = [[[10, 40]], [[0, 144]], [[16, 48]]], [["B1"], ["A"], ["G"]]
    result = metrics.evaluate_videos(
        det,
        align,
        spec=spec,
        temperature=1.0,
        gt_frames=gt_frames,
        gt_segments=segments,
        gt_labels=labels,
        class_probs="softmax",
    )
    scores = torch.sigmoid(torch.from_numpy(np.concatenate(det)))[:, 0].numpy()
    auc, ap = metrics.frame_auc_ap(metrics.snippets_to_frames(scores, 16), gt_frames)
    frames = [
        metrics.snippets_to_frames(torch.from_numpy(a).softmax(-1).numpy(), 16) for a in align
    ]
    percent = metrics.detection_map(frames, segments, labels, spec.class_labels)
    maps = [value / 100 for value in percent]  # evaluate_videos reports fractions
    assert (result[metrics.AUC], result[metrics.AP]) == (auc, ap)
    assert [result[metrics.map_key(t)] for t in metrics.DEFAULT_IOU_THRESHOLDS] == maps
    assert result[metrics.MAP_AVG] == pytest.approx(np.mean(maps))


def test_errors_name_the_problem():
    frames = [np.zeros((32, 2))]
    with pytest.raises(ValueError, match=r"video 0: shape \(32, 2\), expected \(frames > 0, 3\)"):
        metrics.detection_map(frames, [[[0, 1]]], [["X"]], ["X", "Y", "Z"])
    with pytest.raises(ValueError, match="2 gt segment lists and 2 label lists for 1 predicted"):
        metrics.detection_map(frames, [[], []], [[], []], ["X", "Y"])
    with pytest.raises(ValueError, match="1 segments but 2 labels"):
        metrics.detection_map(frames, [[[0, 1]]], [["X", "Y"]], ["X", "Y"])
    with pytest.raises(ValueError, match=r"iou_thresholds=\[0.0\]"):
        metrics.detection_map(frames, [[]], [[]], ["X", "Y"], (0.0,))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.detection_map([np.full((32, 2), np.nan)], [[]], [[]], ["X", "Y"])
    with pytest.raises(ValueError, match="3 frame scores but 2 gt frames"):
        metrics.frame_auc_ap(np.zeros(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="hold both values"):
        metrics.frame_auc_ap(np.zeros(2), np.zeros(2))
