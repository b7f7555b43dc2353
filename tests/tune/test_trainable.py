"""tune/trainable.py without a Ray study: the config a worker builds, what it reports, and how
a (re)started trial reports again the epochs its folder holds before training on. Ray's trial
API (`get_context`, `report`) is replaced by stand-ins; checkpoints are real torch files."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import dsanet.trainer
import tune.trainable as trainable
from dsanet.config import load_config
from tune.layout import StudyFolder
from tune.searcher import REPORTED_KEY, STEP_KEY
from tune.trainable import STUDY_KEY, append_report, read_trial_config, report_lines


def _study(root: Path, **overrides: Any) -> StudyFolder:
    folder = StudyFolder(root)
    root.mkdir(parents=True, exist_ok=True)
    folder.base_yaml.write_text(load_config("demo", overrides).to_yaml())
    return folder


def _ray_config(folder: StudyFolder, **sampled: Any) -> dict[str, Any]:
    return {STUDY_KEY: {"dir": str(folder.root), "max_t": 3}, "_optuna_trial": 4, **sampled}


def _record(epoch: int) -> dict[str, float]:
    return {"epoch": float(epoch), "seconds": 0.5, "val_ap": 0.25 * (epoch + 1)}


def _sent(monkeypatch) -> list[dict]:
    """What the trainable reports to Ray, in order."""
    sent: list[dict] = []
    monkeypatch.setattr(trainable.tune, "report", lambda metrics: sent.append(metrics))
    return sent


def _last_pt(folder: Path, epochs: int) -> None:
    """A trainer checkpoint after `epochs` epochs, as far as a restart reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"history": [_record(e) for e in range(epochs)]}, folder / "last.pt")


def test_trial_config_is_the_base_with_the_sampled_values(tmp_path: Path):
    folder = _study(tmp_path / "study", **{"train.seed": 11})
    config = _ray_config(folder, **{"optim.lr": 0.0042, "model": {"attn_window": 8}})
    out = folder.trial_dir(4)
    cfg = read_trial_config(config, out)
    assert cfg.optim.lr == 0.0042 and cfg.model.attn_window == 8  # nested keys read as dotted
    assert cfg.train.seed == 11 and Path(cfg.train.out_dir) == out  # the base, the folder
    assert out == tmp_path / "study" / "trials" / "4"  # keyed by the Optuna number
    assert cfg.model.visual_width == load_config("demo").model.visual_width


def test_reporter_writes_each_epoch_then_reports_it(tmp_path: Path, monkeypatch):
    out, sent = tmp_path / "trial", _sent(monkeypatch)
    out.mkdir()
    reporter = trainable._Reporter(out, {"optuna_trial": 4}, entered=123.0)
    for epoch in (0, 1):
        assert reporter(_record(epoch), out) is False  # fit never stops a trial by itself
    lines = report_lines(out)
    assert [(x["epoch"], x["resumed_at"], x.get("entered")) for x in lines] == [
        (0, 0, 123.0),  # the first line of a (re)start says where it started
        (1, -1, None),
    ]
    assert [(m["epoch"], m[STEP_KEY], m["optuna_trial"]) for m in sent] == [(0, 1, 4), (1, 2, 4)]
    assert [m[REPORTED_KEY] for m in sent] == [x["time"] for x in lines]  # the line Ray gets


def test_a_restart_reports_the_epochs_its_folder_holds_once_each(tmp_path: Path, monkeypatch):
    out, sent = tmp_path / "trial", _sent(monkeypatch)
    _last_pt(out, epochs=3)  # killed after epoch 2's checkpoint, before its line
    times = [append_report(out, _record(e)) for e in (0, 1)]
    with (out / "reports.jsonl").open("a") as damaged:
        damaged.write('{"epoch": 1, "time": \n')  # a line cut by the kill
    reporter = trainable._Reporter(out, {"optuna_trial": 4}, entered=50.0)
    assert reporter.replay() == 3
    lines = report_lines(out)
    assert [x["epoch"] for x in lines] == [0, 1, 2]  # one line per epoch: 2's is new
    assert (lines[2]["resumed_at"], lines[2]["entered"]) == (2, 50.0)
    assert [(m["epoch"], m[STEP_KEY]) for m in sent] == [(0, 1), (1, 2), (2, 3)]
    assert [m[REPORTED_KEY] for m in sent] == [*times, lines[2]["time"]]  # old lines' times
    reporter(_record(3), out)  # training goes on: no second start mark
    assert report_lines(out)[3]["resumed_at"] == -1 and sent[-1][STEP_KEY] == 4


def test_a_new_trial_replays_nothing(tmp_path: Path, monkeypatch):
    sent = _sent(monkeypatch)
    assert trainable._Reporter(tmp_path, {}, entered=0.0).replay() == 0 and not sent


def test_a_trial_whose_folder_holds_max_t_epochs_just_reports_them(tmp_path: Path, monkeypatch):
    folder = _study(tmp_path / "study")
    _last_pt(folder.trial_dir(4), epochs=3)  # max_t: finished, the driver never told
    sent = _sent(monkeypatch)
    monkeypatch.setattr(trainable, "_claim_resources", pytest.fail)  # no training starts
    stub = SimpleNamespace(fit=pytest.fail, load_checkpoint=dsanet.trainer.load_checkpoint)
    monkeypatch.setitem(sys.modules, "dsanet.trainer", stub)
    trainable.run_trial(_ray_config(folder))
    assert [m[STEP_KEY] for m in sent] == [1, 2, 3]


def test_a_damaged_last_pt_is_one_clear_error(tmp_path: Path, monkeypatch):
    out = tmp_path / "trial"
    out.mkdir()
    (out / "last.pt").write_bytes(b"cut short")
    _sent(monkeypatch)
    with pytest.raises(ValueError, match="last.pt is not a torch.save file"):
        trainable._Reporter(out, {}, entered=0.0).replay()


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


def test_a_node_that_does_not_see_the_study_folder_fails_saying_so(tmp_path: Path):
    missing = StudyFolder(tmp_path / "node-local")  # no base.yaml: not the driver's folder
    with pytest.raises(FileNotFoundError, match="not visible on this node.*shared file system"):
        trainable.run_trial(_ray_config(missing))
    assert not missing.root.exists()  # nothing written
