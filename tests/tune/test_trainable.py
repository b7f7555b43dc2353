"""tune/trainable.py without a Ray study: the config a worker builds, the checkpoint folder it
stages and restores, what it reports, and the disk hygiene when a trial ends. Ray's trial API
(`get_checkpoint`, `get_context`, `report`) is replaced by stand-ins; its Checkpoint is real."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune import Checkpoint

import tune.trainable as trainable
from dsanet.config import load_config
from tune.layout import StudyFolder
from tune.trainable import STUDY_KEY, SlimFinishedCheckpoints, read_trial_config, share_file

STATE = {"last.pt": b"full state", "best.pt": b"weights", "config.yaml": b"cfg: 1\n"}


def _files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _study(root: Path, **overrides: Any) -> StudyFolder:
    folder = StudyFolder(root)
    root.mkdir(parents=True, exist_ok=True)
    folder.base_yaml.write_text(load_config("demo", overrides).to_yaml())
    return folder


def _ray_config(folder: StudyFolder, **sampled: Any) -> dict[str, Any]:
    return {STUDY_KEY: {"dir": str(folder.root), "max_t": 3}, "_optuna_trial": 4, **sampled}


def test_trial_config_is_the_base_with_the_sampled_values(tmp_path: Path):
    folder = _study(tmp_path / "study", **{"train.seed": 11})
    config = _ray_config(folder, **{"optim.lr": 0.0042, "model": {"attn_window": 8}})
    out = folder.trial_dir("t1")
    cfg = read_trial_config(config, out)
    assert cfg.optim.lr == 0.0042 and cfg.model.attn_window == 8  # nested keys read as dotted
    assert cfg.train.seed == 11 and Path(cfg.train.out_dir) == out  # the base, the folder
    assert cfg.model.visual_width == load_config("demo").model.visual_width


def test_share_file_links_identical_bytes_only(tmp_path: Path):
    source, twin, other = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    source.write_bytes(b"weights" * 1000)
    twin.write_bytes(b"weights" * 1000)
    other.write_bytes(b"weightz" * 1000)
    assert share_file(source, twin) and twin.samefile(source) and source.stat().st_nlink == 2
    assert share_file(source, twin)  # already one file
    assert not share_file(source, other) and other.read_bytes() == b"weightz" * 1000
    assert not share_file(source, tmp_path / "missing.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]


def test_stage_links_the_state_and_counts_the_epochs(tmp_path: Path):
    out = _files(tmp_path / "trial", STATE)
    first = trainable._stage(out, epochs_done=1)
    (first / "stale.pt").write_bytes(b"from an earlier epoch")
    (out / "last.pt").unlink()  # e.g. a trial without a full-state file
    stage = trainable._stage(out, epochs_done=2)
    assert stage == out / ".checkpoint"
    assert sorted(p.name for p in stage.iterdir()) == ["best.pt", "config.yaml", "progress.json"]
    assert (stage / "best.pt").samefile(out / "best.pt")
    assert json.loads((stage / "progress.json").read_text()) == {"epochs": 2}


def test_reset_makes_the_folder_hold_rays_checkpoint(tmp_path: Path, monkeypatch):
    saved = _files(tmp_path / "checkpoint", STATE)
    (saved / "progress.json").write_text(json.dumps({"epochs": 2}))
    out = _files(tmp_path / "trial", {"last.pt": b"ahead", "best.pt": b"ahead", "x.txt": b"x"})
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: Checkpoint.from_directory(saved))
    assert trainable._reset_to_checkpoint(out) == 2
    assert (out / "last.pt").read_bytes() == b"full state" and (out / "best.pt").samefile(
        saved / "best.pt"
    )
    assert (out / "x.txt").is_file()  # only the state files are reset


def test_reset_without_a_checkpoint_empties_the_state(tmp_path: Path, monkeypatch):
    out = _files(tmp_path / "trial", {"last.pt": b"ahead", "best.pt": b"ahead"})
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    assert trainable._reset_to_checkpoint(out) == 0
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    assert trainable._reset_to_checkpoint(tmp_path / "new") == 0 and (tmp_path / "new").is_dir()


def test_reporter_reports_each_epoch_with_a_checkpoint(tmp_path: Path, monkeypatch):
    out = _files(tmp_path / "trial", STATE)
    sent: list[tuple[dict, Any]] = []

    def report(metrics: dict, checkpoint: Checkpoint) -> None:
        sent.append((metrics, checkpoint))

    monkeypatch.setattr(trainable.tune, "report", report)
    reporter = trainable._Reporter(out, {"optuna_trial": 4}, resumed_at=1, entered=123.0)
    for epoch in (1, 2):
        record = {"epoch": float(epoch), "seconds": 0.5, "val_ap": 0.25 * epoch}
        assert reporter(record, out) is False  # fit never stops a trial by itself
    assert [m["epoch"] for m, _ in sent] == [1, 2] and sent[1][0]["optuna_trial"] == 4
    assert Path(sent[1][1].path) == out / ".checkpoint"
    assert json.loads((out / ".checkpoint" / "progress.json").read_text()) == {"epochs": 3}
    lines = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["resumed_at"], x.get("entered")) for x in lines] == [
        (1, 1, 123.0),
        (2, -1, None),
    ]


def test_a_finished_trial_is_slimmed_to_one_copy_of_its_weights(tmp_path: Path):
    folder = StudyFolder(tmp_path / "study")
    saved = _files(tmp_path / "ray" / "t1" / "checkpoint_000002", STATE)
    out = _files(folder.trial_dir("t1"), {"best.pt": STATE["best.pt"], "config.yaml": b"c"})
    trial = SimpleNamespace(
        trial_id="t1",
        checkpoint=SimpleNamespace(path=str(saved)),
        config=_ray_config(folder),
    )
    SlimFinishedCheckpoints().on_trial_complete(0, [], trial)
    assert not (saved / "last.pt").exists() and (saved / "config.yaml").is_file()
    assert (out / "best.pt").samefile(saved / "best.pt")
    SlimFinishedCheckpoints().on_trial_complete(0, [], SimpleNamespace(checkpoint=None))


def test_a_trial_restored_after_it_finished_just_ends(tmp_path: Path, monkeypatch):
    folder = _study(tmp_path / "study")
    saved = _files(tmp_path / "checkpoint", {"best.pt": b"weights"})  # slimmed: no last.pt
    (saved / "progress.json").write_text(json.dumps({"epochs": 2}))
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: Checkpoint.from_directory(saved))
    context = SimpleNamespace(get_trial_id=lambda: "t1")
    monkeypatch.setattr(trainable.tune, "get_context", lambda: context)
    monkeypatch.setattr(trainable, "_claim_resources", pytest.fail)  # no training starts
    monkeypatch.setitem(sys.modules, "dsanet.trainer", SimpleNamespace(fit=pytest.fail))  # torch
    trainable.run_trial(_ray_config(folder))
    assert (folder.trial_dir("t1") / "best.pt").samefile(saved / "best.pt")


@pytest.mark.parametrize(("protocol", "test"), [("validation", False), ("reference", True)])
def test_bundle_reads_the_test_split_only_for_protocol_reference(protocol, test, monkeypatch):
    calls: list[tuple] = []

    def load_data(data, length, width, test):
        calls.append((data.protocol, length, test))
        return object()

    monkeypatch.setattr("dsanet.loading.load_data", load_data)
    monkeypatch.setattr(trainable, "_bundles", {})
    cfg = load_config("demo", {"data.protocol": protocol})
    bundle = trainable._bundle(cfg)
    assert trainable._bundle(cfg) is bundle  # kept by the worker
    other = cfg.with_overrides({"model.visual_length": cfg.model.visual_length * 2})
    assert trainable._bundle(other) is not bundle and len(trainable._bundles) == 1
    assert [c[2] for c in calls] == [test, test] and calls[0][1] == cfg.model.visual_length
