"""The study driver end to end on a real Ray: what Optuna, ASHA and MLflow end up holding.

A node running a trial is removed (the trial finishes from its folder elsewhere); ASHA's early
stops are PRUNED in Optuna; multi-objective studies prune on the first objective and keep the
Pareto front complete-only; a driver SIGKILLed mid-trial, or before any trial reported, is
resumed with nothing lost or run twice, and Ray's pickled state is never loaded. `--dry-run`
and bad input never start Ray.
"""

from __future__ import annotations

import contextlib
import shutil
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
from tune.searcher import OPTUNA_KEY, STEP_KEY

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
        config = {OPTUNA_KEY: t.number}
        trial = Trial("run_trial", config=config, trial_id=t.user_attrs["ray_trial_id"], stub=True)
        live.on_trial_add(None, trial)
        records = t.user_attrs["epochs"]
        for epoch in epochs_of(t):
            result = {STEP_KEY: epoch, spec.metric[0]: records[str(epoch)]["values"][0]}
            if live.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                live.on_trial_complete(None, trial, result)
                assert epoch == epochs_of(t)[-1], (t.number, epoch)  # stopped where it ended
                break
        assert live.pruned(t.number) == (t.state == TrialState.PRUNED), t.number
    rebuilt = rebuilt_asha(space, root)
    assert rebuilt.rungs() == live.rungs()
    for t in trials:
        assert rebuilt.pruned(t.number) == (t.state == TrialState.PRUNED)


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
def test_trial_finishes_from_its_folder_when_its_node_is_removed(tmp_path, xd_small):
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    epochs = 5
    space = one_trial_space(tmp_path, xd_small, epochs)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials go to workers
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    root, removed = tmp_path / "studies" / "t", []

    ended = threading.Event()

    def remove_the_trials_node() -> None:
        while not ended.is_set() and not removed:
            trial_dirs = list((root / "trials").glob("*"))
            lines = reports(root, trial_dirs[0].name) if trial_dirs else []
            if lines:
                time.sleep(1.0)  # into the next epoch
                removed.append(lines[-1]["pid"])
                cluster.remove_node(_node_of(lines[-1]["pid"], workers))
            time.sleep(0.2)

    remover = threading.Thread(target=remove_the_trials_node, daemon=True)
    remover.start()
    try:
        assert run(space, "--address", cluster.address) == 0
    finally:
        ended.set()  # however long the study took (a loaded machine trains slowly)
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
    assert not list((root / "ray").rglob("checkpoint_*"))  # Ray holds no state of ours
    for t in trials:  # finished: the trial folder keeps no optimizer state
        assert sorted(p.name for p in (root / "trials" / str(t.number)).iterdir()) == [
            "best.pt",
            "config.yaml",
            "reports.jsonl",
        ]
    assert_mlflow_matches(root, trials)
    # One file for a trial's weights: the trial folder and MLflow's artifact share it.
    artifacts = {
        r.data.tags["dsanet.optuna_trial"]: r.info.artifact_uri for r in mlflow_children(root)
    }
    for t in trials:
        best = root / "trials" / str(t.number) / "best.pt"
        assert best.samefile(Path(artifacts[str(t.number)]) / "best.pt")
        assert best.stat().st_nlink == 2


@pytest.mark.slow
def test_promotion_asha_pauses_resumes_and_ends_every_trial(tmp_path, xd_small, local_ray):
    """asha-promotion on a real Ray: a trial paused at a rung is restarted by Ray without a
    checkpoint, replays its folder and trains on; each epoch is recorded once in Optuna and
    MLflow, and no trial is left running or paused."""
    scheduler = {"kind": "asha-promotion", "max_t": MAX_T, "grace_period": 1}
    space = write_space(
        tmp_path,
        xd_small,
        scheduler={**scheduler, "reduction_factor": 2},
        num_samples=6,
        max_concurrent=1,
    )
    assert run(space) == 0
    root = tmp_path / "studies" / "t"
    trials = study_trials(root)
    assert len(trials) == 6 and all(t.state in FINISHED for t in trials)
    resumed = []
    for t in trials:
        lines = reports(root, t.number)
        assert [line["epoch"] for line in lines] == [e - 1 for e in epochs_of(t)], t.number
        assert sorted(t.intermediate_values) == epochs_of(t)
        starts = [line for line in lines if line["resumed_at"] >= 0]  # each run's first line
        assert all(line["resumed_at"] == line["epoch"] for line in starts)  # from last.pt
        resumed += [t.number] * any(line["resumed_at"] > 0 for line in starts)
        done = len(epochs_of(t))
        assert (t.state == TrialState.COMPLETE) == (done == MAX_T), t.number
        assert not (root / "trials" / str(t.number) / "last.pt").exists()
    assert resumed, "no paused trial was promoted and resumed"
    # The rungs the driver held are the ones a resume would rebuild: paused = ended PRUNED.
    rebuilt = rebuilt_asha(space, root)
    assert rebuilt.paused() == {}
    for t in trials:
        assert rebuilt.pruned(t.number) == (t.state == TrialState.PRUNED)
    assert_mlflow_matches(root, trials)


@pytest.mark.slow
def test_a_gp_study_runs_and_models_once_its_start_up_completed(tmp_path, xd_small, local_ray):
    """searcher gp on a real Ray: the driver's GPSampler proposes the trials asked after its
    start-up trials completed; every trial is told and kept once in MLflow."""
    space = write_space(
        tmp_path,
        xd_small,
        searcher={"kind": "gp", "seed": 0, "n_startup_trials": 2},
        scheduler={"kind": "none"},
        points_to_evaluate=[],
        num_samples=4,
        max_concurrent=1,
    )
    assert run(space) == 0
    root = tmp_path / "studies" / "t"
    trials = study_trials(root)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    modelled = [any(k.startswith("gp:") for k in t.system_attrs) for t in trials]
    assert modelled == [False, False, True, True]
    assert_mlflow_matches(root, trials)


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
        """A trial finished, and another has reported an epoch since."""
        trials = study_trials(root)
        done = [t for t in trials if t.state in FINISHED]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if not done:
            return False
        finished_at = max(t.datetime_complete for t in done)
        for t in running:
            if max(_report_times(root, t)) > finished_at:
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
    for t in trials:  # each (re)start continues from the trial folder's checkpoint, and every
        # epoch has one line: one trained but never received by the driver is reported again
        lines = reports(root, t.number)
        epochs = [line["epoch"] for line in lines]
        assert epochs == list(range(len(epochs_of(t)))), (t.number, epochs)
        starts = [i for i, line in enumerate(lines) if line["resumed_at"] >= 0]
        assert [lines[i]["resumed_at"] for i in starts] == [epochs[i] for i in starts]
    # The trial the kill cut: its worker may have trained and written one epoch more than the
    # driver had received. The next driver reported that epoch from the trial's folder (in
    # Optuna above: one record per line), and trained on from its checkpoint, unless ASHA
    # stopped it, or it reached max_t, on an epoch it had done.
    lines = reports(root, mid["trial"].number)
    seen = len(mid["trial"].intermediate_values)
    killed = [line for line in lines if line["pid"] == lines[0]["pid"]]
    after = lines[len(killed) :]
    assert lines[: len(killed)] == killed and len(killed) in (seen, seen + 1)
    assert not after or after[0]["resumed_at"] == after[0]["epoch"] >= len(killed)
    assert after or epochs_of(trials[mid["trial"].number])[-1] == len(killed)
    # The resumed driver held the rungs of the killed one, and kept every record of them.
    records = sum(len(recorded) for _, recorded in asha_before.rungs())
    assert records and f"Optuna study: {records} records" in (tmp_path / "2.log").read_text()
    asha_after = rebuilt_asha(space, root)
    for (m_before, before), (m_after, after) in zip(
        asha_before.rungs(), asha_after.rungs(), strict=True
    ):
        assert m_before == m_after and before.items() <= after.items()
    for t in trials:
        assert asha_after.pruned(t.number) == (t.state == TrialState.PRUNED)
        assert not asha_before.pruned(t.number) or asha_after.pruned(t.number)
    assert_mlflow_matches(root, trials)


@pytest.mark.slow
def test_sigkill_with_a_trial_paused_then_resume_judges_it_again(tmp_path, xd_small, ray_tmp):
    """asha-promotion: the driver is killed while a trial waits paused at a rung; the resumed
    driver rebuilds the rungs, adopts the paused trial, which replays its folder and is judged
    again, and every trial ends with each epoch recorded once."""
    scheduler = {"kind": "asha-promotion", "max_t": MAX_T, "grace_period": 1}
    space = write_space(
        tmp_path,
        xd_small,
        scheduler={**scheduler, "reduction_factor": 2},
        num_samples=5,
        max_concurrent=1,
    )
    root, log = tmp_path / "studies" / "t", tmp_path / "1.log"
    proc = start_study(["--space", str(space), "--final-seeds", "0"], log, ray_tmp)
    try:
        wait_for(lambda: "paused at rung epoch" in log.read_text(), proc, timeout=300)
    finally:
        kill_study(proc)
    left = [t for t in study_trials(root) if t.state == TrialState.RUNNING and epochs_of(t)]
    assert left and all((root / "trials" / str(t.number) / "last.pt").is_file() for t in left)
    resumed = start_study(
        ["--space", str(space), "--final-seeds", "0", "--resume"], tmp_path / "2.log", ray_tmp
    )
    assert resumed.wait(timeout=420) == 0, (tmp_path / "2.log").read_text()[-3000:]
    assert (
        "promotion ASHA's rungs rebuilt from the Optuna study" in (tmp_path / "2.log").read_text()
    )
    trials = study_trials(root)
    assert len(trials) == 5 and all(t.state in FINISHED for t in trials)
    for t in trials:
        assert [line["epoch"] for line in reports(root, t.number)] == [
            e - 1 for e in epochs_of(t)
        ], t.number
        assert (t.state == TrialState.COMPLETE) == (len(epochs_of(t)) == MAX_T)
        assert not (root / "trials" / str(t.number) / "last.pt").exists()
    for before in left:  # adopted under its number: its epochs were kept, none run twice
        after = trials[before.number]
        assert epochs_of(after)[: len(epochs_of(before))] == epochs_of(before)
        assert after.user_attrs.get("adopted_from") == before.user_attrs["ray_trial_id"]
    rebuilt = rebuilt_asha(space, root)
    for t in trials:
        assert rebuilt.pruned(t.number) == (t.state == TrialState.PRUNED)
    assert_mlflow_matches(root, trials)


@pytest.mark.slow
def test_resume_after_a_kill_before_any_trial_reported(tmp_path, xd_small, ray_tmp):
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
    shutil.rmtree(root / "ray")  # a resume needs nothing of Ray's
    resumed = start_study(
        ["--space", str(space), "--final-seeds", "0", "--resume"], tmp_path / "2.log", ray_tmp
    )
    assert resumed.wait(timeout=300) == 0, (tmp_path / "2.log").read_text()[-3000:]
    trials = study_trials(root)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # no orphan, no extra ask
    assert all(trials[n].params == params for n, params in asked.items())  # adopted
    for t in trials:
        assert epochs_of(t) == [1]
        assert [r["epoch"] for r in reports(root, t.number)] == [0]
    adopted = {t.number for t in trials if t.user_attrs.get("adopted_from")}
    assert had_run and had_run <= {f"trial/{n}" for n in adopted}  # both were left running
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


def _report_times(root: Path, trial) -> list:
    from datetime import datetime

    lines = reports(root, trial.number)
    return [datetime.fromtimestamp(line["time"]) for line in lines] or [datetime.min]


# ---------------------------------------------------------------------- a folder from elsewhere


class _Payload:
    """Unpickling it creates a file: what a hostile pickle in a shared folder could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_rays_pickled_state_in_a_study_folder_is_never_loaded(tmp_path, xd_small, local_ray):
    import pickle

    space = write_space(tmp_path, xd_small, num_samples=1, points_to_evaluate=[])
    assert run(space) == 0
    root = tmp_path / "studies" / "t"
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live
    assert marker.exists()
    marker.unlink()
    (run_dir,) = (root / "ray").iterdir()
    pickles = [run_dir / "tuner.pkl", *run_dir.glob("*.pkl"), *run_dir.glob("*/*.pkl")]
    for path in pickles:  # every pickle Ray left, as someone else's folder could hold them
        path.write_bytes(payload)
    assert run(space, "--resume") == 0  # the study was complete: nothing left to run
    assert not marker.exists()
    assert len(study_trials(root)) == 1
