"""`python -m dsanet` on bad input, in-process: one short `error:` message that names the file or
field and the fix, exit status 2, and no file of an existing run changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import one_error, tiny_run_overrides, write_tiny_tree

from dsanet.cli import main
from dsanet.config import load_config
from dsanet.loading import load_data
from dsanet.trainer import BEST, CHECKPOINT, CONFIG, RESULT, fit


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_finished) -> tuple[list[str], Path]:
    """The overrides of a 1-epoch tiny run with model.num_prototypes=4, and its folder (the
    session's, shared with test_evaluate and test_plots: copy it before changing it)."""
    return tiny_finished


def _copy_run(finished_run, tmp_path) -> tuple[list[str], Path]:
    overrides, out = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return [o for o in overrides if not o.startswith("train.out_dir=")] + [
        f"train.out_dir={copy}"
    ], copy


@pytest.mark.parametrize(
    "change, field",
    [
        ("model.num_prototypes=8", "model.num_prototypes 4 -> 8"),  # another model size
        ("optim.lr=0.001", "optim.lr 0.0001 -> 0.001"),  # a run that had finished
    ],
)
def test_train_with_another_config_changes_no_file_of_the_run(
    finished_run, tmp_path, capsys, change, field
):
    overrides, run = _copy_run(finished_run, tmp_path)
    before = snapshot(run)
    status = main(["train", "--config", "demo", *overrides, change])
    one_error(capsys, status, field, str(run), "--restart", "train.out_dir")
    assert snapshot(run) == before


def test_train_without_checkpoint_checks_the_runs_config(finished_run, tmp_path, capsys):
    overrides, run = _copy_run(finished_run, tmp_path)
    (run / CHECKPOINT).unlink()  # a finished final-stage seed keeps config.yaml and best.pt only
    before = snapshot(run)
    status = main(["train", "--config", "demo", *overrides, "loss.w_align=2"])
    one_error(capsys, status, "loss.w_align", "--restart")
    assert snapshot(run) == before


def test_a_relocated_run_resumes(finished_run, tmp_path):
    overrides, run = _copy_run(finished_run, tmp_path)
    moved = tmp_path / "moved-cache"
    overrides = [o for o in overrides if not o.startswith("data.cache_dir=")]
    result = fit(load_config("demo", [*overrides, f"data.cache_dir={moved}"]))
    assert len(result.history) == 1  # the finished epoch was kept, not trained again


def test_evaluate_repeats_the_runs_test_metrics(finished_run, capsys):
    _, run = finished_run
    saved = json.loads((run / RESULT).read_text())["test"]
    for path in (run / BEST, run):  # a checkpoint, or the run folder
        assert main(["evaluate", "--checkpoint", str(path)]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(saved, rel=1e-6, abs=1e-9)


def test_evaluate_val_split_of_a_final_protocol_run(finished_run, tmp_path, capsys):
    _, run = _copy_run(finished_run, tmp_path)
    cfg = load_config(run / CONFIG, ["data.protocol=final"])
    (run / CONFIG).write_text(cfg.to_yaml())
    status = main(["evaluate", "--checkpoint", str(run / BEST), "--split", "val"])
    one_error(capsys, status, "data.protocol=final", "--split test")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: {num_prototypes: 4\n", "not valid YAML"),
        ("model:\n  num_prototypes: 4\nmodel:\n  num_prototypes: 5\n", "model"),
        ("- a list\n", "mapping"),
    ],
)
def test_evaluate_with_a_broken_run_config(finished_run, tmp_path, capsys, text, needle):
    _, run = _copy_run(finished_run, tmp_path)
    (run / CONFIG).write_text(text)
    status = main(["evaluate", "--checkpoint", str(run / BEST)])
    one_error(capsys, status, str(run / CONFIG), needle)


def _drop_rows(csv: Path, keep) -> None:
    lines = csv.read_bytes().decode().split("\r\n")
    csv.write_bytes("\r\n".join([lines[0], *filter(keep, lines[1:])]).encode())


@pytest.mark.parametrize(
    "change, overrides, needles",
    [
        (
            lambda lists: _drop_rows(lists / "xd_CLIP_rgb.csv", lambda r: r[-2:] == ",A"),
            [],
            ["xd_CLIP_rgb.csv", "training rows hold only normal videos"],
        ),
        (
            lambda lists: _drop_rows(lists / "xd_CLIP_rgb.csv", lambda r: r[-2:] != ",A"),
            ["data.protocol=final"],
            ["xd_CLIP_rgb.csv", "only anomalous"],
        ),
        (  # 0.2 of each anomalous class set (1 or 2 videos) rounds to none
            lambda lists: None,
            ["data.val_fraction=0.2"],
            ["validation split", "hold no videos", "data.split_seed"],
        ),
        (
            lambda lists: _drop_rows(lists / "xd_CLIP_rgbtest.csv", lambda r: r[-2:] != ",A"),
            [],
            ["xd_CLIP_rgbtest.csv", "test list hold only anomalous"],
        ),
    ],
)
def test_data_that_cannot_give_the_metrics_is_refused(tmp_path, capsys, change, overrides, needles):
    data = write_tiny_tree(tmp_path / "tiny")
    change(data["lists"])
    argv = tiny_run_overrides(data, tmp_path / "run") + ["data.val_fraction=0.5", *overrides]
    if "xd_CLIP_rgbtest.csv" in needles[0]:  # the gt files follow the test list
        import numpy as np

        for name in ("gt_segment.npy", "gt_label.npy"):
            values = np.load(data["lists"] / name, allow_pickle=True)[:1]
            np.save(data["lists"] / name, values, allow_pickle=True)
    status = main(["train", "--config", "demo", *argv])
    one_error(capsys, status, *needles)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_load_data_accepts_both_kinds(tmp_path):
    data = write_tiny_tree(tmp_path / "tiny")
    cfg = load_config(
        "demo", tiny_run_overrides(data, tmp_path / "run") + ["data.val_fraction=0.5"]
    )
    bundle = load_data(cfg.data, 64, 512)
    normal = bundle.train.targets[bundle.val_rows, 0] == 1
    assert normal.any() and not normal.all()
