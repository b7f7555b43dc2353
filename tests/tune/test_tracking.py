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
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import free_port, write_space
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from ray.tune.experiment import Trial

from dsanet.config import field_names
from tune.layout import StudyFolder
from tune.report import best_of
from tune.searcher import (
    OPTUNA_KEY,
    RAY_TRIAL_ATTR,
    REPORTED_KEY,
    STEP_KEY,
    OptunaSearcher,
    open_storage,
    open_study,
)
from tune.tracking import MlflowView, TrackingUnavailable
from tune.trainable import append_report

# The studies tracked by a real `mlflow server` are slow: the server takes 13 s to start here and
# the default suite's budget is 90 s. `.ci/run` runs them all (`-m slow`).
server_study = pytest.mark.slow


class FakeSearch:
    """Writes a study folder as a search does: Optuna through the searcher, reports as the
    trainable writes them. `view` (if any) receives the Tune events."""

    def __init__(self, root: Path, spec, view: MlflowView | None = None) -> None:
        self.root, self.spec, self.view = root, spec, view
        open_study(spec, root)
        self.pruned: set[str] = set()  # Ray ids of the trials ASHA stopped
        self.searcher = OptunaSearcher(spec, root, pruned=self._pruned)
        self.trials: dict[str, Trial] = {}

    def _pruned(self, number: int) -> bool:
        return any(
            t.config[OPTUNA_KEY] == number for r, t in self.trials.items() if r in self.pruned
        )

    def folder(self, ray_id: str) -> Path:
        """The trial's folder: trials/<its Optuna number>."""
        return StudyFolder(self.root).trial_dir(self.trials[ray_id].config[OPTUNA_KEY])

    def start(self, ray_id: str) -> Trial:
        config = self.searcher.suggest(ray_id)
        trial = self.trials[ray_id] = Trial("dsanet", config=config, trial_id=ray_id, stub=True)
        self.folder(ray_id).mkdir(parents=True, exist_ok=True)
        if self.view:
            self.view.on_trial_start(0, [], trial)
        return trial

    def epochs(self, ray_id: str, epochs: range, curve: list[float] | None = None) -> None:
        """The trainable reports each epoch: a line in reports.jsonl, then the result to Ray.
        val_ap is 0.5 + epoch / 10, or `curve[epoch]`; the trainer selects on it, reporting
        best_val_ap (the best so far)."""
        folder = self.folder(ray_id)
        for epoch in epochs:
            now = time.time()
            ap = curve or [0.5 + e / 10 for e in range(epoch + 1)]
            metrics = {"epoch": epoch, "val_ap": ap[epoch], "loss_total": 1 / (epoch + 1)}
            metrics["best_val_ap"] = max(ap[: epoch + 1])
            line = {"epoch": epoch, "pid": 4242, "time": now, "metrics": metrics}
            with open(folder / "reports.jsonl", "a") as handle:
                handle.write(json.dumps(line) + "\n")
            result = {**metrics, STEP_KEY: epoch + 1, REPORTED_KEY: now, "pid": 1}
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
    return sorted(m.step for m in history(client, run, key))


def history(client: MlflowClient, run, key: str) -> list:
    """A metric's points by step, then time."""
    points = client.get_metric_history(run.info.run_id, key)
    return sorted(points, key=lambda m: (m.step, m.timestamp))


def started(tmp_path: Path, name: str, uri: str) -> tuple:
    """A space, its Optuna study and a started view: (spec, root, view, parent run id)."""
    spec = write_space(tmp_path, name, uri)
    root = tmp_path / "study"
    open_study(spec, root)
    view = MlflowView(root, spec, uri)
    return spec, root, view, view.start()


@server_study
def test_study_layout(mlflow_server, tmp_path):
    spec, root, view, parent_id = started(tmp_path, "layout", mlflow_server.uri)
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
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params["study.metric"] == "val_ap"
    assert parent.data.params["scheduler.max_t"] == "2"
    assert parent.data.params["study.max_failures"] == "2"
    assert "search.optim.lr" in parent.data.params
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    # The winner: trial 0, kept epoch 1 (0-based) with val_ap 0.6; the final stage's numbers.
    assert parent.data.metrics == {**summary, "best_val_ap": 0.6, "best_epoch": 1}
    assert parent.data.tags["dsanet.best_trial"] == "0"
    assert parent.data.tags["dsanet.best_run_id"] == runs[0].info.run_id
    note = parent.data.tags["mlflow.note.content"]
    assert "Study tiny: 3 trials (1 complete, 1 pruned, 1 failed, 0 running" in note
    assert "Best: trial 0 (run trial-0), val_ap=0.6000 at epoch 1." in note
    assert "Final stage, test mean ± std over seeds: auc 0.7500 ± 0.0100." in note
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
    assert finished.data.params["train.out_dir"] == str(search.folder("done1").resolve())
    assert steps(client, finished, "val_ap") == [0, 1]
    assert steps(client, finished, "loss_total") == [0, 1]
    # best_val_ap is the trainer's own (its selection metric): not logged twice
    assert set(finished.data.metrics) == {"val_ap", "loss_total", "best_val_ap", "kept_epoch"}
    assert len(client.get_metric_history(finished.info.run_id, "best_val_ap")) == 2
    assert [(m.step, m.value) for m in history(client, finished, "kept_epoch")] == [(0, 0), (1, 1)]
    assert finished.data.tags["dsanet.optuna_trial"] == "0"
    assert (finished.info.status, finished.data.tags["dsanet.status"]) == ("FINISHED", "FINISHED")
    artifacts = {a.path for a in client.list_artifacts(finished.info.run_id)}
    assert artifacts == {"best.pt", "config.yaml"}
    # Status and name tell complete, pruned and failed apart (RUN_STATUS).
    assert finished.info.run_name == "trial-0"
    pruned, failed = runs[1], runs[2]
    assert (pruned.info.status, pruned.data.tags["dsanet.status"]) == ("FINISHED", "PRUNED")
    assert pruned.info.run_name == "trial-1 (pruned@1)"
    assert (failed.info.status, failed.data.tags["dsanet.status"]) == ("FAILED", "FAILED")
    assert failed.info.run_name == "trial-2 (failed)"
    client.set_terminated(pruned.info.run_id, "KILLED")  # as views before this one ended it
    MlflowView(root, spec, mlflow_server.uri).sync()
    assert client.get_run(pruned.info.run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(runs[2].info.run_id)} == {"config.yaml"}
    secrets = {v for k, v in os.environ.items() if len(v) > 8}
    for run in [parent, *runs.values()]:
        assert "mlflow.user" not in run.data.tags
        assert not secrets & (set(run.data.params.values()) | set(run.data.tags.values()))
    assert view.ui_command() == (
        f"{mlflow_server.uri}/#/experiments/{view.experiment_id}?workflowType=machine_learning"
    )
    assert not list(root.glob("*.json"))  # no state of its own in the study folder


@server_study
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


@server_study
def test_the_parent_follows_the_winner_and_names_tell_an_interrupted_trial(mlflow_server, tmp_path):
    spec, root, view, parent_id = started(tmp_path, "winner", mlflow_server.uri)
    search = FakeSearch(root, spec, view)
    client = MlflowClient(mlflow_server.uri)
    for ray_id, curve in (("a", [0.7, 0.6]), ("b", [0.5, 0.9]), ("c", [0.1, 0.2])):
        search.start(ray_id)
        search.epochs(ray_id, range(2), curve)
        search.end(ray_id)  # the trial's end updates the parent: no full sync here
        if ray_id == "a":
            tags = client.get_run(parent_id).data.tags
            assert (tags["dsanet.best_trial"], tags["dsanet.status"]) == ("0", "RUNNING")
    search.start("d")
    search.epochs("d", range(1))
    assert view.finish("KILLED")
    assert view.sync()  # again: nothing new

    parents, runs = runs_of(client, "winner")
    parent = parents[0]
    assert parent.data.tags["dsanet.best_trial"] == "1"
    assert parent.data.tags["dsanet.best_run_id"] == runs[1].info.run_id
    assert parent.data.metrics == {"best_val_ap": 0.9, "best_epoch": 1}
    # One point per winner, at its place among complete trials: trial 0 first, then trial 1.
    points = [(m.step, m.value) for m in history(client, parent, "best_val_ap")]
    assert points == [(1, 0.7), (2, 0.9)]
    assert [(m.step, m.value) for m in history(client, parent, "best_epoch")] == [(1, 0), (2, 1)]
    assert (
        "4 trials (3 complete, 0 pruned, 0 failed, 1 running or interrupted)"
        in (parent.data.tags["mlflow.note.content"])
    )
    # Trial 0 keeps its first epoch, the trainer's selection, as Optuna does.
    kept = [(m.step, m.value) for m in history(client, runs[0], "kept_epoch")]
    assert kept == [(0, 0), (1, 0)]
    interrupted = runs[3]
    assert (interrupted.info.status, interrupted.data.tags["dsanet.status"]) == (
        "KILLED",
        "INTERRUPTED",
    )
    assert interrupted.info.run_name == "trial-3 (interrupted)"

    again = MlflowView(root, spec, mlflow_server.uri)  # --resume carries trial 3 on
    again.start()
    resumed = client.get_run(interrupted.info.run_id)
    assert (resumed.info.status, resumed.info.run_name) == ("RUNNING", "trial-3")


def rescan(trials: Iterable[FrozenTrial]) -> tuple:
    """(counts by state, best trial's number, its place) from a pass over every trial: what
    the view computed at each trial end before it kept its standings."""
    trials = list(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = best_of(complete, [True])
    if best is None:
        return Counter(t.state for t in trials), None, 0
    place = sum(t.datetime_complete <= best.datetime_complete for t in complete)
    return Counter(t.state for t in trials), best.number, place


def standings(view: MlflowView) -> tuple:
    kept = view._standings
    counts = +kept.counts  # without the states no trial is in any more
    return counts, kept.best and kept.best.number, kept.place()


@server_study
def test_the_parents_standings_equal_a_rescan_after_every_trial_end(mlflow_server, tmp_path):
    """The counts, winner and place the view keeps as trials end equal a pass over every
    trial after each event, with trial ends heard in another order than Optuna was told them
    and a driver restart (a new view, built by its first sync) half-way."""
    spec, root, view, parent_id = started(tmp_path, "standings", mlflow_server.uri)
    search = FakeSearch(root, spec, view)
    client = MlflowClient(mlflow_server.uri)

    def heard(ray_id: str, error: bool = False) -> None:
        """The view hears of a trial's end (told to Optuna before) and updates the parent."""
        trial = search.trials[ray_id]
        if error:
            search.view.on_trial_error(0, [], trial)
        else:
            search.view.on_trial_complete(0, [], trial)
        assert standings(search.view) == rescan(search.view._standings.trials.values())
        best = standings(search.view)[1]
        tags = client.get_run(parent_id).data.tags
        assert tags.get("dsanet.best_trial") == (None if best is None else str(best))

    def stored() -> tuple:
        storage = open_storage(root)
        study = storage.get_study_id_from_name(spec.name)
        trials = storage.get_all_trials(study, deepcopy=False)
        return rescan(t for t in trials if RAY_TRIAL_ATTR in t.user_attrs)

    # Two epochs complete a trial (max_t); b is pruned after one, d fails, e and f run on.
    curves = {"a": [0.6, 0.5], "b": [0.3], "c": [0.5, 0.9], "d": [0.4], "e": [0.2], "f": [0.1]}
    for ray_id, curve in curves.items():
        search.start(ray_id)
        search.epochs(ray_id, range(len(curve)), curve)
    search.searcher.on_trial_complete("a")
    heard("a")
    search.pruned.add("b")
    for ray_id in "bcd":  # told b, c, d; heard d, c, b
        search.searcher.on_trial_complete(ray_id, error=ray_id == "d")
    for ray_id in "dcb":
        heard(ray_id, error=ray_id == "d")
    assert standings(view) == stored()
    assert standings(view)[1:] == (2, 2)  # trial c, completed second

    search.view = MlflowView(root, spec, mlflow_server.uri)  # the driver restarts (--resume)
    search.view.start()
    assert standings(search.view) == stored()
    for ray_id, curve in (("g", [0.7, 0.6]), ("h", [0.5, 0.95])):
        search.start(ray_id)
        search.epochs(ray_id, range(2), curve)
    for ray_id in "hg":  # told h, g; heard g, h: h completed before g, so third, not fourth
        search.searcher.on_trial_complete(ray_id)
    for ray_id in "gh":
        heard(ray_id)
    assert standings(search.view) == stored()
    counts, best, place = standings(search.view)
    assert (counts[TrialState.RUNNING], best, place) == (2, 7, 3)
    assert search.view.finish("KILLED")
    points = [(m.step, m.value) for m in history(client, client.get_run(parent_id), "best_val_ap")]
    assert points == [(1, 0.6), (2, 0.9), (3, 0.95)]


@pytest.mark.slow  # a second study through the session server (the default suite: 90 s)
def test_each_objective_gets_its_kept_value(tmp_path):
    """val_ap is the trainer's selection metric (best_val_ap is its own); loss_total is not,
    so the view logs best_loss_total: the loss at the epoch the trainer keeps."""
    spec = write_space(tmp_path, "two", metric=["val_ap", "loss_total"], mode=["max", "min"])
    root = tmp_path / "study"
    search = FakeSearch(root, spec)
    search.start("t")
    search.epochs("t", range(2), [0.8, 0.6])
    search.end("t")
    view = MlflowView(root, spec)
    view.finish("FINISHED")
    client = MlflowClient(view.uri)
    parents, runs = runs_of(client, "two")
    assert [(m.step, m.value) for m in history(client, runs[0], "best_loss_total")] == [
        (0, 1.0),
        (1, 1.0),
    ]
    assert len(history(client, runs[0], "best_val_ap")) == 2  # the trainer's, once per epoch
    assert parents[0].data.metrics == {"best_val_ap": 0.8, "best_loss_total": 1.0, "best_epoch": 0}


@server_study
def test_an_existing_experiment_opens_in_the_model_training_view(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    plain, chosen = f"plain-{tmp_path.name}", f"chosen-{tmp_path.name}"  # the session's server
    client.create_experiment(plain, str(tmp_path / "a"))
    client.create_experiment(chosen, str(tmp_path / "b"), tags={"mlflow.experimentKind": "x"})
    for name in (plain, chosen):
        spec = write_space(tmp_path / name, name, mlflow_server.uri)
        open_study(spec, tmp_path / name / "study")
        MlflowView(tmp_path / name / "study", spec, mlflow_server.uri).start()
    kinds = [
        client.get_experiment_by_name(name).tags["mlflow.experimentKind"]
        for name in (plain, chosen)
    ]
    assert kinds == ["custom_model_development", "x"]  # a user's kind stays


@server_study
def test_final_seeds_are_written_as_they_train(mlflow_server, tmp_path):
    spec, root, view, parent_id = started(tmp_path, "seeds", mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    folder = root / "final" / "seed_7"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(spec.base.to_yaml())  # fit writes it first
    assert view.sync_seeds()
    (seed_run,) = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], "tags.`dsanet.run_key` = 'final/seed_7'"
    )
    assert (seed_run.info.status, seed_run.info.run_name) == ("RUNNING", "final-seed-7")
    assert seed_run.data.params["train.seed"] == str(spec.base.train.seed)
    run_id = seed_run.info.run_id
    stamps = []
    for epoch in range(2):  # each epoch as the seed's training appends it
        stamps.append(
            append_report(
                folder, {"epoch": float(epoch), "seconds": 1.0, "loss_total": 1.0 / (epoch + 1)}
            )
        )
        assert view.sync_seeds()
        points = client.get_metric_history(run_id, "loss_total")
        assert [m.step for m in points] == list(range(epoch + 1))
    assert [m.timestamp for m in sorted(points, key=lambda m: m.step)] == [
        int(t * 1000) for t in stamps
    ]
    history_records = [{"epoch": 0.0, "loss_total": 1.0}, {"epoch": 1.0, "loss_total": 0.5}]
    (folder / "result.json").write_text(
        json.dumps({"test": {"auc": 0.8}, "history": history_records})
    )
    (folder / "best.pt").write_bytes(b"weights")
    view.seed_failed(9, "RayTaskError(ValueError): ray::_fit_in_worker()\nValueError: no data")
    assert view.sync_seeds() and view.sync_seeds()  # twice: the second writes nothing
    done = client.get_run(run_id)
    assert (done.info.status, done.data.tags["dsanet.status"]) == ("FINISHED", "FINISHED")
    assert done.data.metrics["test_auc"] == 0.8
    assert steps(client, done, "loss_total") == [0, 1]  # the reports' epochs, not again
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "best.pt",
        "config.yaml",
        "result.json",
    }
    (failed,) = client.search_runs(
        [done.info.experiment_id], "tags.`dsanet.run_key` = 'final/seed_9'"
    )
    assert (failed.info.status, failed.info.run_name) == ("FAILED", "final-seed-9 (failed)")
    assert failed.data.tags["dsanet.error"] == "ValueError: no data"
    other = root / "final" / "seed_8"  # started, then the driver stopped
    other.mkdir()
    (other / "config.yaml").write_text(spec.base.to_yaml())
    assert view.finish("KILLED")
    (stopped,) = client.search_runs([done.info.experiment_id], "tags.`dsanet.seed` = '8'")
    assert (stopped.info.status, stopped.info.run_name) == ("KILLED", "final-seed-8 (interrupted)")


@server_study
def test_the_epoch_ray_accepted_is_logged_when_a_restart_wrote_it_twice(mlflow_server, tmp_path):
    spec = write_space(tmp_path, "twice", mlflow_server.uri)
    root = tmp_path / "study"
    search = FakeSearch(root, spec)
    search.start("t")
    search.epochs("t", range(1))
    reports = search.folder("t") / "reports.jsonl"
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


@pytest.mark.slow  # a new SQLite MLflow store: its schema migrations take seconds
def test_default_store_is_sqlite_in_the_study_folder(tmp_path):
    spec = write_space(tmp_path, "local")
    root = tmp_path / "study"
    search = FakeSearch(root, spec)
    view = search.view = MlflowView(root, spec, spec.mlflow.tracking_uri)
    assert view.uri == f"sqlite:///{root.resolve()}/mlflow.db"
    assert view.ui_command() == f"mlflow ui --backend-store-uri {view.uri}"  # no experiment yet
    view.start()
    assert view.ui_command() == (
        f"mlflow ui --backend-store-uri {view.uri}, then open "
        f"http://127.0.0.1:5000/#/experiments/{view.experiment_id}?workflowType=machine_learning"
    )
    search.start("t1")
    search.epochs("t1", range(2))
    search.end("t1")
    view.finish("FINISHED")
    (run,) = runs_of(MlflowClient(view.uri), "local")[1].values()
    artifacts = Path(run.info.artifact_uri)
    assert str(artifacts).startswith(str(root.resolve() / "mlartifacts"))
    folder = search.folder("t1")
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
    spec, root, view, parent_id = started(tmp_path, "outage", server.uri)
    search = FakeSearch(root, spec, view)
    search.start("oa")
    search.epochs("oa", range(1))
    server.stop()

    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tune.tracking"):
        search.epochs("oa", range(1, 2))
        search.end("oa")
        search.start("ob")  # its run cannot be created yet
        search.epochs("ob", range(1))
    assert time.monotonic() - began < 60  # the events do not stall the search
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


@server_study
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
