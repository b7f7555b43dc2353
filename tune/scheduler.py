"""The trial scheduler: ASHA whose rungs are rebuilt from the Optuna study, or plain FIFO.

Ray does not save a scheduler's state, and a resumed study runs a new Tuner, so after a driver
restart ASHA's rungs would be empty and resumed or new trials would be judged against nothing.
The Optuna study already holds everything ASHA recorded: each trial's value of every epoch
(user attribute `epochs`) and PRUNED for a trial ASHA stopped early. So the scheduler is built
from the study: each trial's recorded epochs go, in order, through Ray's own rung bookkeeping
(`_Bracket.on_result`), which gives the records a scheduler that saw those results live holds
(a record depends only on the trial's own results, not on their order among trials). Rungs are
keyed by Optuna number, not Ray trial id: an interrupted trial continues under a new Ray id.

The study pins the scheduler settings it started with (`tune/searcher.py::open_study`), so a
resume never rebuilds rungs at other epochs, on another metric or with another `max_t`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from tune.searcher import OPTUNA_KEY, STEP_KEY, epoch_records
from tune.space import SchedulerSpec, SpaceSpec

log = logging.getLogger(__name__)


class StudyASHA(AsyncHyperBandScheduler):
    """Single-bracket ASHA over epochs (`epochs_done`) on the first objective, its rungs and
    stopped trials keyed by Optuna number and rebuilt from the study's trials (`history`)."""

    def __init__(
        self,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        history: Iterable[optuna.trial.FrozenTrial] = (),
    ) -> None:
        super().__init__(
            time_attr=STEP_KEY,
            metric=metric,
            mode=mode,
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            brackets=1,
            stop_last_trials=True,
        )
        self._pruned: set[int] = set()  # Optuna numbers of trials ASHA stopped before max_t
        self._rebuild(history)

    # ------------------------------------------------------------------ public
    def pruned(self, number: int) -> bool:
        """Whether ASHA stopped Optuna trial `number` before max_t (PRUNED, not COMPLETE)."""
        return number in self._pruned

    def rungs(self) -> list[tuple[float, dict[int, float]]]:
        """(milestone in epochs, {Optuna number: sign-adjusted score}) from the last rung down."""
        return [(milestone, dict(recorded)) for milestone, recorded in self._bracket_rungs()]

    # ------------------------------------------------------------------ Ray hooks
    # Ray's ASHA keys its records by `trial.trial_id`; each hook passes it the Optuna number.
    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, _key(trial))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        key = _key(trial)
        if key.trial_id in self._pruned:
            return TrialScheduler.STOP  # a replayed epoch of a trial stopped before
        action = super().on_trial_result(tune_controller, key, result)
        if action == TrialScheduler.STOP and result.get(STEP_KEY, self._max_t) < self._max_t:
            self._pruned.add(key.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        key = _key(trial)
        if key.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, key, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(_key(trial).trial_id, None)

    # ------------------------------------------------------------------ rebuild
    def _bracket_rungs(self) -> list[tuple[float, dict]]:
        return self._brackets[0]._rungs

    def _rebuild(self, history: Iterable[optuna.trial.FrozenTrial]) -> None:
        """Record each trial's epochs as the running scheduler did: every result passes Ray's
        `_Bracket.on_result` once, in epoch order (the result at max_t through
        `on_trial_complete`), with the first objective times the mode's sign.

        Why this hook exists: Ray never saves a scheduler's state and has no API to set its
        rungs; a resumed study's new Tuner would start ASHA with empty ones.
        """
        trials = 0
        for trial in history:
            epochs = epoch_records(trial)
            if not epochs:
                continue
            trials += 1
            stand_in = SimpleNamespace(trial_id=trial.number)  # on_result reads only that
            for step in sorted(epochs):
                score = self._metric_op * float(epochs[step]["values"][0])
                self._brackets[0].on_result(stand_in, step, score)
            if trial.state == TrialState.PRUNED:
                self._pruned.add(trial.number)
        if trials:
            log.info(
                "ASHA's rungs rebuilt from %d trials of the Optuna study: %d records, %d pruned",
                trials,
                sum(len(recorded) for _, recorded in self._bracket_rungs()),
                len(self._pruned),
            )


def _key(trial: Any) -> SimpleNamespace:
    """What Ray's ASHA code sees of a Ray trial: its Optuna number as the trial id."""
    return SimpleNamespace(trial_id=int(trial.config[OPTUNA_KEY]))


def build_scheduler(spec: SpaceSpec, study: optuna.Study | None = None) -> TrialScheduler:
    """ASHA on the first objective with the rungs of `study`'s trials (stopping, or promotion:
    `tune/promotion.py`), or FIFO for kind none."""
    s = spec.scheduler
    if s.kind == "none":
        return FIFOScheduler()
    history = study.get_trials(deepcopy=False) if study is not None else ()
    common = dict(
        metric=spec.metric[0],
        mode=spec.mode[0],
        max_t=s.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        history=history,
    )
    if s.kind == "asha-promotion":
        from tune.promotion import PromotionASHA

        return PromotionASHA(max_concurrent=spec.max_concurrent, **common)
    return StudyASHA(**common)


def rung_epochs(s: SchedulerSpec) -> list[float]:
    """The epochs at which ASHA compares trials (for the plan printed before a study)."""
    asha = AsyncHyperBandScheduler(
        max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )
    return sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
