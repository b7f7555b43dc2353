"""ASHA's rungs rebuilt from the Optuna study, driven the way Ray drives it (no Ray runtime).

A study is filled by the searcher while a scheduler sees the same results live, with the calls
and in the order Ray's controller makes them; a scheduler then built from the study alone holds
the same rungs and the same stopped trials, and carries on where the live one stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray_fixtures import MAX_T, write_space

from tune.scheduler import StudyASHA, build_scheduler, rung_epochs
from tune.searcher import OPTUNA_KEY, RAY_TRIAL_ATTR, STEP_KEY, OptunaSearcher
from tune.space import load_space

FAKE_DATA = {"lists": Path("/nowhere/lists"), "features": Path("/nowhere/f"), "cache": Path("/c")}


def make_spec(tmp_path: Path, mode: str = "max", reduction_factor: float = 2.0, **fields):
    scheduler = {"kind": "asha", "max_t": MAX_T, "grace_period": 1}
    scheduler["reduction_factor"] = reduction_factor
    space = write_space(tmp_path / "space", FAKE_DATA, mode=mode, scheduler=scheduler, **fields)
    return load_space(space)


def result(epoch: int, value: float) -> dict:
    """A flattened Tune result (epoch: epochs completed); val_ap is also the selection metric."""
    return {STEP_KEY: epoch, "val_ap": value, "val_auc": 0.5, "best_val_ap": value}


class Driver:
    """Ray's controller calls, for one searcher and one scheduler sharing the trials."""

    def __init__(self, searcher: OptunaSearcher, scheduler: StudyASHA) -> None:
        self.searcher, self.scheduler = searcher, scheduler
        self.trials: dict[str, Trial] = {}

    def add(self, trial_id: str) -> Trial:
        config = self.searcher.suggest(trial_id)
        trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True)
        self.scheduler.on_trial_add(None, trial)
        self.trials[trial_id] = trial
        return trial

    def epochs(self, trial_id: str, values: list[float], first: int = 1) -> list[str]:
        """Report `values` from epoch `first` on, until the scheduler stops the trial."""
        trial, decisions = self.trials[trial_id], []
        for epoch, value in enumerate(values, start=first):
            r = result(epoch, value)
            decisions.append(self.scheduler.on_trial_result(None, trial, r))
            if decisions[-1] == TrialScheduler.STOP:  # TuneController.stop_trial
                self.scheduler.on_trial_complete(None, trial, r)
                self.searcher.on_trial_complete(trial_id, result=r)
                break
            self.searcher.on_trial_result(trial_id, r)
        return decisions

    def error(self, trial_id: str) -> None:
        self.scheduler.on_trial_error(None, self.trials[trial_id])
        self.searcher.on_trial_complete(trial_id, error=True)


def asha_of(spec, history=()) -> StudyASHA:
    s = spec.scheduler
    return StudyASHA(
        spec.metric[0], spec.mode[0], s.max_t, s.grace_period, s.reduction_factor, history
    )


def independent_rungs(spec, study) -> dict[float, dict[int, float]]:
    """The rungs by hand: a trial's record at a milestone is its first-objective value (negated
    for min) at the first epoch that reaches the milestone, passing no higher unrecorded one."""
    sign = 1.0 if spec.mode[0] == "max" else -1.0
    milestones = rung_epochs(spec.scheduler)
    rungs: dict[float, dict[int, float]] = {m: {} for m in milestones}
    for trial in study.trials:
        epochs = {int(k): v["values"][0] for k, v in trial.user_attrs.get("epochs", {}).items()}
        for epoch in sorted(epochs):
            reached = [m for m in milestones if m <= epoch and trial.number not in rungs[m]]
            if reached:
                rungs[max(reached)][trial.number] = sign * epochs[epoch]
    return rungs


def numbers(driver: Driver) -> dict[str, int]:
    return {ray_id: t.config[OPTUNA_KEY] for ray_id, t in driver.trials.items()}


@pytest.mark.parametrize("mode, reduction_factor", [("max", 2.0), ("min", 2.0), ("max", 1.5)])
def test_rungs_rebuilt_from_optuna_equal_the_live_ones(tmp_path, mode, reduction_factor):
    spec = make_spec(tmp_path, mode, reduction_factor)
    study_dir = tmp_path / "study"
    live = asha_of(spec)
    driver = Driver(OptunaSearcher(spec, study_dir, pruned=live.pruned), live)
    better = (lambda v: v) if mode == "max" else (lambda v: 1.0 - v)
    for trial_id in ("good", "bad", "cut", "err", "late"):
        driver.add(trial_id)
    assert driver.epochs("good", [better(v) for v in (0.8, 0.85, 0.9)])[-1] == "STOP"  # max_t
    assert driver.epochs("bad", [better(v) for v in (0.2, 0.3, 0.4)]) == ["STOP"]  # rung 1
    driver.epochs("cut", [better(v) for v in (0.9, 0.95)])  # interrupted with the driver
    driver.epochs("err", [better(0.85)])
    driver.error("err")
    driver.epochs("late", [better(v) for v in (0.95, 0.1, 0.1)])  # stopped at a later rung

    study = driver.searcher.study
    states = {t.user_attrs[RAY_TRIAL_ATTR]: t.state for t in study.trials}
    assert states == {
        "good": TrialState.COMPLETE,
        "bad": TrialState.PRUNED,
        "cut": TrialState.RUNNING,
        "err": TrialState.FAIL,
        "late": TrialState.PRUNED,
    }
    rebuilt = build_scheduler(spec, study)
    assert rebuilt.rungs() == live.rungs()
    assert {m: r for m, r in rebuilt.rungs()} == independent_rungs(spec, study)
    assert sum(len(r) for _, r in rebuilt.rungs()) >= 8  # every trial has records
    for trial_id, number in numbers(driver).items():
        assert rebuilt.pruned(number) == live.pruned(number) == (trial_id in ("bad", "late"))


def test_a_rebuilt_scheduler_carries_on_where_the_live_one_stopped(tmp_path):
    spec = make_spec(tmp_path)
    live = asha_of(spec)
    driver = Driver(OptunaSearcher(spec, tmp_path / "study", pruned=live.pruned), live)
    for trial_id in ("good", "bad", "cut"):
        driver.add(trial_id)
    driver.epochs("good", [0.9, 0.9, 0.9])
    assert driver.epochs("bad", [0.1]) == [TrialScheduler.STOP]
    driver.epochs("cut", [0.6])  # then the driver dies

    # --resume: a new Tuner with new Ray trial ids; Optuna's record is all it has.
    resumed = build_scheduler(spec, driver.searcher.study)
    twin = asha_of(spec, driver.searcher.study.trials)
    assert resumed.rungs() == twin.rungs() == live.rungs()
    after = Driver(OptunaSearcher(spec, tmp_path / "study", pruned=resumed.pruned), resumed)
    after.add("cut again")  # the trial left running is adopted first, under its number
    assert numbers(after)["cut again"] == numbers(driver)["cut"]
    # Its folder holds epoch 1: it is reported again (kept once), then training goes on.
    assert after.epochs("cut again", [0.6, 0.95, 0.95]) == ["CONTINUE", "CONTINUE", "STOP"]
    assert sum(numbers(driver)["cut"] in records for _, records in resumed.rungs()) == 2
    # A new trial meets the old rungs: below the records of epoch 1 it is stopped there.
    after.add("new")
    assert after.epochs("new", [0.2]) == [TrialScheduler.STOP]
    states = {t.number: t.state for t in after.searcher.study.trials}
    assert states == {
        numbers(driver)["good"]: TrialState.COMPLETE,
        numbers(driver)["bad"]: TrialState.PRUNED,
        numbers(driver)["cut"]: TrialState.COMPLETE,
        numbers(after)["new"]: TrialState.PRUNED,
    }
    assert resumed.pruned(numbers(driver)["bad"]) and not resumed.pruned(numbers(driver)["cut"])


def test_a_new_study_starts_with_empty_rungs(tmp_path):
    spec = make_spec(tmp_path)
    scheduler = build_scheduler(spec, OptunaSearcher(spec, tmp_path / "study").study)
    assert [m for m, _ in scheduler.rungs()] == sorted(rung_epochs(spec.scheduler), reverse=True)
    assert all(not records for _, records in scheduler.rungs())


def test_scheduler_none_is_fifo(tmp_path):
    spec = load_space(write_space(tmp_path, FAKE_DATA, scheduler={"kind": "none"}))
    assert isinstance(build_scheduler(spec), FIFOScheduler)
    assert spec.scheduler.max_t == spec.base.train.epochs
