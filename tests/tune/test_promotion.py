"""Promotion ASHA's decisions on synthetic results, driven the way Ray's controller drives it
(no Ray runtime): pause below a rung's cut, continue when promoted, resume a paused trial that
later records promote before a new one starts, end the rest PRUNED when nothing can change the
rungs, and rebuild all of it from the Optuna study after a driver restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray_fixtures import MAX_T, write_space

from tune.promotion import PromotionASHA, PromotionLimiter
from tune.scheduler import build_scheduler, rung_epochs
from tune.searcher import OPTUNA_KEY, STEP_KEY, OptunaSearcher
from tune.space import SchedulerSpec, load_space, rung_milestones

FAKE_DATA = {"lists": Path("/nowhere/lists"), "features": Path("/nowhere/f"), "cache": Path("/c")}
GO, PAUSE, STOP = TrialScheduler.CONTINUE, TrialScheduler.PAUSE, TrialScheduler.STOP


def make_spec(tmp_path: Path, **fields):
    scheduler = {"kind": "asha-promotion", "max_t": MAX_T, "grace_period": 1}
    scheduler["reduction_factor"] = 2
    fields = {"num_samples": 8, "points_to_evaluate": [], **fields}
    return load_space(write_space(tmp_path / "space", FAKE_DATA, scheduler=scheduler, **fields))


def result(epoch: int, value: float) -> dict:
    return {STEP_KEY: epoch, "val_ap": value, "val_auc": 0.5, "best_val_ap": value}


class Controller:
    """What Ray's TuneController does around a scheduler and a searcher, for these tests:
    the trials and their status, the hooks in Ray's order, `stop_trial` of a paused trial."""

    def __init__(self, searcher: OptunaSearcher, scheduler: PromotionASHA, size: int) -> None:
        self.searcher, self.scheduler, self.size = searcher, scheduler, size
        self.limiter = PromotionLimiter(searcher, 2, scheduler)
        self.trials: dict[str, Trial] = {}
        self.search_alg = self  # what the scheduler asks is_finished() of

    def is_finished(self) -> bool:
        return len(self.trials) >= self.size

    def get_trials(self) -> list[Trial]:
        return list(self.trials.values())

    def add(self, trial_id: str) -> Trial | None:
        config = self.limiter.suggest(trial_id)
        if config is None:
            return None
        trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True)
        trial.set_status(Trial.RUNNING)
        self.scheduler.on_trial_add(self, trial)
        self.trials[trial_id] = trial
        return trial

    def epochs(self, trial_id: str, values: list[float], first: int = 1) -> list[str]:
        """Report `values` from epoch `first` on, until the scheduler pauses or stops it."""
        trial, decisions = self.trials[trial_id], []
        for epoch, value in enumerate(values, start=first):
            r = result(epoch, value)
            decisions.append(self.scheduler.on_trial_result(self, trial, r))
            if decisions[-1] == STOP:
                self.scheduler.on_trial_complete(self, trial, r)
                self.limiter.on_trial_complete(trial_id, result=r)
                trial.set_status(Trial.TERMINATED)
                break
            self.limiter.on_trial_result(trial_id, r)
            if decisions[-1] == PAUSE:
                trial.set_status(Trial.PAUSED)
                break
        return decisions

    def next_to_run(self) -> str | None:
        trial = self.scheduler.choose_trial_to_run(self)
        if trial is None:
            return None
        trial.set_status(Trial.RUNNING)
        return trial.trial_id

    def stop_trial(self, trial: Trial) -> None:  # TuneController.stop_trial of a PAUSED trial
        self.scheduler.on_trial_remove(self, trial)
        self.limiter.on_trial_complete(trial.trial_id)
        trial.set_status(Trial.TERMINATED)


def promotion_of(spec, history=()) -> PromotionASHA:
    s = spec.scheduler
    return PromotionASHA(
        spec.metric[0], spec.mode[0], s.max_t, s.grace_period, s.reduction_factor, 2, history
    )


@pytest.mark.parametrize("max_t, grace, eta", [(3, 1, 2), (10, 2, 3), (4, 1, 1.5), (9, 1, 3)])
def test_rung_milestones_are_rays_below_max_t(max_t, grace, eta):
    rays = rung_epochs(SchedulerSpec("asha", max_t, grace, eta))
    assert rung_milestones(max_t, grace, eta) == [m for m in sorted(rays) if m < max_t]


def test_pause_continue_promote_on_synthetic_results():
    asha = PromotionASHA("val_ap", "max", 3, 1, 2, max_concurrent=2)
    # Rung 1 keeps the best floor(n / 2) of its n records.
    assert asha.decide(0, 1, 0.5) == PAUSE  # n=1: nobody yet
    assert asha.decide(1, 1, 0.7) == GO  # n=2: the best one
    assert asha.decide(2, 1, 0.6) == PAUSE
    assert asha.decide(3, 1, 0.9) == GO  # n=4: top 2 = 3, 1
    assert asha.decide(1, 2, 0.8) == PAUSE  # rung 2, n=1
    assert asha.decide(4, 1, 0.65) == PAUSE  # n=5: top 2 = 3, 1
    assert asha.promotable() == []
    assert asha.decide(5, 1, 0.55) == PAUSE  # n=6: top 3 = 3, 1, 4 -> 4 waits to be promoted
    assert asha.promotable() == [4]
    assert asha.decide(3, 2, 0.75) == PAUSE  # rung 2, n=2: 1 (0.8) is promoted
    assert asha.promotable() == [1, 4]  # the highest rung first
    assert asha.paused() == {0: 1, 2: 1, 1: 2, 4: 1, 5: 1, 3: 2}
    # A replay of epochs already recorded changes no record; a promoted trial goes on.
    assert asha.decide(1, 1, 0.0) == GO and asha.rungs()[1][1][1] == 0.7
    # A paused trial that reports again (restarted) is judged again: now it goes on.
    assert asha.decide(1, 2, 0.8) == GO and 1 not in asha.paused()
    assert asha.decide(7, 3, 0.1) == STOP  # max_t: the trial is complete
    minimise = PromotionASHA("loss_total", "min", 3, 1, 2, max_concurrent=1)
    assert minimise.decide(0, 1, 2.0) == PAUSE and minimise.decide(1, 1, 1.0) == GO
    assert minimise.decide(2, 1, float("nan")) == PAUSE  # a non-finite record is the worst


def test_a_paused_trial_is_resumed_before_a_new_one_and_the_rest_end_pruned(tmp_path):
    spec = make_spec(tmp_path, num_samples=5)
    live = promotion_of(spec)
    ray = Controller(OptunaSearcher(spec, tmp_path / "study", pruned=live.pruned), live, 5)
    ray.add("a")
    assert ray.epochs("a", [0.5]) == [PAUSE]  # alone at rung 1; its slot frees
    ray.add("b")
    ray.add("c")
    assert ray.add("x") is None  # b and c run: two at a time (a, paused, is not counted)
    assert ray.epochs("b", [0.7, 0.8]) == [GO, PAUSE]  # promoted at rung 1, alone at rung 2
    assert ray.epochs("c", [0.4]) == [PAUSE]  # rung 1: top 1 of 3 is b
    ray.add("d")
    assert ray.epochs("d", [0.3]) == [PAUSE]  # rung 1: top 2 of 4 are b and a
    number = {i: t.config[OPTUNA_KEY] for i, t in ray.trials.items()}
    assert live.promotable() == [number["a"]]
    assert ray.add("e") is None  # a waits for promotion: no new trial before it
    assert ray.next_to_run() == "a"  # Ray restarts it; its folder replays epoch 1
    assert ray.epochs("a", [0.5, 0.9, 0.9]) == [GO, GO, STOP]  # rung 2: top 1 of 2
    ray.add("e")
    assert ray.epochs("e", [0.2]) == [PAUSE]
    assert ray.search_alg.is_finished()  # the search has asked its 5 trials
    # Nothing runs, nothing can be asked, no record can change: the paused trials end.
    assert live.promotable() == [] and ray.next_to_run() is None
    states = {t.number: t.state for t in ray.searcher.study.trials}
    assert {i: states[n] for i, n in {**number, "e": 4}.items()} == {
        "a": TrialState.COMPLETE,
        "b": TrialState.PRUNED,
        "c": TrialState.PRUNED,
        "d": TrialState.PRUNED,
        "e": TrialState.PRUNED,
    }
    assert ray.searcher.study.trials[number["a"]].intermediate_values == {1: 0.5, 2: 0.9, 3: 0.9}
    assert all(t.status == Trial.TERMINATED for t in ray.trials.values())
    assert live.paused() == {} and not live.pruned(number["a"])
    assert all(live.pruned(n) for n in (number["b"], number["c"], number["d"], 4))


def test_a_restarted_driver_rebuilds_the_rungs_and_judges_a_paused_trial_again(tmp_path):
    spec = make_spec(tmp_path, num_samples=6)
    live = promotion_of(spec)
    ray = Controller(OptunaSearcher(spec, tmp_path / "study", pruned=live.pruned), live, 6)
    for trial_id, values in (("a", [0.5]), ("b", [0.7, 0.8]), ("c", [0.2])):
        ray.add(trial_id)
        ray.epochs(trial_id, values)
    number = {i: t.config[OPTUNA_KEY] for i, t in ray.trials.items()}
    assert live.paused() == {number["a"]: 1, number["b"]: 2, number["c"]: 1}
    # The driver dies; the paused trials are RUNNING in Optuna, and their folders hold them.
    study = ray.searcher.study
    assert {t.state for t in study.trials} == {TrialState.RUNNING}
    resumed = build_scheduler(spec, study)
    assert isinstance(resumed, PromotionASHA) and resumed.rungs() == live.rungs()
    after = Controller(OptunaSearcher(spec, tmp_path / "study", pruned=resumed.pruned), resumed, 6)
    # The adopted trials replay their epochs and are judged again at their rungs.
    after.add("a2")
    after.add("b2")
    assert after.epochs("a2", [0.5]) == [PAUSE]  # rung 1: top 1 of 3 is b
    assert after.epochs("b2", [0.7, 0.8]) == [GO, PAUSE]  # promoted before; alone at rung 2
    after.add("c2")
    assert after.epochs("c2", [0.2]) == [PAUSE]
    adopted = {i: after.trials[i].config[OPTUNA_KEY] for i in ("a2", "b2", "c2")}
    assert adopted == {"a2": number["a"], "b2": number["b"], "c2": number["c"]}
    # A new trial is judged against the rebuilt records, and one of them promotes b.
    after.add("d")
    assert after.epochs("d", [0.6, 0.75]) == [GO, PAUSE]  # rung 1: top 2 of 4; rung 2: b's
    assert resumed.promotable() == [number["b"]]
    assert after.next_to_run() == "b2"
    assert after.epochs("b2", [0.7, 0.8, 0.85]) == [GO, GO, STOP]
    assert after.searcher.study.trials[number["b"]].state == TrialState.COMPLETE


def test_a_retried_trial_keeps_its_promotion_and_a_failed_one_is_told_fail(tmp_path):
    spec = make_spec(tmp_path, num_samples=4)
    live = promotion_of(spec)
    ray = Controller(OptunaSearcher(spec, tmp_path / "study", pruned=live.pruned), live, 4)
    ray.add("a")
    ray.add("b")
    assert ray.epochs("a", [0.5]) == [PAUSE]
    assert ray.epochs("b", [0.7]) == [GO]  # promoted at rung 1; then its worker is lost
    # Ray's retry restarts it from scratch (TuneController._try_recover): the folder replays
    # epoch 1, which the promotion it was granted lets through, and training goes on.
    assert ray.epochs("b", [0.7, 0.8]) == [GO, PAUSE]  # alone at rung 2
    number = {i: t.config[OPTUNA_KEY] for i, t in ray.trials.items()}
    assert live.rungs()[1][1] == {number["a"]: 0.5, number["b"]: 0.7}  # recorded once
    ray.add("c")
    assert ray.epochs("c", [0.6]) == [PAUSE]
    assert ray.next_to_run() is None  # nothing promotable (rung 1: top 1 of 3 is b)
    ray.add("d")
    ray.scheduler.on_trial_error(ray, ray.trials["d"])  # d fails past its retries
    ray.limiter.on_trial_complete("d", error=True)
    ray.trials["d"].set_status(Trial.ERROR)
    assert ray.searcher.study.trials[3].state == TrialState.FAIL
    assert ray.next_to_run() is None  # all asked, nothing runs: a, b, c end PRUNED
    states = [t.state for t in ray.searcher.study.trials]
    assert states == [TrialState.PRUNED] * 3 + [TrialState.FAIL]
