"""MlflowTracker against a real `mlflow server`: run layout, restore without duplicates, outages.

The Tune hooks are driven directly, without Ray running: the trials are real
`ray.tune.experiment.Trial` records (stub=True skips the trainable lookup), the results are the
dicts the trainable reports. Nothing of MLflow or Ray is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path

import pytest
from conftest import free_port, write_space
from mlflow import MlflowClient
from ray.tune.experiment import Trial

from dsanet.config import field_names
from tune.searcher import ADOPTED_KEY
from tune.tracking import STATE_FILE, MlflowTracker, TrackingUnavailable


def make_trial(trial_id: str, lr: float = 1e-4) -> Trial:
    config = {"optim.lr": lr, "model.num_prototypes": 8}
    return Trial("dsanet", config=config, trial_id=trial_id, stub=True)


def trial_folder(root: Path, trial_id: str) -> Path:
    """What the trainer leaves in a trial's run folder, as far as the tracker reads it."""
    folder = root / "trials" / trial_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("train: {seed: 1}\n")
    (folder / "best.pt").write_bytes(b"weights")
    return folder


def report(tracker: MlflowTracker, trial: Trial, epochs: range, out_dir: Path) -> None:
    for epoch in epochs:
        result = {
            "epoch": epoch,
            "val_ap": 0.5 + epoch / 10,
            "loss_total": 1.0 / (epoch + 1),
            "out_dir": str(out_dir),
            "training_iteration": epoch + 1,
            "pid": 4242,
            "optuna_trial": 3,
            "hostname": "node",
        }
        tracker.on_trial_result(epoch, [], trial, result)


def finish_study(tracker: MlflowTracker, trial: Trial, out_dir: Path, experiment: str) -> list:
    """Run one trial through both epochs, end the study; the experiment's child runs."""
    tracker.on_trial_start(0, [], trial)
    report(tracker, trial, range(2), out_dir)
    tracker.on_trial_complete(2, [], trial)
    tracker.finish_parent("FINISHED")
    tracker.close()
    return runs_of(MlflowClient(tracker.tracking_uri), experiment)[1]


def runs_of(client: MlflowClient, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return [r for r in runs if r not in children], children


def by_trial(children: list) -> dict:
    return {r.data.tags["dsanet.trial_id"]: r for r in children}


def steps(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_study_layout(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "layout", mlflow_server.uri)
    tracker = MlflowTracker(tmp_path / "study", spec, mlflow_server.uri)
    parent_id = tracker.start_parent(resumed=False)
    done, pruned, failed = make_trial("done1"), make_trial("prune1", 3e-4), make_trial("fail1")
    for trial in (done, pruned, failed):
        tracker.on_trial_start(0, [], trial)
    report(tracker, done, range(2), trial_folder(tmp_path, "done1"))
    report(tracker, pruned, range(1), trial_folder(tmp_path, "prune1"))
    report(tracker, failed, range(1), trial_folder(tmp_path, "fail1"))
    tracker.on_trial_complete(2, [], done)
    tracker.on_trial_complete(2, [], pruned)
    tracker.on_trial_error(2, [], failed)
    tracker.finish_parent("FINISHED", {"best_val_ap": 0.6, "best_trial": "done1"})

    client = MlflowClient(mlflow_server.uri)
    parents, children = runs_of(client, "layout")
    assert [p.info.run_id for p in parents] == [parent_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["study.metric"] == "val_ap"
    assert parent.data.params["scheduler.max_t"] == "2"
    assert parent.data.params["study.max_failures"] == "2"
    assert "search.optim.lr" in parent.data.params
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    assert parent.data.metrics["best_val_ap"] == 0.6
    assert parent.data.tags["dsanet.summary.best_trial"] == "done1"
    space = {a.path for a in client.list_artifacts(parent_id, "space")}
    assert space == {"space/space.yaml", "space/base_config.yaml"}

    runs = by_trial(children)
    assert set(runs) == {"done1", "prune1", "fail1"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    finished = runs["done1"]
    assert len(finished.data.params) == len(field_names())  # the whole resolved config
    assert finished.data.params["optim.lr"] == "0.0001"
    assert finished.data.params["train.epochs"] == "4"  # from the base config
    assert steps(client, finished, "val_ap") == [0, 1]
    assert steps(client, finished, "loss_total") == [0, 1]
    assert not {"pid", "training_iteration", "epoch", "optuna_trial"} & set(finished.data.metrics)
    assert finished.data.tags["dsanet.optuna_trial"] == "3"
    assert (finished.info.status, finished.data.tags["dsanet.status"]) == ("FINISHED", "FINISHED")
    artifacts = {a.path for a in client.list_artifacts(finished.info.run_id)}
    assert artifacts == {"best.pt", "config.yaml"}
    assert (runs["prune1"].info.status, runs["prune1"].data.tags["dsanet.status"]) == (
        "KILLED",
        "PRUNED",
    )
    assert (runs["fail1"].info.status, runs["fail1"].data.tags["dsanet.status"]) == (
        "FAILED",
        "FAILED",
    )
    secrets = {v for k, v in os.environ.items() if len(v) > 8}
    for run in [parent, *children]:
        assert "mlflow.user" not in run.data.tags
        assert not secrets & (set(run.data.params.values()) | set(run.data.tags.values()))
    assert tracker.ui_command().startswith(f"{mlflow_server.uri}/#/experiments/")
    tracker.close()


def test_restore_replays_without_duplicates(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "restore", mlflow_server.uri)
    study = tmp_path / "study"
    first = MlflowTracker(study, spec, mlflow_server.uri)
    parent_id = first.start_parent(resumed=False)
    a, b, c = make_trial("ta"), make_trial("tb"), make_trial("tc")
    folders = {t.trial_id: trial_folder(tmp_path, t.trial_id) for t in (a, b, c)}
    for trial in (a, b, c):
        first.on_trial_start(0, [], trial)
    report(first, a, range(2), folders["ta"])
    first.on_trial_complete(2, [], a)
    report(first, b, range(1), folders["tb"])
    first.close()  # the driver dies here (SIGKILL: nothing is ended)
    # ... just after MLflow created trial tc's run, before the state file recorded it
    state = json.loads((study / STATE_FILE).read_text())
    del state["runs"]["tc"]
    (study / STATE_FILE).write_text(json.dumps(state))

    second = MlflowTracker(study, spec, mlflow_server.uri)
    assert second.start_parent(resumed=True) == parent_id
    client = MlflowClient(mlflow_server.uri)
    left = {r.data.tags["dsanet.trial_id"]: r.info.status for r in runs_of(client, "restore")[1]}
    assert left == {"ta": "FINISHED", "tb": "KILLED", "tc": "RUNNING"}  # tc: not in the state
    # Tune restores tb and tc and replays from their last checkpoints (or from scratch)
    unpickled = pickle.loads(pickle.dumps(second))  # what Tuner.restore hands Tune
    assert unpickled.parent_run_id == parent_id
    for tracker, trial in ((second, b), (unpickled, c)):
        tracker.on_trial_start(0, [], trial)
        report(tracker, trial, range(2), folders[trial.trial_id])
        tracker.on_trial_complete(2, [], trial)
    second.finish_parent("FINISHED")
    second.close()

    parents, children = runs_of(client, "restore")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert sorted(by_trial(children)) == ["ta", "tb", "tc"]
    for run in children:
        assert run.info.status == "FINISHED"
        for key in ("val_ap", "loss_total"):
            assert steps(client, run, key) == [0, 1], (run.data.tags["dsanet.trial_id"], key)
    assert parents[0].info.status == "FINISHED"


def test_a_run_created_just_before_a_kill_is_continued_by_its_adopter(tmp_path):
    # The driver dies after MLflow created a trial's run and before it saved the run id; Ray
    # had not saved the trial, so the resumed study adopts its Optuna trial under a new Ray id.
    spec = write_space(tmp_path, "adopt")
    study = tmp_path / "study"
    first = MlflowTracker(study, spec, spec.mlflow.tracking_uri)
    first.start_parent(resumed=False)
    on_disk = []  # the state file whenever the queue starts delivering
    deliver = first._queue._deliver

    def deliver_and_look() -> bool:
        on_disk.append(json.loads((study / STATE_FILE).read_text()))
        return deliver()

    first._queue._deliver = deliver_and_look
    first.on_trial_start(0, [], make_trial("lost"))  # one delivery: MLflow creates the run
    at_kill = on_disk[-1]  # the state file while the run was being created
    first.close()
    (study / STATE_FILE).write_text(json.dumps(at_kill))  # what the kill left on disk

    second = MlflowTracker(study, spec, spec.mlflow.tracking_uri)
    second.start_parent(resumed=True)
    adopter = Trial(
        "dsanet",
        config={**make_trial("x").config, ADOPTED_KEY: "lost"},
        trial_id="new",
        stub=True,
    )
    children = finish_study(second, adopter, trial_folder(tmp_path, "new"), "adopt")
    assert len(children) == 1  # no orphan left RUNNING beside a new run
    tags = children[0].data.tags
    assert (tags["dsanet.run_key"], tags["dsanet.trial_id"]) == ("lost", "new")
    assert children[0].info.status == "FINISHED"


def test_unreachable_uri_is_a_clear_error(tmp_path):
    port = free_port()
    spec = write_space(tmp_path, "nowhere")
    with pytest.raises(TrackingUnavailable, match=rf"127\.0\.0\.1:{port} is not usable.*server"):
        MlflowTracker(tmp_path / "study", spec, f"http://127.0.0.1:{port}")


def test_default_store_is_sqlite_in_the_study_folder(tmp_path):
    spec = write_space(tmp_path, "local")
    study = tmp_path / "study"
    tracker = MlflowTracker(study, spec, spec.mlflow.tracking_uri)
    assert tracker.tracking_uri == f"sqlite:///{study.resolve()}/mlflow.db"
    assert tracker.ui_command() == f"mlflow ui --backend-store-uri {tracker.tracking_uri}"
    tracker.start_parent(resumed=False)
    children = finish_study(tracker, make_trial("t1"), trial_folder(tmp_path, "t1"), "local")
    artifacts = Path(children[0].info.artifact_uri)
    assert str(artifacts).startswith(str(study.resolve() / "mlartifacts"))
    folder = tmp_path / "trials" / "t1"
    # A checkpoint is hard-linked into the local artifact folder, other files are copied.
    assert (artifacts / "best.pt").samefile(folder / "best.pt")
    assert (artifacts / "config.yaml").read_text() == (folder / "config.yaml").read_text()
    assert not (artifacts / "config.yaml").samefile(folder / "config.yaml")
    assert not list(artifacts.glob(".*"))  # no temporary link left


@pytest.mark.slow  # two extra server starts
def test_server_outage_buffers_and_delivers(own_mlflow_server, tmp_path, caplog):
    server = own_mlflow_server
    spec = write_space(tmp_path, "outage", server.uri)
    tracker = MlflowTracker(tmp_path / "study", spec, server.uri)
    tracker.start_parent(resumed=False)
    a, b = make_trial("oa"), make_trial("ob")
    tracker.on_trial_start(0, [], a)
    report(tracker, a, range(1), trial_folder(tmp_path, "oa"))
    server.stop()

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tune.tracking"):
        report(tracker, a, range(1, 2), trial_folder(tmp_path, "oa"))
        tracker.on_trial_complete(2, [], a)
        tracker.on_trial_start(0, [], b)  # its run cannot be created yet
        report(tracker, b, range(1), trial_folder(tmp_path, "ob"))
        tracker.finish_parent("FINISHED", {"best_val_ap": 0.6}, wait_s=2)
    assert time.monotonic() - started < 30  # the hooks do not stall the search
    assert "unreachable" in caplog.text
    assert not tracker.flush()
    assert json.loads((tmp_path / "study" / STATE_FILE).read_text())["pending"]

    server.start()  # same database, same port
    assert tracker.flush()
    client = MlflowClient(server.uri)
    parents, children = runs_of(client, "outage")
    runs = by_trial(children)
    assert steps(client, runs["oa"], "val_ap") == [0, 1]
    assert runs["oa"].info.status == "FINISHED"
    assert steps(client, runs["ob"], "val_ap") == [0]
    assert (runs["ob"].info.status, runs["ob"].data.tags["dsanet.status"]) == (
        "KILLED",
        "INTERRUPTED",
    )
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best_val_ap"] == 0.6
    tracker.close()


@pytest.mark.slow  # two extra server starts
def test_driver_restart_while_the_server_was_down(own_mlflow_server, tmp_path):
    """The parent run and a trial are queued while MLflow is down; the driver dies; the study
    resumes once MLflow is back: everything is delivered once, under one parent."""
    server = own_mlflow_server
    spec = write_space(tmp_path, "restart", server.uri)
    study, trial = tmp_path / "study", make_trial("rc")
    first = MlflowTracker(study, spec, server.uri)
    server.stop()
    assert first.start_parent(resumed=False) == ""  # queued
    first.on_trial_start(0, [], trial)
    report(first, trial, range(1), trial_folder(tmp_path, "rc"))
    first.close()  # the driver dies
    server.start()

    second = MlflowTracker(study, spec, server.uri)
    parent_id = second.start_parent(resumed=True)
    assert parent_id
    second.on_trial_start(0, [], trial)
    report(second, trial, range(2), trial_folder(tmp_path, "rc"))
    second.on_trial_complete(2, [], trial)
    second.finish_parent("FINISHED")
    second.close()

    client = MlflowClient(server.uri)
    parents, children = runs_of(client, "restart")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert [r.data.tags["dsanet.trial_id"] for r in children] == ["rc"]
    assert steps(client, children[0], "val_ap") == [0, 1]
    assert children[0].info.status == "FINISHED"
