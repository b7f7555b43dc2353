"""The MLflow view against a real `mlflow server`: run layout, catching up after a killed driver
or an outage, every epoch exactly once.

The study folder is built by the real pieces that write it during a search, without Ray running:
the Optuna study through `OptunaSearcher` (as Ray calls it), and each trial's reports.jsonl in
the trainable's format. Tune events reach the view as Ray hands them: a `Trial` record
(stub=True skips the trainable lookup). Nothing of MLflow, Optuna or Ray is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from conftest import free_port, write_space
from mlflow import MlflowClient
from ray.tune.experiment import Trial

from dsanet.config import field_names
from tune.searcher import OPTUNA_KEY, REPORTED_KEY, OptunaSearcher, open_study
from tune.tracking import MlflowView, TrackingUnavailable


class FakeSearch:
    """Writes a study folder as a search does: Optuna through the searcher, reports as the
    trainable writes them. `view` (if any) receives the Tune events."""

    def __init__(self, root: Path, spec, view: MlflowView | None = None) -> None:
        self.root, self.spec, self.view = root, spec, view
        open_study(spec, root)
        self.pruned: set[str] = set()
        self.searcher = OptunaSearcher(spec, root, pruned=lambda ray_id: ray_id in self.pruned)
        self.trials: dict[str, Trial] = {}

    def start(self, ray_id: str) -> Trial:
        config = self.searcher.suggest(ray_id)
        trial = self.trials[ray_id] = Trial("dsanet", config=config, trial_id=ray_id, stub=True)
        (self.root / "trials" / ray_id).mkdir(parents=True, exist_ok=True)
        if self.view:
            self.view.on_trial_start(0, [], trial)
        return trial

    def epochs(self, ray_id: str, epochs: range) -> None:
        """The trainable reports each epoch: a line in reports.jsonl, then the result to Ray."""
        folder = self.root / "trials" / ray_id
        for epoch in epochs:
            now = time.time()
            metrics = {"epoch": epoch, "val_ap": 0.5 + epoch / 10, "loss_total": 1 / (epoch + 1)}
            metrics["best_val_ap"] = metrics["val_ap"]
            line = {"epoch": epoch, "pid": 4242, "time": now, "metrics": metrics}
            with open(folder / "reports.jsonl", "a") as handle:
                handle.write(json.dumps(line) + "\n")
            result = {**metrics, "training_iteration": epoch + 1, REPORTED_KEY: now, "pid": 1}
            self.searcher.on_trial_result(ray_id, result)
            if self.view:
                self.view.on_trial_result(0, [], self.trials[ray_id], result)
        (folder / "config.yaml").write_text("train: {seed: 1}\n")
        (folder / "best.pt").write_bytes(b"weights")

    def end(self, ray_id: str, error: bool = False) -> None:
        self.searcher.on_trial_complete(ray_id, error=error)
        if self.view and error:
            self.view.on_trial_error(0, [], self.trials[ray_id])
        elif self.view:
            self.view.on_trial_complete(0, [], self.trials[ray_id])


def runs_of(client: MlflowClient, experiment: str) -> tuple[list, dict]:
    """(parent runs, child runs by Optuna trial number) of an experiment."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    by_number = {int(r.data.tags["dsanet.optuna_trial"]): r for r in children}
    assert len(by_number) == len(children), "two runs for one trial"
    return [r for r in runs if r not in children], by_number


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_study_layout(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "layout", mlflow_server.uri)
    root = tmp_path / "study"
    open_study(spec, root)
    view = MlflowView(root, spec, mlflow_server.uri)
    parent_id = view.start()
    search = FakeSearch(root, spec, view)
    search.pruned.add("prune1")
    for ray_id in ("done1", "prune1", "fail1"):
        search.start(ray_id)
    search.epochs("done1", range(2))
    search.epochs("prune1", range(1))
    search.epochs("fail1", range(1))
    for ray_id in ("done1", "prune1"):
        search.end(ray_id)
    search.end("fail1", error=True)
    summary = {"final_auc_mean": 0.75, "final_auc_std": 0.01}
    (root / "final").mkdir()
    (root / "final" / "summary.json").write_text(json.dumps(summary))
    assert view.finish("FINISHED")

    client = MlflowClient(mlflow_server.uri)
    parents, runs = runs_of(client, "layout")
    assert [p.info.run_id for p in parents] == [parent_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["study.metric"] == "val_ap"
    assert parent.data.params["scheduler.max_t"] == "2"
    assert parent.data.params["study.max_failures"] == "2"
    assert "search.optim.lr" in parent.data.params
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    assert parent.data.metrics == summary
    space = {a.path for a in client.list_artifacts(parent_id, "space")}
    assert space == {"space/space.yaml", "space/base_config.yaml"}

    assert sorted(runs) == [0, 1, 2]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent_id}
    finished = runs[0]
    assert finished.data.tags["dsanet.trial_id"] == "done1"
    assert len(finished.data.params) == len(field_names())  # the whole resolved config
    lr = search.trials["done1"].config["optim.lr"]
    assert finished.data.params["optim.lr"] == str(lr)
    assert finished.data.params["train.epochs"] == "4"  # from the base config
    assert finished.data.params["train.out_dir"] == str((root / "trials" / "done1").resolve())
    assert steps(client, finished, "val_ap") == [0, 1]
    assert steps(client, finished, "loss_total") == [0, 1]
    assert set(finished.data.metrics) == {"val_ap", "loss_total", "best_val_ap"}
    assert finished.data.tags["dsanet.optuna_trial"] == "0"
    assert (finished.info.status, finished.data.tags["dsanet.status"]) == ("FINISHED", "FINISHED")
    artifacts = {a.path for a in client.list_artifacts(finished.info.run_id)}
    assert artifacts == {"best.pt", "config.yaml"}
    assert (runs[1].info.status, runs[1].data.tags["dsanet.status"]) == ("KILLED", "PRUNED")
    assert (runs[2].info.status, runs[2].data.tags["dsanet.status"]) == ("FAILED", "FAILED")
    assert {a.path for a in client.list_artifacts(runs[2].info.run_id)} == {"config.yaml"}
    secrets = {v for k, v in os.environ.items() if len(v) > 8}
    for run in [parent, *runs.values()]:
        assert "mlflow.user" not in run.data.tags
        assert not secrets & (set(run.data.params.values()) | set(run.data.tags.values()))
    assert view.ui_command().startswith(f"{mlflow_server.uri}/#/experiments/")
    assert not list(root.glob("*.json"))  # no state of its own in the study folder


def test_a_killed_driver_is_caught_up_once_without_duplicates(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "restore", mlflow_server.uri)
    root = tmp_path / "study"
    open_study(spec, root)
    first = MlflowView(root, spec, mlflow_server.uri)
    parent_id = first.start()
    search = FakeSearch(root, spec, first)
    for ray_id in ("ta", "tb", "tc"):
        search.start(ray_id)
    search.epochs("ta", range(2))
    search.end("ta")
    search.epochs("tb", range(1))
    # The driver dies (nothing is ended).
    search.view = None
    search.epochs("tb", range(1, 2))  # the work MLflow never heard of: a lost epoch and end
    search.end("tb")
    client = MlflowClient(mlflow_server.uri)
    _, before = runs_of(client, "restore")
    assert before[1].data.tags["dsanet.epochs"] == "1" and before[1].info.status == "RUNNING"
    half = client.create_run(
        before[0].info.experiment_id,
        run_name="trial-2",
        tags={
            "dsanet.run_key": "trial/2",
            "dsanet.optuna_trial": "2",
            "dsanet.stage": "search",
            "dsanet.study": first.study_id,
            "dsanet.status": "NEW",
            "mlflow.parentRunId": parent_id,
        },
    )
    # What a kill between creating tc's run and logging its params leaves (in place of the run
    # the first view made in full): a run with its tags, status NEW and no params.
    client.delete_run(before[2].info.run_id)

    second = MlflowView(root, spec, mlflow_server.uri)  # the resumed driver
    assert second.start() == parent_id
    search.view = second
    search.epochs("tc", range(2))
    search.end("tc")
    assert second.finish("FINISHED")
    assert second.sync()  # once more: changes nothing

    parents, runs = runs_of(client, "restore")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert sorted(runs) == [0, 1, 2] and runs[2].info.run_id == half.info.run_id
    assert len(runs[2].data.params) == len(field_names())  # completed by the catch-up
    for run in runs.values():
        assert run.info.status == "FINISHED"
        for key in ("val_ap", "loss_total"):
            assert steps(client, run, key) == [0, 1], (run.data.tags["dsanet.trial_id"], key)
    assert parents[0].info.status == "FINISHED"


def test_the_epoch_ray_accepted_is_logged_when_a_restart_wrote_it_twice(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "twice", mlflow_server.uri)
    root = tmp_path / "study"
    search = FakeSearch(root, spec)
    search.start("t")
    search.epochs("t", range(1))
    reports = root / "trials" / "t" / "reports.jsonl"
    accepted = json.loads(reports.read_text())
    rewritten = {**accepted, "time": accepted["time"] + 5, "metrics": {"val_ap": 0.1}}
    with open(reports, "a") as handle:  # the same epoch again, by an attempt Ray did not keep
        handle.write(json.dumps(rewritten) + "\n")
    view = MlflowView(root, spec, mlflow_server.uri)
    view.finish("FINISHED")
    (run,) = runs_of(MlflowClient(view.uri), "twice")[1].values()
    (point,) = MlflowClient(view.uri).get_metric_history(run.info.run_id, "val_ap")
    assert (point.value, point.timestamp) == (0.5, int(accepted["time"] * 1000))


def test_unreachable_uri_is_a_clear_error(tmp_path):
    port = free_port()
    spec = write_space(tmp_path, "nowhere")
    with pytest.raises(TrackingUnavailable, match=rf"127\.0\.0\.1:{port} is not usable.*server"):
        MlflowView(tmp_path / "study", spec, f"http://127.0.0.1:{port}")


def test_default_store_is_sqlite_in_the_study_folder(tmp_path):
    spec = write_space(tmp_path, "local")
    root = tmp_path / "study"
    search = FakeSearch(root, spec)
    view = search.view = MlflowView(root, spec, spec.mlflow.tracking_uri)
    assert view.uri == f"sqlite:///{root.resolve()}/mlflow.db"
    assert view.ui_command() == f"mlflow ui --backend-store-uri {view.uri}"
    view.start()
    search.start("t1")
    search.epochs("t1", range(2))
    search.end("t1")
    view.finish("FINISHED")
    (run,) = runs_of(MlflowClient(view.uri), "local")[1].values()
    artifacts = Path(run.info.artifact_uri)
    assert str(artifacts).startswith(str(root.resolve() / "mlartifacts"))
    folder = root / "trials" / "t1"
    # A checkpoint is hard-linked into the local artifact folder, other files are copied.
    assert (artifacts / "best.pt").samefile(folder / "best.pt")
    assert (artifacts / "config.yaml").read_text() == (folder / "config.yaml").read_text()
    assert not (artifacts / "config.yaml").samefile(folder / "config.yaml")
    assert not list(artifacts.glob(".*"))  # no temporary link left


@pytest.mark.slow  # extra server starts
def test_server_outage_is_caught_up_by_the_next_event_once_it_is_back(
    own_mlflow_server, tmp_path, caplog
):
    server = own_mlflow_server
    spec = write_space(tmp_path, "outage", server.uri)
    root = tmp_path / "study"
    open_study(spec, root)
    view = MlflowView(root, spec, server.uri)
    parent_id = view.start()
    search = FakeSearch(root, spec, view)
    search.start("oa")
    search.epochs("oa", range(1))
    server.stop()

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tune.tracking"):
        search.epochs("oa", range(1, 2))
        search.end("oa")
        search.start("ob")  # its run cannot be created yet
        search.epochs("ob", range(1))
    assert time.monotonic() - started < 60  # the events do not stall the search
    assert "unreachable" in caplog.text
    assert not list(root.glob("*.json"))  # nothing is buffered outside the study's record

    server.start()  # same database, same port
    search.epochs("ob", range(1, 2))  # the next event writes what the outage kept back
    client = MlflowClient(server.uri)
    parents, runs = runs_of(client, "outage")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert steps(client, runs[0], "val_ap") == [0, 1] and runs[0].info.status == "FINISHED"
    assert steps(client, runs[1], "val_ap") == [0, 1] and runs[1].info.status == "RUNNING"
    search.end("ob")
    assert view.finish("FINISHED")
    assert runs_of(client, "outage")[1][1].info.status == "FINISHED"


@pytest.mark.slow  # extra server starts
def test_a_driver_that_dies_while_the_server_is_down_is_caught_up_by_the_next(
    own_mlflow_server, tmp_path, caplog
):
    """MLflow is down from the start of the search to the driver's death; the next driver
    writes all of it once, under one parent."""
    server = own_mlflow_server
    spec = write_space(tmp_path, "restart", server.uri)
    root = tmp_path / "study"
    open_study(spec, root)
    first = MlflowView(root, spec, server.uri)
    server.stop()
    assert first.start() == ""  # nothing written: no parent yet
    search = FakeSearch(root, spec, first)
    search.start("rc")
    search.epochs("rc", range(1))
    with caplog.at_level(logging.ERROR, logger="tune.tracking"):
        assert not first.finish("KILLED", wait_s=1)
    assert "--resume" in caplog.text  # the driver says how MLflow catches up
    server.start()  # the first driver is gone; the study resumes
    second = MlflowView(root, spec, server.uri)
    search.view = second
    parent_id = second.start()
    assert parent_id
    search.epochs("rc", range(1, 2))
    search.end("rc")
    assert second.finish("FINISHED")
    client = MlflowClient(server.uri)
    parents, runs = runs_of(client, "restart")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert list(runs) == [0] and runs[0].data.tags["dsanet.trial_id"] == "rc"
    assert steps(client, runs[0], "val_ap") == [0, 1]
    assert runs[0].info.status == "FINISHED" and parents[0].info.status == "FINISHED"


def test_events_of_trials_without_an_optuna_number_are_ignored(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "foreign", mlflow_server.uri)
    root = tmp_path / "study"
    open_study(spec, root)
    view = MlflowView(root, spec, mlflow_server.uri)
    view.start()
    stranger = Trial("dsanet", config={"x": 1}, trial_id="zz", stub=True)
    view.on_trial_result(0, [], stranger, {"val_ap": 1.0})
    view.finish("FINISHED")
    assert runs_of(MlflowClient(view.uri), "foreign")[1] == {}
    assert OPTUNA_KEY not in stranger.config
