"""Length handling against the reference fixture, lists, ground truth, splits, cache, batches."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, write_tiny_tree

from dsanet.cache import open_train
from dsanet.config import DataConfig
from dsanet.data import (
    chunk_lengths,
    epoch_batches,
    iterate_batches,
    load_gt_segments,
    read_list,
    resample,
    split_by_video,
    split_chunks,
)
from dsanet.datasets import load_spec
from dsanet.loading import load_data
from dsanet.npyio import load_object_list


@pytest.fixture(scope="module")
def feature_fixture():
    arrays = np.load(FIXTURES / "features_seed0.npz")
    expected = json.loads((FIXTURES / "features_seed0.json").read_text())["expected"]
    return arrays, expected


def test_resample_long_matches_reference(feature_fixture):
    arrays, expected = feature_fixture
    out, length = resample(arrays["long"], expected["visual_length"])
    np.testing.assert_allclose(out, arrays["long_resampled"], atol=1e-6, rtol=0)
    assert length == expected["long_length"]


def test_resample_short_pads(feature_fixture):
    arrays, expected = feature_fixture
    out, length = resample(arrays["short"], 256)
    np.testing.assert_array_equal(out, arrays["short_padded"])
    assert length == expected["short_length"]


def test_split_chunks_matches_reference(feature_fixture):
    arrays, expected = feature_fixture
    chunks, length = split_chunks(arrays["mid"], 256)
    np.testing.assert_array_equal(chunks, arrays["mid_split"])
    assert length == expected["mid_length"]
    short, short_len = split_chunks(arrays["short"], 256)
    assert short.shape == (1, 256, 32)
    np.testing.assert_array_equal(short[0], arrays["short_split"])
    assert short_len == expected["short_split_length"]


def test_resample_bins_are_integer_edges():
    # DESIGN §11: T_v = 300 -> edges floor(i*300/256), each row a bin mean.
    features = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    out, length = resample(features, 256)
    edges = [i * 300 // 256 for i in range(257)]
    naive = np.stack([features[edges[i] : edges[i + 1]].mean(0) for i in range(256)])
    np.testing.assert_allclose(out, naive, atol=1e-6)
    assert length == 256


def test_chunk_lengths_drop_empty_chunk():
    assert chunk_lengths(512).tolist() == [256, 256]  # Q-D3 fixed: no all-padding chunk
    assert chunk_lengths(700).tolist() == [256, 256, 188]
    assert chunk_lengths(5).tolist() == [5]
    assert split_chunks(np.ones((512, 4), np.float32))[0].shape == (2, 256, 4)


def test_read_list_reroots_paths(tiny_tree):
    spec = load_spec("xd")
    videos = read_list(tiny_tree["lists"] / spec.train_list, tiny_tree["features"], spec)
    assert len(videos) == 50
    assert all(p.parent == tiny_tree["features"] for p in videos.paths)
    assert videos.videos[0] == "fightA__#00-00-00_00-01-00_label_B1-0-0"
    # B2-G-0 is multi-label: indices of B2 and G.
    assert videos.targets[10].tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert videos.targets[20].tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_ucf_labels_and_two_path_components(tmp_path):
    spec = load_spec("ucf")
    lists = tmp_path / "l.csv"
    lists.write_text(
        "path,label\r\n/x/UCF/Abuse/Abuse001_x264__0.npy,Abuse\r\n"
        "/x/UCF/Training_Normal_Videos_Anomaly/N1_x264__0.npy,Normal\r\n"
    )
    videos = read_list(lists, tmp_path, spec)
    assert videos.paths[0] == tmp_path / "Abuse" / "Abuse001_x264__0.npy"
    assert videos.targets[0].argmax() == 1 and videos.targets[1].argmax() == 0


def test_load_data_ground_truth_and_split(tiny_tree):
    cfg = DataConfig(
        list_dir=str(tiny_tree["lists"]),
        feature_root=str(tiny_tree["features"]),
        cache_dir=str(tiny_tree["cache"]),
        val_fraction=0.5,
    )
    bundle = load_data(cfg, 256, 512)
    lengths = bundle.test.packed.lengths
    assert lengths.tolist() == [520, 100, 256]
    assert len(bundle.test.gt_frames) == 16 * lengths.sum()
    gt = bundle.test.gt_frames[: 520 * 16]
    assert gt[:32].sum() == 0 and gt[32:160].all() and gt[160:4000].sum() == 0
    assert gt[4000:].all()  # cut at the video's last frame
    assert bundle.test.gt_frames[520 * 16 :].sum() == 0
    assert bundle.train.features.shape == (50, 256, 512)
    assert bundle.train.lengths[0] == 256 and bundle.train.lengths[20] == 120
    train_videos = {bundle.train_list.videos[i] for i in bundle.train_rows}
    val_videos = {bundle.train_list.videos[i] for i in bundle.val_rows}
    assert train_videos and val_videos and not train_videos & val_videos
    assert len(bundle.train_rows) + len(bundle.val_rows) == 50


def test_split_by_video_is_disjoint_stratified_and_seeded():
    rng = np.random.default_rng(0)
    names, targets = [], []
    for video in range(200):
        label = np.zeros(7, np.float32)
        label[rng.integers(0, 7)] = 1
        for _crop in range(10):
            names.append(f"v{video}")
            targets.append(label)
    targets = np.stack(targets)
    train, val = split_by_video(tuple(names), targets, 0.2, seed=3)
    assert not {names[i] for i in train} & {names[i] for i in val}
    assert len(train) + len(val) == 2000 and len(val) % 10 == 0
    for c in range(7):  # every class is represented on both sides in proportion
        share = targets[val, c].sum() / targets[:, c].sum()
        assert 0.1 < share < 0.3
    again = split_by_video(tuple(names), targets, 0.2, seed=3)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, split_by_video(tuple(names), targets, 0.2, seed=4)[1])


def test_cache_is_reused_and_rebuilt_when_inputs_change(tiny_tree):
    spec = load_spec("xd")
    videos = read_list(tiny_tree["lists"] / spec.train_list, tiny_tree["features"], spec)
    first = open_train(tiny_tree["cache"], videos, 256, 512)
    folders = sorted(p.name for p in tiny_tree["cache"].iterdir() if p.is_dir())
    assert len(folders) == 1
    again = open_train(tiny_tree["cache"], videos, 256, 512)
    np.testing.assert_array_equal(first.features[3], again.features[3])
    path = videos.paths[3]
    np.save(path, np.zeros((10, 512), np.float32))
    os.utime(path, ns=(1, 1))
    rebuilt = open_train(tiny_tree["cache"], videos, 256, 512)
    assert rebuilt.lengths[3] == 10 and not rebuilt.features[3].any()
    assert len([p for p in tiny_tree["cache"].iterdir() if p.is_dir()]) == 2
    assert not list(tiny_tree["cache"].glob(".*tmp*"))  # nothing half-written left behind


def test_cache_build_failure_leaves_nothing(tiny_tree):
    spec = load_spec("xd")
    videos = read_list(tiny_tree["lists"] / spec.train_list, tiny_tree["features"], spec)
    np.save(videos.paths[25], np.full((5, 512), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        open_train(tiny_tree["cache"], videos, 256, 512)
    assert not [p for p in tiny_tree["cache"].iterdir() if p.is_dir()]


def test_epoch_batches_mixed_and_paired():
    targets = np.zeros((50, 3), np.float32)
    targets[:20, 0] = 1
    targets[20:, 1] = 1
    rows = np.arange(50)
    mixed = epoch_batches(rows, targets, "mixed", 16, seed=1, epoch=0)
    assert [len(b) for b in mixed] == [16, 16, 16, 2]
    assert sorted(np.concatenate(mixed).tolist()) == rows.tolist()
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            mixed, epoch_batches(rows, targets, "mixed", 16, seed=1, epoch=0), strict=False
        )
    )
    paired = epoch_batches(rows, targets, "paired", 8, seed=1, epoch=2)
    assert len(paired) == 2  # min(20, 30) // 8
    for batch in paired:
        assert (targets[batch[:8], 0] == 1).all() and (targets[batch[8:], 0] == 0).all()


def test_iterate_batches_gathers_in_request_order():
    features = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    lengths = np.arange(6)
    targets = np.eye(6, dtype=np.float32)
    batch = next(iterate_batches(features, lengths, targets, [np.array([4, 1, 5])]))
    np.testing.assert_array_equal(batch.features, features[[4, 1, 5]])
    assert batch.lengths.tolist() == [4, 1, 5]


def _tree_with(tmp_path: Path, mutate) -> DataConfig:
    tree = write_tiny_tree(tmp_path / "t")
    mutate(tree)
    return DataConfig(
        list_dir=str(tree["lists"]),
        feature_root=str(tree["features"]),
        cache_dir=str(tree["cache"]),
        val_fraction=0.5,
    )


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def _save_objects(path: Path, entries: list) -> None:
    """A 1-D object array of lists, pickled by np.save as VadCLIP's gt files are."""
    array = np.empty(len(entries), dtype=object)
    for index, entry in enumerate(entries):
        array[index] = entry
    np.save(path, array, allow_pickle=True)


def _replace_entry(path: Path, index: int, value) -> None:
    entries = load_object_list(path)
    entries[index] = value
    _save_objects(path, entries)


def _replace_segments(path: Path, index: int, pairs: list) -> None:
    _replace_entry(path, index, pairs)


class _MkdirPayload:
    """Unpickling this calls os.mkdir(marker): a stand-in for whatever code a pickle may run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant_payload(path: Path, marker: Path) -> None:
    """Keep a gt file's entries but hide a payload in the first, as a tampered mirror could."""
    _replace_entry(path, 0, [[_MkdirPayload(marker), "160"]])


def _rewrite_bytes(path: Path, old: bytes, new: bytes) -> None:
    path.write_bytes(path.read_bytes().replace(old, new, 1))


def _cut(path: Path, keep: int) -> None:
    """Keep the first `keep` bytes (all but -keep when negative), as an interrupted copy does."""
    path.write_bytes(path.read_bytes()[:keep])


def _calm(tree: dict[str, Path]) -> Path:
    return next(tree["features"].glob("calmC*__3.npy"))


def _write_npz(path: Path) -> None:
    with path.open("wb") as handle:  # np.savez given a path would append .npz
        np.savez(handle, features=np.zeros((5, 512), np.float32))


def _write_header_only(path: Path, shape: tuple[int, ...]) -> None:
    """A float32 .npy header claiming `shape`, then 64 bytes of data."""
    with path.open("wb") as handle:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(bytes(64))


def _damage_cache(tree: dict[str, Path], damage) -> None:
    """Build the training cache a run of the tiny tree opens, then damage its folder."""
    spec = load_spec("xd")
    videos = read_list(tree["lists"] / spec.train_list, tree["features"], spec)
    open_train(tree["cache"], videos, 256, 512)
    damage(next(p for p in tree["cache"].iterdir() if p.is_dir()))


BAD_DATA = {
    "feature root missing": (
        lambda t: None,
        {"feature_root": "/nonexistent/feat"},
        "data.feature_root",
    ),
    "list dir unset": (lambda t: None, {"list_dir": ""}, "data.list_dir is not set"),
    "train list missing": (
        lambda t: (t["lists"] / "xd_CLIP_rgb.csv").unlink(),
        {},
        "xd_CLIP_rgb.csv not found",
    ),
    "list empty": (
        lambda t: (t["lists"] / "xd_CLIP_rgb.csv").write_text("path,label\n"),
        {},
        "no rows",
    ),
    "list wrong columns": (
        lambda t: (t["lists"] / "xd_CLIP_rgb.csv").write_text("file,y\na,b\n"),
        {},
        "header must be 'path,label'",
    ),
    "unknown label": (
        lambda t: _rewrite(t["lists"] / "xd_CLIP_rgb.csv", ",B1-0-0", ",B3-0-0"),
        {},
        "names no known class",
    ),
    "npy missing": (
        lambda t: next(t["features"].glob("calmC*__3.npy")).unlink(),
        {},
        "calmC.*not found",
    ),
    "npy corrupt": (
        lambda t: next(t["features"].glob("calmC*__3.npy")).write_bytes(b"junk"),
        {},
        "cannot be read",
    ),
    "npy wrong width": (
        lambda t: np.save(
            next(t["features"].glob("calmC*__3.npy")), np.zeros((5, 100), np.float32)
        ),
        {},
        r"\(T>=1, 512\)",
    ),
    "npy zero rows": (
        lambda t: np.save(
            next(t["features"].glob("calmC*__3.npy")), np.zeros((0, 512), np.float32)
        ),
        {},
        r"\(T>=1, 512\)",
    ),
    "npy inf": (
        lambda t: np.save(
            next(t["features"].glob("testN*")), np.full((5, 512), np.inf, np.float32)
        ),
        {},
        "NaN or inf",
    ),
    "npy nan": (
        lambda t: np.save(
            next(t["features"].glob("testM*")), np.full((5, 512), np.nan, np.float32)
        ),
        {},
        "NaN or inf",
    ),
    "gt segment beyond video": (
        lambda t: _replace_segments(t["lists"] / "gt_segment.npy", 1, [[2000, 2100]]),
        {},
        r"gt_segment.npy, entry 1 \('testN.*starts after the video's last frame \(1600 frames",
    ),
    "annotation beyond video": (
        lambda t: _rewrite(t["lists"] / "annotations.txt", "4000 9000", "8400 9000"),
        {},
        r"'testA.*\[8400, 9000\) starts after its last frame .* 8320 frames",
    ),
    "cache dir not creatable": (
        lambda t: (t["features"].parent / "plain-file").write_text("x"),
        {"cache_dir": "{features}/../plain-file/cache"},
        r"cannot create the feature cache folder .*set data.cache_dir",
    ),
    "gt and test list differ": (
        lambda t: _save_objects(t["lists"] / "gt_label.npy", [["A"], ["A"]]),
        {},
        "in step",
    ),
    "annotation missing a video": (
        lambda t: (t["lists"] / "annotations.txt").write_text(""),
        {},
        "no line in the annotation",
    ),
    "unknown dataset preset": (lambda t: None, {"dataset": "kinetics"}, "preset name"),
    "list not UTF-8": (
        lambda t: _rewrite_bytes(t["lists"] / "xd_CLIP_rgb.csv", b"fightA", b"fight\xc4"),
        {},
        r"xd_CLIP_rgb.csv: not UTF-8 text: byte 0x\w\w at line 2 \(byte offset 48\) .*save the",
    ),
    "list NUL byte": (
        lambda t: _rewrite_bytes(t["lists"] / "xd_CLIP_rgb.csv", b",B2-G-0", b",B2\0-G-0"),
        {},
        r"xd_CLIP_rgb.csv, line 12: a NUL byte",
    ),
    "list field over the csv limit": (
        lambda t: (t["lists"] / "xd_CLIP_rgb.csv").write_text(f"path,label\n{'a' * 200_000},A\n"),
        {},
        r"xd_CLIP_rgb.csv, line 2: not a readable CSV \(field larger than field limit",
    ),
    "annotation not UTF-8": (
        lambda t: _rewrite_bytes(t["lists"] / "annotations.txt", b"\n", b"\ncaf\xe9 1 2\n"),
        {},
        r"annotation file .*annotations.txt: not UTF-8 text: byte 0x\w\w at line 2 \(byte",
    ),
    "gt pickle payload": (
        lambda t: _plant_payload(t["lists"] / "gt_segment.npy", t["lists"] / "payload-ran"),
        {},
        r"gt_segment.npy was refused: its pickle asks for '(posix|nt)\.mkdir'.*nothing in the "
        r"file was run; re-download the VadCLIP lists from a source you trust; this file asks "
        r"to run code",
    ),
    "gt numeric": (
        lambda t: np.save(t["lists"] / "gt_segment.npy", np.zeros((3, 2), np.int64)),
        {},
        r"gt_segment.npy holds a <i8 array of shape \(3, 2\); expected a 1-D object array",
    ),
    "gt segment not frame pairs": (
        lambda t: _replace_segments(t["lists"] / "gt_segment.npy", 1, [["start", "end"]]),
        {},
        r"gt_segment.npy, entry 1: \[\['start', 'end'\]\] is not a list of \[start, end\] frame",
    ),
    "gt segment of three values": (
        lambda t: _replace_segments(t["lists"] / "gt_segment.npy", 2, [[0, 16, 32]]),
        {},
        r"gt_segment.npy, entry 2: \[\[0, 16, 32\]\] is not a list of \[start, end\] frame",
    ),
    "gt label not strings": (
        lambda t: _replace_entry(t["lists"] / "gt_label.npy", 0, [1, 2]),
        {},
        r"gt_label.npy, entry 0: \[1, 2\] is not a list of class-label strings",
    ),
    "gt labels out of step with segments": (
        lambda t: _replace_entry(t["lists"] / "gt_label.npy", 0, ["B1"]),
        {},
        r"gt_label.npy, entry 0: 1 labels for the 2 segments of .*gt_segment.npy",
    ),
    "gt truncated": (
        lambda t: _cut(t["lists"] / "gt_segment.npy", 150),
        {},
        r"gt_segment.npy has damaged pickled data",
    ),
    "gt not npy": (
        lambda t: (t["lists"] / "gt_label.npy").write_bytes(b"<html>mirror error</html>"),
        {},
        r"gt_label.npy cannot be read as .npy",
    ),
    "npy is an npz": (
        lambda t: _write_npz(_calm(t)),
        {},
        r"calmC.*is a zip archive \(an .npz\?\), not a .npy array",
    ),
    "npy of strings": (
        lambda t: np.save(_calm(t), np.full((5, 512), "x")),
        {},
        r"calmC.*has dtype '<U1'; expected a float, int or bool array",
    ),
    "npy header claims a petabyte": (
        lambda t: _write_header_only(_calm(t), (2**40, 256)),
        {},
        r"calmC.*is truncated: 64 bytes of 1125899906842624 after its header",
    ),
    "npy truncated": (
        lambda t: _cut(_calm(t), -100),
        {},
        r"calmC.*is truncated: \d+ bytes of \d+ after its header.*re-extract or re-copy it",
    ),
    "cache file truncated": (
        lambda t: _damage_cache(t, lambda folder: _cut(folder / "features.npy", 4096)),
        {},
        r"feature cache file .*/(train-\w+)/features.npy is truncated: .*the feature cache "
        r".*/\1 is damaged: delete that folder and the next run rebuilds it",
    ),
    "cache file missing": (
        lambda t: _damage_cache(t, lambda folder: (folder / "lengths.npy").unlink()),
        {},
        r"/(train-\w+)/lengths.npy cannot be opened .*/\1 is damaged: delete that folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_inputs_fail_clearly(tmp_path, case):
    mutate, changes, message = BAD_DATA[case]
    cfg = _tree_with(tmp_path, mutate)
    changes = {k: v.format(features=cfg.feature_root) for k, v in changes.items()}
    cfg = DataConfig(**{**cfg.__dict__, **changes})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_data(cfg, 256, 512)


@pytest.mark.parametrize("past", [0, 15, 16])
def test_gt_may_start_in_the_dropped_partial_snippet(tmp_path, past):
    # Features hold whole 16-frame snippets; the raw frames of a last partial one (up to 15)
    # are still annotated, so a gt start there is real data, one snippet further is not.
    def starting_at(start: int, end: int):
        def mutate(t):
            _replace_segments(t["lists"] / "gt_segment.npy", 1, [[1600 + start, 1600 + end]])
            _rewrite(t["lists"] / "annotations.txt", "4000 9000", f"{8320 + start} {8320 + end}")

        return mutate

    cfg = _tree_with(tmp_path / "past", starting_at(past, 100))
    if past >= 16:
        with pytest.raises(ValueError, match=r"gt_segment.npy, entry 1 .*starts after"):
            load_data(cfg, 256, 512)
        return
    gt = load_data(cfg, 256, 512).test.gt_frames
    empty = load_data(_tree_with(tmp_path / "empty", starting_at(0, 0)), 256, 512).test.gt_frames
    np.testing.assert_array_equal(gt, empty)  # nothing past the features is marked


def test_pickle_payload_in_gt_file_runs_no_code(tiny_tree):
    path, marker = tiny_tree["lists"] / "gt_segment.npy", tiny_tree["lists"] / "payload-ran"
    _plant_payload(path, marker)
    assert len(np.load(path, allow_pickle=True)) == 3  # still looks like a gt file, and yet
    assert marker.is_dir()  # reading it as numpy does ran the payload
    marker.rmdir()
    with pytest.raises(ValueError, match=re.escape(f"{path} was refused")):
        load_object_list(path)
    with pytest.raises(ValueError, match="this file asks to run code"):
        load_gt_segments(tiny_tree["lists"], load_spec("xd"), 3)
    assert not marker.exists()


def test_list_errors_quote_a_bounded_part_of_the_file(tmp_path):
    spec = load_spec("xd")
    path = tmp_path / "list.csv"
    path.write_text(f"{'p' * 5000},label\n")
    with pytest.raises(ValueError, match="header must be 'path,label', found") as header:
        read_list(path, tmp_path, spec)
    path.write_text(f"path,label\n{'q' * 5000}\n")
    with pytest.raises(ValueError, match="line 2: expected 'path,label'") as row:
        read_list(path, tmp_path, spec)
    assert len(str(header.value)) < 300 and len(str(row.value)) < 300
