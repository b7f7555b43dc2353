"""A search never looks at the test set: its trials train and validate, and only the final stage
tests, once per seed. Proved by a study whose test features are garbage until the final stage."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray_fixtures import MAX_T, tiny_overrides, write_space

from tune.driver import main


def listed_test_features(data: dict[str, Path]) -> list[str]:
    """File names of the test list's feature files."""
    with (data["lists"] / "xd_CLIP_rgbtest.csv").open(newline="") as handle:
        return [Path(row["path"]).name for row in csv.DictReader(handle)]


def no_test_key(value) -> bool:
    if isinstance(value, dict):
        return all(not str(k).startswith("test") and no_test_key(v) for k, v in value.items())
    if isinstance(value, list):
        return all(no_test_key(v) for v in value)
    return True


@pytest.mark.slow  # a 2-trial study, then a 2-seed final stage: about 2 min on 2 cores
def test_trials_never_read_the_test_set_and_the_final_stage_tests_once_per_seed(
    tmp_path, xd_small, local_ray, capsys
):
    names = listed_test_features(xd_small)
    apart = tmp_path / "test-features"  # data.test_feature_root: the test split lives apart
    apart.mkdir()
    for name in names:  # files that exist but any read of which fails the trial
        (apart / name).write_bytes(b"not a feature file")
    overrides = tiny_overrides(xd_small) | {
        "data.test_feature_root": str(apart),
        "data.cache_dir": str(tmp_path / "cache"),
    }
    space = write_space(
        tmp_path,
        xd_small,
        overrides=overrides,
        scheduler={"kind": "none"},  # every trial runs to its natural end, as FIFO studies do
        num_samples=2,
        points_to_evaluate=[],
    )
    argv = ["--space", str(space)]
    assert main([*argv, "--final-seeds", "0"]) == 0, capsys.readouterr().err
    root = tmp_path / "studies" / "t"
    results = sorted((root / "trials").glob("*/result.json"))
    assert len(results) == 2
    for path in results:
        result = json.loads(path.read_text())
        assert "test" not in result and no_test_key(result), path
        assert result["select_metric"] == "val_ap" and len(result["history"]) == MAX_T
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"t-{tmp_path.name}")
    trials = client.search_runs([experiment.experiment_id], "tags.`dsanet.stage` = 'search'")
    trial_runs = [r for r in trials if r.data.tags.get("dsanet.role") != "study"]
    assert len(trial_runs) == 2
    for run in trial_runs:
        assert not [k for k in run.data.metrics if k.startswith("test")], run.data.metrics
    (parent,) = [r for r in trials if r.data.tags.get("dsanet.role") == "study"]
    assert parent.data.tags["dsanet.protocol"] == "validation"

    for name in names:  # the final stage gets the real test set
        shutil.copy2(xd_small["features"] / name, apart / name)
    assert main([*argv, "--resume", "--final-seeds", "2"]) == 0, capsys.readouterr().err
    seeds = sorted((root / "final").glob("seed_*/result.json"))
    assert len(seeds) == 2
    for path in seeds:
        assert {"auc", "ap"} <= set(json.loads(path.read_text())["test"])
    finals = client.search_runs([experiment.experiment_id], "tags.`dsanet.stage` = 'final'")
    assert len(finals) == 2
    for run in finals:  # tested once: one value of each test metric, no more
        assert len(client.get_metric_history(run.info.run_id, "test_auc")) == 1
    plotted = json.loads((root / "report" / "best" / "metrics.json").read_text())
    assert plotted["model"].startswith("final-stage retrain, seed ")
