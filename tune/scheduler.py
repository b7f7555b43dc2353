"""The trial scheduler: ASHA whose rungs survive a driver restart, or plain FIFO.

Ray's `Tuner.restore` keeps the searcher but rebuilds the scheduler empty, so ASHA would judge
resumed trials against nothing. Here every change to the rung records (and to the set of trials
ASHA stopped early) is written atomically to `asha_state.json` in the study folder and read back
when the scheduler is built again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from dsanet.errors import brief
from tune.searcher import STEP_KEY
from tune.space import SpaceSpec
from tune.space_settings import SchedulerSpec

log = logging.getLogger(__name__)

STATE_FILE = "asha_state.json"
_KEYS = ("time_attr", "metric", "mode", "max_t")  # settings the saved rungs belong to


class PersistentASHA(AsyncHyperBandScheduler):
    """Single-bracket ASHA over epochs (`training_iteration`) on the first objective."""

    def __init__(
        self,
        state_file: Path,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
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
        self._state_file = Path(state_file)
        self._pruned: set[str] = set()  # trials ASHA stopped before max_t
        self._load()

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
        before = self._state()
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(STEP_KEY, self._max_t) < self._max_t:
            self._pruned.add(trial.trial_id)
        self._save_if_changed(before)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id not in self._trial_info:
            return
        before = self._state()
        super().on_trial_complete(tune_controller, trial, result)
        self._save_if_changed(before)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)

    # ------------------------------------------------------------------ persistence
    @property
    def _bracket(self):
        return self._brackets[0]

    def _state(self) -> dict[str, Any]:
        return {
            "time_attr": self._time_attr,
            "metric": self._metric,
            "mode": self._mode,
            "max_t": self._max_t,
            "reduction_factor": self._reduction_factor,
            "rungs": [{"milestone": m, "recorded": dict(r)} for m, r in self._bracket._rungs],
            "pruned": sorted(self._pruned),
        }

    def _save_if_changed(self, before: dict[str, Any]) -> None:
        state = self._state()
        if state == before and self._state_file.is_file():
            return
        tmp = self._state_file.with_name(f".{self._state_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self._state_file)

    def _load(self) -> None:
        if not self._state_file.is_file():
            return
        settings, recorded, pruned = read_saved_rungs(self._state_file)
        current = self._state()
        milestones = settings["milestones"]
        if [r["milestone"] for r in current["rungs"]] != milestones or any(
            settings[k] != current[k] for k in _KEYS
        ):
            raise ValueError(
                f"{self._state_file} was written by an ASHA with rungs at {milestones} epochs "
                f"on {brief(settings['metric'])} ({brief(settings['mode'])}); the space now gives "
                f"{[r['milestone'] for r in current['rungs']]} on {current['metric']}: resume "
                f"with the study's original scheduler settings or use another --storage-path"
            )
        for (_, records), rung in zip(self._bracket._rungs, recorded, strict=True):
            records.update(rung)
        self._pruned = pruned
        log.info(
            "ASHA state restored from %s: %s trial records in %d rungs, %d pruned",
            self._state_file,
            sum(len(r) for r in recorded),
            len(recorded),
            len(self._pruned),
        )


def read_saved_rungs(path: Path) -> tuple[dict[str, Any], list[dict], set[str]]:
    """The settings, rung records and pruned trial ids of a saved `asha_state.json`."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        settings = {k: saved[k] for k in _KEYS}
        settings["milestones"] = [r["milestone"] for r in saved["rungs"]]
        recorded = [dict(r["recorded"]) for r in saved["rungs"]]
        pruned = {str(t) for t in saved["pruned"]}
    except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8 or shape
        raise ValueError(
            f"{path} is damaged ({brief(str(exc))}); delete it to resume with empty rungs (the "
            f"trials' records in Optuna are kept)"
        ) from exc
    return settings, recorded, pruned


def build_scheduler(spec: SpaceSpec, study_dir: Path) -> TrialScheduler:
    """ASHA on the first objective (persisted in the study folder), or FIFO for kind none."""
    s = spec.scheduler
    if s.kind == "none":
        return FIFOScheduler()
    return PersistentASHA(
        Path(study_dir) / STATE_FILE,
        metric=spec.metric[0],
        mode=spec.mode[0],
        max_t=s.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def rung_epochs(s: SchedulerSpec) -> list[float]:
    """The epochs at which ASHA compares trials (for the plan printed before a study)."""
    asha = AsyncHyperBandScheduler(
        max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )
    return sorted(milestone for milestone, _ in asha._brackets[0]._rungs)
