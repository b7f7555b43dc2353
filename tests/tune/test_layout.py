"""tune/layout.py: the study folder's names. They are what existing studies hold on disk, so they
are spelled out here: a changed name would keep `--resume` from finding a study's files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dsanet.config import load_config
from tune import layout
from tune.layout import StudyFolder, read_base, where


def test_the_names_on_disk_never_change(tmp_path: Path):
    folder = StudyFolder(tmp_path)
    paths = {
        folder.base_yaml: "base.yaml",
        folder.data_dir: "data",
        folder.optuna_db: "optuna.db",
        folder.mlflow_db: "mlflow.db",
        folder.ray_dir: "ray",
        folder.trials_dir: "trials",
        folder.trial_dir(12): "trials/12",
        folder.final_dir: "final",
        folder.seed_dir(7): "final/seed_7",
        folder.final_summary: "final/summary.json",
        folder.report_dir("space"): "report/space",
        folder.report_dir("study"): "report/study",
        folder.report_dir("best"): "report/best",
    }
    assert {str(p.relative_to(tmp_path)): name for p, name in paths.items()} == {
        n: n for n in paths.values()
    }
    assert (layout.REPORTS_FILE, layout.STATE_FILES) == ("reports.jsonl", ("last.pt", "best.pt"))
    assert (layout.RUN_CONFIG, layout.MLFLOW_ARTIFACTS) == ("config.yaml", "mlartifacts")


def test_uris_and_a_relative_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    folder = StudyFolder("studies/demo")  # a str is taken as a path
    assert folder.root == Path("studies/demo")
    assert folder.optuna_uri == f"sqlite:///{tmp_path.resolve()}/studies/demo/optuna.db"
    assert folder.mlflow_uri == "sqlite:///studies/demo/mlflow.db"
    with pytest.raises(ValueError, match="one of space, study, best"):
        folder.report_dir("plots")


def test_names_the_trainer_defines_agree():
    """The layout spells out names the trainer owns (the driver must not import torch)."""
    from dsanet import trainer

    assert layout.STATE_FILES == (trainer.CHECKPOINT, trainer.BEST)
    assert layout.RUN_CONFIG == trainer.CONFIG
    assert trainer.RESULT == layout.RESULT_FILE


def test_final_stage_folders_are_the_layouts(tmp_path: Path):
    from tune.final import final_configs

    configs = final_configs(load_config("demo"), tmp_path, seeds=2)
    folder = StudyFolder(tmp_path.resolve())
    assert {s: Path(c.train.out_dir) for s, c in configs.items()} == {
        s: folder.seed_dir(s) for s in configs
    }


def test_read_base_reads_what_the_driver_wrote(tmp_path: Path):
    base = load_config("demo", {"optim.lr": 0.0123})
    folder = StudyFolder(tmp_path)
    folder.base_yaml.write_text(base.to_yaml())
    assert read_base(folder) == base


def test_where_names_the_folders_and_masks_the_tracking_uri(tmp_path: Path):
    spec = SimpleNamespace(name="demo", mlflow=SimpleNamespace(experiment="dsanet-demo"))
    run = tmp_path / "ray" / "run-1"
    plan = SimpleNamespace(root=tmp_path, spec=spec, tracking_uri="http://me:pw@host:5000")
    plan.ray_dir = run
    text = where(plan, "mlflow ui")
    assert "pw" not in text and "http://***@host:5000" in text
    assert f"{run}/<ray id>/  (this run's; error.txt" in text
    assert f"{tmp_path / 'trials'}/<trial>/" in text and "reports.jsonl" in text
    assert f"sqlite:///{tmp_path.resolve() / 'optuna.db'}  (study demo)" in text
