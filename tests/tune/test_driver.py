"""The study driver end to end on a real Ray: what Optuna, ASHA and MLflow end up holding.

A node running a trial is removed (the trial finishes from its checkpoint elsewhere); ASHA's
early stops are PRUNED in Optuna; multi-objective studies prune on the first objective and keep
the Pareto front complete-only; a driver SIGKILLed mid-trial, or before its first checkpoint,
is resumed with nothing lost or run twice. `--dry-run` and bad input never start Ray.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from ray_fixtures import (
    MAX_T,
    assert_resumed_from_checkpoint,
    kill_study,
    mlflow_children,
    one_trial_space,
    reports,
    start_study,
    study_trials,
    tiny_overrides,
    wait_for,
    write_space,
)

from tune.driver import main

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def run(space: Path, *args: str) -> int:
    return main(["--space", str(space), "--final-seeds", "0", *args])


def epochs_of(trial) -> list[int]:
    return sorted(int(step) for step in trial.user_attrs.get("epochs", {}))


def rebuilt_asha(space: Path, root: Path):
    """ASHA as a driver resuming the study in `root` builds it: from the Optuna study."""
    from ray_fixtures import load_study

    from tune.scheduler import build_scheduler
    from tune.space import load_space

    return build_scheduler(load_space(str(space)), load_study(root))


def assert_asha_replays(space: Path, root: Path) -> None:
    """With one trial at a time, ASHA's decisions follow from the trials' epochs in the order
    they ran: a fresh scheduler fed them the way Ray did stops exactly the PRUNED trials, at
    their last epoch, and ends with the rungs that a scheduler rebuilt from Optuna holds."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune.scheduler import StudyASHA
    from tune.space import load_space

    spec, trials = load_space(str(space)), study_trials(root)
    s = spec.scheduler
    live = StudyASHA(spec.metric[0], spec.mode[0], s.max_t, s.grace_period, s.reduction_factor)
    for t in sorted(trials, key=lambda t: t.number):
        trial = Trial("run_trial", trial_id=t.user_attrs["ray_trial_id"], stub=True)
        live.on_trial_add(None, trial)
        records = t.user_attrs["epochs"]
        for epoch in epochs_of(t):
            result = {"training_iteration": epoch, spec.metric[0]: records[str(epoch)]["values"][0]}
            if live.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                live.on_trial_complete(None, trial, result)
                assert epoch == epochs_of(t)[-1], (t.number, epoch)  # stopped where it ended
                break
        assert live.pruned(trial.trial_id) == (t.state == TrialState.PRUNED), t.number
    rebuilt = rebuilt_asha(space, root)
    assert rebuilt.rungs() == live.rungs()
    for t in trials:
        assert rebuilt.pruned(t.user_attrs["ray_trial_id"]) == (t.state == TrialState.PRUNED)


def assert_mlflow_matches(root: Path, trials: list) -> None:
    """One finished MLflow run per trial, holding each of its epochs exactly once. A run is
    found by the Ray trial that last ran it (an adopted trial continues its predecessor's)."""
    from mlflow import MlflowClient

    children = mlflow_children(root)
    by_trial = {r.data.tags["dsanet.trial_id"]: r for r in children}
    assert len(children) == len(by_trial) == len(trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    for trial in trials:
        run = by_trial[trial.user_attrs["ray_trial_id"]]
        assert run.info.status != "RUNNING"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ap")]
        assert sorted(steps) == [e - 1 for e in epochs_of(trial)]


# ---------------------------------------------------------------------------- a 2-node cluster


@pytest.mark.slow
def test_trial_finishes_from_its_checkpoint_when_its_node_is_removed(tmp_path, xd_small):
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    epochs = 5
    space = one_trial_space(tmp_path, xd_small, epochs)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials go to workers
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    root, removed = tmp_path / "studies" / "t", []

    def remove_the_trials_node() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not removed:
            trial_dirs = list((root / "trials").glob("*"))
            lines = reports(root, trial_dirs[0].name) if trial_dirs else []
            if lines:
                time.sleep(1.0)  # let the driver register the epoch's checkpoint
                removed.append(lines[-1]["pid"])
                cluster.remove_node(_node_of(lines[-1]["pid"], workers))
            time.sleep(0.2)

    remover = threading.Thread(target=remove_the_trials_node, daemon=True)
    remover.start()
    try:
        assert run(space, "--address", cluster.address) == 0
    finally:
        remover.join(timeout=5)
        cluster.shutdown()
    assert removed, "the trial's node was never removed"
    (trial,) = study_trials(root)
    assert trial.state == TrialState.COMPLETE and epochs_of(trial) == list(range(1, epochs + 1))
    assert_resumed_from_checkpoint(root, trial, removed[0], epochs)


def _node_of(pid: int, nodes: list) -> object:
    """The cluster_utils node whose raylet started worker `pid`."""
    parent = pid
    while parent > 1:
        for node in nodes:
            if node.all_processes["raylet"][0].process.pid == parent:
                return node
        stat = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()
        parent = int(stat[1])
    raise AssertionError(f"worker {pid} belongs to no worker node")


# ---------------------------------------------------------------------------- validation


def test_dry_run_prints_the_plan_without_starting_ray(tmp_path, xd_small, capsys):
    import ray

    space = write_space(tmp_path, xd_small, max_failures=0)
    assert run(space, "--dry-run", "--num-samples", "6") == 0
    out = capsys.readouterr().out
    assert "study t: 6 trials, 2 at a time" in out
    assert "a failed trial retried up to 0 time(s)" in out
    assert "ASHA on val_ap: max_t 3 epochs, rungs at epochs 1, 2" in out
    assert not ray.is_initialized() and not (tmp_path / "studies").exists()


def test_bad_input_is_one_error_line_before_ray(tmp_path, xd_small, capsys):
    space = write_space(tmp_path, xd_small, metric="val_apx")
    assert run(space, "--dry-run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'val_ap'" in err and "Traceback" not in err
    missing = write_space(tmp_path / "m", {**xd_small, "features": tmp_path / "absent"})
    assert run(missing) == 2
    assert "data.feature_root" in capsys.readouterr().err
    (tmp_path / "x" / "studies" / "t").mkdir(parents=True)
    (tmp_path / "x" / "studies" / "t" / "optuna.db").touch()
    assert run(write_space(tmp_path / "x", xd_small), "--dry-run") == 2
    assert "pass --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------- what Optuna holds


@pytest.mark.slow
def test_asha_stops_are_pruned_in_optuna(tmp_path, xd_small, local_ray):
    # One trial at a time: ASHA's decisions are deterministic for these seeds.
    space = write_space(tmp_path, xd_small, num_samples=4, max_concurrent=1)
    assert run(space) == 0
    root = tmp_path / "studies" / "t"
    trials = study_trials(root)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 4 and pruned and complete and len(pruned) + len(complete) == 4
    assert_asha_replays(space, root)  # PRUNED = stopped by ASHA, at the epoch it stopped
    for t in pruned:
        assert 1 <= len(t.intermediate_values) < MAX_T  # stopped at a rung
    for t in complete:
        assert sorted(t.intermediate_values) == list(range(1, MAX_T + 1))
        assert t.value == max(t.intermediate_values.values())  # val_ap at fit()'s best epoch
    for t in trials:  # finished: Ray's checkpoint and the trial folder keep no optimizer state
        trial_id = t.user_attrs["ray_trial_id"]
        (checkpoint,) = (root / "ray" / trial_id).glob("checkpoint_*")
        assert sorted(p.name for p in checkpoint.iterdir()) == [
            "best.pt",
            "config.yaml",
            "progress.json",
        ]
        assert sorted(p.name for p in (root / "trials" / trial_id).iterdir()) == [
            "best.pt",
            "config.yaml",
            "reports.jsonl",
        ]
    assert_mlflow_matches(root, trials)
    # One file for a trial's weights: the trial folder, Ray's checkpoint and MLflow share it.
    artifacts = {r.data.tags["dsanet.trial_id"]: r.info.artifact_uri for r in mlflow_children(root)}
    for t in trials:
        trial_id = t.user_attrs["ray_trial_id"]
        (checkpoint,) = (root / "ray" / trial_id).glob("checkpoint_*")
        best = root / "trials" / trial_id / "best.pt"
        assert best.samefile(checkpoint / "best.pt")
        assert best.samefile(Path(artifacts[trial_id]) / "best.pt")
        assert best.stat().st_nlink == 3


@pytest.mark.slow
def test_multi_objective_prunes_on_the_first_and_fronts_complete_trials(
    tmp_path, xd_small, local_ray
):
    space = write_space(
        tmp_path,
        xd_small,
        metric=["val_ap", "val_auc"],
        mode=["max", "max"],
        num_samples=4,
        max_concurrent=1,
    )
    assert run(space) == 0
    root = tmp_path / "studies" / "t"
    trials = study_trials(root)
    from ray_fixtures import load_study

    assert load_study(root).user_attrs["scheduler"]["metric"] == "val_ap"
    assert_asha_replays(space, root)  # ASHA ranked by val_ap alone, and pruned what it stopped
    assert all(t.state in FINISHED for t in trials)
    assert any(t.state == TrialState.PRUNED for t in trials)
    front = load_study(root).best_trials
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    for t in (t for t in trials if t.state == TrialState.COMPLETE):
        records = t.user_attrs["epochs"]
        best = max(records, key=lambda e: (records[e]["select"], -int(e)))
        assert t.values == records[best]["values"]


# ---------------------------------------------------------------------------- crash and resume


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume_loses_and_repeats_nothing(tmp_path, xd_small, ray_tmp):
    space = write_space(tmp_path, xd_small, num_samples=4)
    root = tmp_path / "studies" / "t"
    proc = start_study(["--space", str(space), "--final-seeds", "0"], tmp_path / "1.log", ray_tmp)
    mid: dict = {}

    def one_done_one_mid() -> bool:
        """A trial finished, and another has since saved a checkpoint that Ray recorded (with
        every trial Optuna knows: trials Ray lost are the other test's subject)."""
        trials = study_trials(root)
        done = [t for t in trials if t.state in FINISHED]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if not done or not _ray_knows(root, trials):
            return False
        finished_at = max(t.datetime_complete for t in done)
        for t in running:
            if max(_report_times(root, t)) > finished_at and _ray_recorded(root, t):
                mid.update(trial=t, done={t.number: t for t in done})
                return True
        return False

    try:
        wait_for(one_done_one_mid, proc, timeout=300)
    finally:
        kill_study(proc)
    asha_before = rebuilt_asha(space, root)  # what the resumed driver starts from
    resumed = start_study(
        ["--space", str(space), "--final-seeds", "0", "--resume"], tmp_path / "2.log", ray_tmp
    )
    assert resumed.wait(timeout=420) == 0, (tmp_path / "2.log").read_text()[-3000:]

    trials = study_trials(root)
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials)
    assert len({t.user_attrs["ray_trial_id"] for t in trials}) == 4
    for number, before in mid["done"].items():  # finished before the kill: untouched
        assert trials[number].state == before.state
        assert trials[number].intermediate_values == before.intermediate_values
    for t in trials:  # each (re)start continues from its checkpoint; at most the epoch in
        # flight at the kill (reported by the worker, never received by the driver) runs twice
        lines = reports(root, t.user_attrs["ray_trial_id"])
        epochs = [line["epoch"] for line in lines]
        assert sorted(set(epochs)) == list(range(len(epochs_of(t)))), (t.number, epochs)
        assert len(epochs) - len(set(epochs)) <= 1, (t.number, epochs)
        starts = [i for i, line in enumerate(lines) if line["resumed_at"] >= 0]
        for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
            first = lines[start]["resumed_at"]
            assert epochs[start:end] == list(range(first, first + end - start)), epochs
    resumed_trial = trials[mid["trial"].number]
    lines = reports(root, resumed_trial.user_attrs["ray_trial_id"])
    restarts = [line["resumed_at"] for line in lines if line["resumed_at"] > 0]
    seen = len(mid["trial"].intermediate_values)  # Ray may have saved one more before the kill
    assert len(restarts) == 1 and restarts[0] in (seen, seen + 1)  # from its checkpoint
    # The resumed driver held the rungs of the killed one, and kept every record of them.
    records = sum(len(recorded) for _, recorded in asha_before.rungs())
    assert records and f"Optuna study: {records} records" in (tmp_path / "2.log").read_text()
    asha_after = rebuilt_asha(space, root)
    for (m_before, before), (m_after, after) in zip(
        asha_before.rungs(), asha_after.rungs(), strict=True
    ):
        assert m_before == m_after and before.items() <= after.items()
    for t in trials:
        ray_id = t.user_attrs["ray_trial_id"]
        assert asha_after.pruned(ray_id) == (t.state == TrialState.PRUNED)
        assert not asha_before.pruned(ray_id) or asha_after.pruned(ray_id)
    assert_mlflow_matches(root, trials)


@pytest.mark.slow
def test_resume_after_a_kill_before_ray_saved_any_trial(tmp_path, xd_small, ray_tmp):
    # Tuner.restore raises IndexError on such a state; Optuna's record restarts the study.
    one_epoch = tiny_overrides(xd_small, **{"train.epochs": 1})
    space = write_space(
        tmp_path, xd_small, overrides=one_epoch, num_samples=2, scheduler={"kind": "none"}
    )
    root = tmp_path / "studies" / "t"
    proc = start_study(["--space", str(space), "--final-seeds", "0"], tmp_path / "1.log", ray_tmp)
    try:
        # Killed once a trial has its MLflow run, before it reports an epoch.
        wait_for(lambda: bool(study_trials(root) and _has_children(root)), proc, timeout=180)
        asked = {t.number: t.params for t in study_trials(root)}
        assert not any(t.intermediate_values for t in study_trials(root))
    finally:
        kill_study(proc)
    had_run = _run_keys(root)  # the other trial may still have been PENDING, without a run
    _forget_ray_trials(root / "ray")
    resumed = start_study(
        ["--space", str(space), "--final-seeds", "0", "--resume"], tmp_path / "2.log", ray_tmp
    )
    assert resumed.wait(timeout=300) == 0, (tmp_path / "2.log").read_text()[-3000:]
    trials = study_trials(root)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # no orphan, no extra ask
    assert all(trials[n].params == params for n, params in asked.items())  # adopted
    for t in trials:
        assert epochs_of(t) == [1]
        assert [r["epoch"] for r in reports(root, t.user_attrs["ray_trial_id"])] == [0]
    adopted = {t.number for t in trials if t.user_attrs.get("adopted_from")}
    assert had_run and had_run <= {f"trial/{n}" for n in adopted}  # Ray lost both trials
    runs = {r.data.tags["dsanet.run_key"]: r for r in mlflow_children(root)}
    for t in trials:  # a lost trial's run is continued by its adopter, not left beside a new one
        run = runs[f"trial/{t.number}"]
        assert run.data.tags["dsanet.trial_id"] == t.user_attrs["ray_trial_id"]
    assert_mlflow_matches(root, trials)


def _run_keys(root: Path) -> set[str]:
    """The keys of the trial runs in the study's MLflow store (read-only SQL: cheap to poll)."""
    import sqlite3

    query = "SELECT value FROM tags WHERE key = 'dsanet.run_key' AND value LIKE 'trial/%'"
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{root / 'mlflow.db'}?mode=ro", uri=True)
        ) as db:
            return {key for (key,) in db.execute(query)}
    except sqlite3.Error:  # not created yet, or busy
        return set()


def _has_children(root: Path) -> bool:
    """Whether MLflow has accepted a trial run of the study."""
    return bool(_run_keys(root))


def _forget_ray_trials(ray_dir: Path) -> None:
    """Make Ray's state hold no trial, as when the driver dies before saving one (a kill
    this early often leaves no state file at all: nothing to do then)."""
    for state_file in ray_dir.glob("experiment_state-*.json"):
        state = json.loads(state_file.read_text())
        state["trial_data"] = []
        state_file.write_text(json.dumps(state))


def _ray_knows(root: Path, trials: list) -> bool:
    """Whether Ray's newest saved state lists every trial."""
    states = sorted((root / "ray").glob("experiment_state-*.json"))
    text = states[-1].read_text() if states else ""
    return all(t.user_attrs.get("ray_trial_id", "?") in text for t in trials)


def _ray_recorded(root: Path, trial) -> bool:
    """Whether Ray's saved state holds the checkpoint of the trial's last reported epoch."""
    index = len(trial.intermediate_values) - 1
    # The checkpoint manager is stored as hex-encoded cloudpickle inside the JSON.
    needle = f"{trial.user_attrs['ray_trial_id']}/checkpoint_{index:06d}".encode().hex()
    return any(needle in f.read_text() for f in (root / "ray").glob("experiment_state-*.json"))


def _report_times(root: Path, trial) -> list:
    from datetime import datetime

    lines = reports(root, trial.user_attrs.get("ray_trial_id", ""))
    return [datetime.fromtimestamp(line["time"]) for line in lines] or [datetime.min]


# ---------------------------------------------------------------------- a folder from elsewhere


class _Payload:
    """Unpickling it creates a file: what a hostile pickle in a shared folder could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_ray_state_of_a_study_from_elsewhere_is_never_unpickled(
    tmp_path, xd_small, local_ray, monkeypatch, capsys
):
    import pickle

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "author-state"))
    space = write_space(tmp_path, xd_small, num_samples=1, points_to_evaluate=[])
    assert run(space) == 0
    root = tmp_path / "studies" / "t"
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live
    assert marker.exists()
    marker.unlink()
    (root / "ray" / "tuner.pkl").write_bytes(payload)
    capsys.readouterr()

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "colleague-state"))
    assert run(space, "--resume") == 0  # the study was complete: nothing left to run
    assert not marker.exists()
    assert "was not written by a driver of this user on this machine" in capsys.readouterr().err
    (aside,) = root.glob("ray.not-loaded-*")
    assert (aside / "tuner.pkl").read_bytes() == payload  # kept, unread
    assert len(study_trials(root)) == 1
