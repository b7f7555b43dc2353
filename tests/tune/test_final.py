"""Final stage on the tiny CPU model: 2 seeds in-process, summary, nested runs, plots, resume."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_run_overrides, write_space
from mlflow import MlflowClient

from tune.final import final_configs, run_final_stage, train_seeds
from tune.searcher import open_study
from tune.tracking import MlflowView


def tiny_space(tmp_path, xd_mini, uri: str, experiment: str = "final"):
    pairs = (o.split("=", 1) for o in tiny_run_overrides(xd_mini, tmp_path / "unused"))
    overrides = {k: yaml.safe_load(v) for k, v in pairs} | {"train.epochs": 1}
    return write_space(tmp_path, experiment, uri, overrides, scheduler={"kind": "none"})


def final_runs(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], "tags.`dsanet.stage` = 'final'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent_id}
    return runs


def test_final_configs_override_protocol_seed_and_folder(tmp_path):
    spec = write_space(tmp_path, "final-configs")
    configs = final_configs(spec.base, tmp_path / "study", 3)
    base = spec.base.train.seed
    assert list(configs) == [base, base + 1, base + 2]
    cfg = configs[base + 1]
    assert (cfg.data.protocol, cfg.data.val_fraction, cfg.train.seed) == ("final", 0.0, base + 1)
    assert cfg.train.out_dir == str((tmp_path / "study" / "final" / f"seed_{base + 1}").resolve())
    with pytest.raises(ValueError, match="at least 1 seed"):
        final_configs(spec.base, tmp_path, 0)


@pytest.mark.slow  # two tiny fits, ~1 min on 2 cores
def test_final_stage_two_seeds_then_resume(mlflow_server, tmp_path, xd_mini, capsys):
    spec = tiny_space(tmp_path, xd_mini, mlflow_server.uri)
    study = tmp_path / "study"
    open_study(spec, study)
    view = MlflowView(study, spec, mlflow_server.uri)
    parent_id = view.start()
    summary = run_final_stage(spec, spec.base, study, view, seeds=2)

    for key in ("auc", "ap", "map_avg", "map_avg_corrected"):
        assert {f"final_{key}_mean", f"final_{key}_std"} <= set(summary)
    assert "mean ± std" in capsys.readouterr().out
    client = MlflowClient(mlflow_server.uri)
    runs = final_runs(client, parent_id)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    first = min(runs, key=lambda r: int(r.data.tags["dsanet.seed"]))
    assert first.data.params["data.protocol"] == "final"
    (point,) = client.get_metric_history(first.info.run_id, "loss_total")
    seed_dir = study / "final" / f"seed_{spec.base.train.seed}"
    (line,) = [json.loads(t) for t in (seed_dir / "reports.jsonl").read_text().splitlines()]
    assert (point.step, point.timestamp) == (0, int(line["time"] * 1000))  # the epoch's report
    # The run was made while the seed trained (after its epoch), not once it had finished.
    assert first.info.start_time < (seed_dir / "result.json").stat().st_mtime * 1000
    assert "test_auc" in first.data.metrics
    files = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert files == {"best.pt", "config.yaml", "result.json"}
    parent = client.get_run(parent_id)
    assert parent.data.metrics["final_auc_mean"] == pytest.approx(summary["final_auc_mean"])
    best = {a.path for a in client.list_artifacts(parent_id, "best")}
    for name in ("videos.png", "roc.png", "pr.png", "confusion.png", "confusion.json"):
        assert f"best/{name}" in best
    result = json.loads((seed_dir / "result.json").read_text())
    # A finished seed keeps its weights, not the optimiser state it would only resume from.
    kept = ["best.pt", "config.yaml", "reports.jsonl", "result.json"]
    assert sorted(p.name for p in seed_dir.iterdir()) == kept
    plotted = json.loads((study / "report" / "best" / "metrics.json").read_text())
    assert plotted["frame_auc"] == pytest.approx(result["test"]["auc"], abs=1e-6)  # same model

    # a later session resumes the study
    stamp = (seed_dir / "result.json").stat().st_mtime_ns
    again = MlflowView(study, spec, mlflow_server.uri)
    assert again.start() == parent_id
    assert run_final_stage(spec, spec.base, study, again, seeds=2) == summary
    assert (seed_dir / "result.json").stat().st_mtime_ns == stamp  # not retrained
    assert len(final_runs(client, parent_id)) == 2
    assert len(client.get_metric_history(parent_id, "final_auc_mean")) == 1
    assert again.finish("FINISHED")
    assert client.get_run(parent_id).info.status == "FINISHED"


@pytest.mark.slow  # a Ray and a tiny fit in a worker
def test_seeds_as_ray_tasks_are_written_while_they_run_and_a_failure_is_failed(
    mlflow_server, tmp_path, xd_mini, local_ray
):
    spec = tiny_space(tmp_path, xd_mini, mlflow_server.uri, "final-ray")
    study = tmp_path / "study"
    open_study(spec, study)
    view = MlflowView(study, spec, mlflow_server.uri)
    parent_id = view.start()
    configs = final_configs(spec.base, study, 2)
    good, bad = sorted(configs)
    configs[bad] = configs[bad].with_overrides({"data.list_dir": str(tmp_path / "missing")})
    with pytest.raises(Exception, match="missing"):  # raised once every seed has ended
        train_seeds(configs, spec, view)

    client = MlflowClient(mlflow_server.uri)
    runs = {int(r.data.tags["dsanet.seed"]): r for r in final_runs(client, parent_id)}
    done, failed = runs[good], runs[bad]
    assert (done.info.status, done.info.run_name) == ("FINISHED", f"final-seed-{good}")
    assert "test_auc" in done.data.metrics and "loss_total" in done.data.metrics
    assert (failed.info.status, failed.info.run_name) == ("FAILED", f"final-seed-{bad} (failed)")
    assert "missing" in failed.data.tags["dsanet.error"]
