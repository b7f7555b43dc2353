"""The trial scheduler: ASHA whose rungs are rebuilt from the Optuna study, or plain FIFO.

Ray does not save a scheduler's state: `Tuner.restore` builds it anew, so after a driver
restart ASHA's rungs would be empty and resumed or new trials would be judged against nothing.
The Optuna study already holds everything ASHA recorded: each trial's value of every epoch
(user attribute `epochs`), its Ray trial id, and PRUNED for a trial ASHA stopped early. So the
scheduler is built from the study: each trial's recorded epochs go, in order, through Ray's own
rung bookkeeping (`_Bracket.on_result`), which gives the records a scheduler that saw those
results live holds (a record depends only on the trial's own results, not on their order among
trials). There is no second store to keep in step with Optuna.

The study pins the scheduler settings it started with (`tune/searcher.py::open_study`), so a
resume never rebuilds rungs at other epochs, on another metric or with another `max_t`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import SimpleNamespace

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from tune.searcher import RAY_TRIAL_ATTR, STEP_KEY, epoch_records
from tune.space import SchedulerSpec, SpaceSpec

log = logging.getLogger(__name__)


class StudyASHA(AsyncHyperBandScheduler):
    """Single-bracket ASHA over epochs (`training_iteration`) on the first objective, its rungs
    and stopped trials rebuilt from the study's trials (`history`)."""

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
        self._pruned: set[str] = set()  # trials ASHA stopped before max_t
        self._rebuild(history)

    # ------------------------------------------------------------------ public
    def pruned(self, trial_id: str) -> bool:
        """Whether ASHA stopped this trial before max_t (Optuna PRUNED, not COMPLETE)."""
        return trial_id in self._pruned

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """(milestone in epochs, {trial id: sign-adjusted score}) from the last rung down."""
        return [(milestone, dict(recorded)) for milestone, recorded in self._bracket._rungs]

    # ------------------------------------------------------------------ Ray hooks
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._pruned:
            return TrialScheduler.STOP  # stopped before a driver crash, replayed by the restore
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(STEP_KEY, self._max_t) < self._max_t:
            self._pruned.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self._trial_info:  # one replayed after a restore may be unknown
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)

    # ------------------------------------------------------------------ restore
    @property
    def _bracket(self):
        return self._brackets[0]

    def _rebuild(self, history: Iterable[optuna.trial.FrozenTrial]) -> None:
        """Record each trial's epochs as the running scheduler did: every result passes Ray's
        `_Bracket.on_result` once, in epoch order (the result at max_t through
        `on_trial_complete`), with the first objective times the mode's sign. A trial adopted
        by a new Ray trial after a driver crash is keyed by that Ray trial.

        Why this hook exists: Ray never saves a scheduler's state; `Tuner.restore` builds the
        scheduler anew, with empty rungs, and Ray has no API to set them.
        """
        trials = 0
        for trial in history:
            ray_id = trial.user_attrs.get(RAY_TRIAL_ATTR)
            epochs = epoch_records(trial)
            if not ray_id or not epochs:
                continue
            trials += 1
            stand_in = SimpleNamespace(trial_id=ray_id)  # on_result reads only trial_id
            for step in sorted(epochs):
                score = self._metric_op * float(epochs[step]["values"][0])
                self._bracket.on_result(stand_in, step, score)
            if trial.state == TrialState.PRUNED:
                self._pruned.add(ray_id)
        if trials:
            log.info(
                "ASHA's rungs rebuilt from %d trials of the Optuna study: %d records, %d pruned",
                trials,
                sum(len(recorded) for _, recorded in self._bracket._rungs),
                len(self._pruned),
            )


def build_scheduler(spec: SpaceSpec, study: optuna.Study | None = None) -> TrialScheduler:
    """ASHA on the first objective with the rungs of `study`'s trials, or FIFO for kind none."""
    s = spec.scheduler
    if s.kind == "none":
        return FIFOScheduler()
    return StudyASHA(
        metric=spec.metric[0],
        mode=spec.mode[0],
        max_t=s.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        history=study.get_trials(deepcopy=False) if study is not None else (),
    )


def rung_epochs(s: SchedulerSpec) -> list[float]:
    """The epochs at which ASHA compares trials (for the plan printed before a study)."""
    asha = AsyncHyperBandScheduler(
        max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )
    return sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
