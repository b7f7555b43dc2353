"""Promotion-based ASHA (`scheduler.kind: asha-promotion`): a trial not in the top
1/reduction_factor of its rung is paused, not stopped, and resumed if later results promote it.

Ray's own ASHA (`AsyncHyperBandScheduler`, what `tune/scheduler.py` extends) can only stop a
trial at a rung, and Ray has no promotion-based variant, so this one is written on Ray's public
scheduler API (`FIFOScheduler`'s hooks, `TrialScheduler.PAUSE`, `choose_trial_to_run`, and the
controller's `get_trials`, `stop_trial` and `search_alg` that Ray hands a scheduler).

- At each rung (epochs `grace_period * reduction_factor**k` below `max_t`) a trial's first
  result there is recorded. It continues if it is among the best `floor(n / reduction_factor)`
  of the `n` records of the rung (it is promoted), and is paused otherwise. Its slot frees; its
  folder keeps `last.pt`.
- Between trials, a paused trial that later records made promotable is resumed before any new
  trial starts (the highest rung first, then the best score), within `max_concurrent`;
  `PromotionLimiter` holds back new trials meanwhile. Ray restarts a paused function trial from
  scratch (it holds no checkpoint of ours); the trainable replays `last.pt` and trains on.
- When no trial runs, none waits to start and the searcher has asked its last trial, no record
  can change: the paused trials end PRUNED (`pruned(number)` tells the searcher so).

Every decision is a function of the rungs' records and of which trials were promoted, and a
promotion shows as a record at a higher rung, so after a driver restart the rungs are rebuilt
from the Optuna study's per-epoch records, and a trial left paused (RUNNING in Optuna) is
adopted, replays its epochs and is judged again at its rung. A promotion granted but not yet
shown by a record at the next rung (a trial resumed, or continuing, when the driver died) is
judged again too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from tune.searcher import OPTUNA_KEY, STEP_KEY, epoch_records
from tune.space import rung_milestones

log = logging.getLogger(__name__)


class PromotionASHA(FIFOScheduler):
    """Single-bracket promotion ASHA over epochs on the first objective, keyed by Optuna number
    and rebuilt from the study's trials (`history`)."""

    def __init__(
        self,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        max_concurrent: int,
        history: Iterable[optuna.trial.FrozenTrial] = (),
    ) -> None:
        super().__init__()
        self._objective = metric  # Ray's own `metric` stays unset: it checks results by it
        self._sign = 1.0 if mode == "max" else -1.0
        self._max_t, self._eta, self._max_concurrent = max_t, reduction_factor, max_concurrent
        self._milestones = rung_milestones(max_t, grace_period, reduction_factor)
        self._rungs: dict[float, dict[int, float]] = {m: {} for m in self._milestones}
        self._paused: dict[int, float] = {}  # Optuna number -> the rung it waits at
        self._promoted: set[tuple[int, float]] = set()  # (number, rung) promoted this run
        self._pruned: set[int] = set()  # ended at a rung: PRUNED, not COMPLETE
        self._rebuild(history)

    # ------------------------------------------------------------------ public
    def pruned(self, number: int) -> bool:
        """Whether Optuna trial `number` ended at a rung (PRUNED, not COMPLETE)."""
        return number in self._pruned

    def rungs(self) -> list[tuple[float, dict[int, float]]]:
        """(milestone in epochs, {Optuna number: sign-adjusted score}) from the last rung down."""
        return [(m, dict(self._rungs[m])) for m in reversed(self._milestones)]

    def paused(self) -> dict[int, float]:
        """{Optuna number: rung} of the trials paused now."""
        return dict(self._paused)

    def promotable(self) -> list[int]:
        """Paused trials that their rung now promotes, in the order they are resumed."""
        ready = [(m, self._rungs[m][n], n) for n, m in self._paused.items() if self._top(n, m)]
        return [n for _, _, n in sorted(ready, key=lambda r: (-r[0], -r[1], r[2]))]

    def decide(self, number: int, step: float, value: float) -> str:
        """Record one result of trial `number` (epochs done, first objective) and say whether
        it continues, pauses at its rung, or stops at max_t."""
        self._paused.pop(number, None)  # a trial that reports runs (a restart, a replay)
        if step >= self._max_t:
            return TrialScheduler.STOP
        rung = self._record(number, step, value)
        if rung is None or (number, rung) in self._promoted or self._above(number, rung):
            return TrialScheduler.CONTINUE  # below the first rung, promoted, or a replay
        if self._top(number, rung):
            self._promoted.add((number, rung))
            return TrialScheduler.CONTINUE
        self._paused[number] = rung
        return TrialScheduler.PAUSE

    # ------------------------------------------------------------------ Ray hooks
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if STEP_KEY not in result or self._objective not in result:
            return TrialScheduler.CONTINUE
        return self.decide(_number(trial), result[STEP_KEY], result[self._objective])

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._paused.pop(_number(trial), None)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._paused.pop(_number(trial), None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._paused.pop(_number(trial), None)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        waiting = {
            _number(t): t for t in trials if t.status == Trial.PAUSED and _number(t) in self._paused
        }
        busy = sum(
            t.status in (Trial.RUNNING, Trial.PENDING) and _number(t) not in self._paused
            for t in trials
        )
        ready = [n for n in self.promotable() if n in waiting]
        if ready and busy < self._max_concurrent:
            number = ready[0]
            self._promoted.add((number, self._paused.pop(number)))
            return waiting[number]
        for trial in trials:
            if trial.status == Trial.PENDING and _number(trial) not in self._paused:
                return trial
        if waiting and not ready and not busy and tune_controller.search_alg.is_finished():
            for number, trial in waiting.items():  # no record can change: they end here
                self._pruned.add(number)
                tune_controller.stop_trial(trial)
        return None

    def debug_string(self) -> str:
        return f"Promotion ASHA: rungs at epochs {self._milestones}, {len(self._paused)} paused"

    # ------------------------------------------------------------------ rungs
    def _record(self, number: int, step: float, value: float) -> float | None:
        """Record the first result at the highest rung `step` has reached; return that rung."""
        reached = [m for m in self._milestones if m <= step]
        if not reached:
            return None
        rung = reached[-1]
        score = self._sign * float(value)
        self._rungs[rung].setdefault(number, score if math.isfinite(score) else -math.inf)
        return rung

    def _above(self, number: int, rung: float) -> bool:
        """Whether the trial has a record past `rung`: it was promoted from there."""
        return any(number in self._rungs[m] for m in self._milestones if m > rung)

    def _top(self, number: int, rung: float) -> bool:
        """Whether the trial is among the best floor(n / reduction_factor) of its rung."""
        recorded = self._rungs[rung]
        best = sorted(recorded, key=lambda n: (-recorded[n], n))
        return number in best[: int(len(recorded) / self._eta)]

    def _rebuild(self, history: Iterable[optuna.trial.FrozenTrial]) -> None:
        """Each trial's recorded epochs, in order, as the running scheduler recorded them."""
        for trial in history:
            for step, entry in sorted(epoch_records(trial).items()):
                if step < self._max_t:
                    self._record(trial.number, step, entry["values"][0])
            if trial.state == TrialState.PRUNED:
                self._pruned.add(trial.number)
        records = sum(len(recorded) for recorded in self._rungs.values())
        if records:
            log.info(
                "promotion ASHA's rungs rebuilt from the Optuna study: %d records, %d pruned",
                records,
                len(self._pruned),
            )


class PromotionLimiter(ConcurrencyLimiter):
    """At most `max_concurrent` trials running, paused ones not counted; no new trial while a
    paused one waits to be promoted (the scheduler resumes it first)."""

    def __init__(self, searcher: Searcher, max_concurrent: int, scheduler: PromotionASHA):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self._scheduler = scheduler

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        running = len(self.live_trials) - len(self._scheduler.paused())
        if running >= self.max_concurrent or self._scheduler.promotable():
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion


def _number(trial: Any) -> int:
    return int(trial.config[OPTUNA_KEY])
