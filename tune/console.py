"""The driver's console while trials run: one line per trial event and a periodic summary.

Ray's own progress output is off (`verbose=0`); this Tune callback prints instead, each trial
line naming the trial's Optuna number and Ray id:

    trial 3 (ray 7f3a_00003) started: lr=0.0003 attn_window=8
    trial 3 (ray 7f3a_00003) kept at rung epoch 2: AUC=0.8123
    trial 3 (ray 7f3a_00003) pruned at epoch 4: AUC=0.7990
    trial 4 (ray 7f3a_00004) complete after 8 epochs: AUC=0.8421
    [2m30s] 2 running, 3 complete, 1 pruned, 0 failed; best AUC=0.8421 (trial 4)

Ray calls the searcher's and the scheduler's hooks before a callback's, so a result at a rung
epoch already carries ASHA's decision (`pruned`) and a complete trial its told values, which
are the values at the epoch the trainer selects (`tune.searcher.selected_values`) among the
epochs this driver saw: for a trial continued by `--resume`, those since the resume (the study
and the final summary hold all of them). Counts and the best value are this run's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tune.searcher import OPTUNA_KEY, STEP_KEY, selected_values
from tune.space import SpaceSpec
from tune.summary import short_names

SUMMARY_EVERY_S = 30.0


class Console(Callback):
    """Prints trial events and, at most every `every` seconds, a one-line summary.

    `pruned(number)`: whether the scheduler stopped that Optuna trial early (StudyASHA.pruned);
    None without a scheduler that prunes. `rungs`: the epochs at which ASHA decides; `ray_dir`:
    this driver run's Ray folder, where a failed trial's `<ray id>/error.txt` is. `paused()`:
    {Optuna number: rung} of the trials promotion ASHA holds paused (PromotionASHA.paused).
    """

    def __init__(
        self,
        spec: SpaceSpec,
        pruned: Callable[[str], bool] | None = None,
        rungs: list[float] | None = None,
        ray_dir: Path | None = None,
        every: float = SUMMARY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        paused: Callable[[], dict[int, float]] | None = None,
    ) -> None:
        self._paused = paused
        self._metric, self._mode, self._max_t = spec.metric, spec.mode[0], spec.scheduler.max_t
        self._names = short_names([p.name for p in spec.params])
        self._pruned, self._rungs = pruned, {int(r) for r in rungs or ()}
        self._every, self._clock, self._ray_dir = every, clock, ray_dir
        self._start = self._last = clock()
        self._epochs: dict[str, dict[int, dict[str, Any]]] = {}  # as the searcher records them
        self._ended: dict[str, str] = {}  # trial id: complete, pruned, failed, stopped
        self._best: tuple[float, Any] | None = None  # (first objective, Optuna number)

    # ------------------------------------------------------------------ Ray hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.pop(trial.trial_id, None)
        params = " ".join(
            f"{short}={_format(trial.config[name])}"
            for name, short in self._names.items()
            if name in trial.config
        )
        self._say(trial, f"started: {params}" if params else "started")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        step = result.get(STEP_KEY)
        if step is None or any(m not in result for m in self._metric):
            return
        values = [float(result[m]) for m in self._metric]
        select = next((k.removeprefix("best_") for k in result if k.startswith("best_")), "")
        entry = {"values": values, "select": float(result.get(select, math.nan))}
        self._epochs.setdefault(trial.trial_id, {})[int(step)] = entry
        stopped = self._pruned is not None and self._pruned(trial.config.get(OPTUNA_KEY))
        # A prune is said when the trial ends, as is the last rung, max_t: it completes there.
        if int(step) in self._rungs and int(step) < self._max_t and not stopped:
            number = trial.config.get(OPTUNA_KEY)
            if self._paused is not None and self._paused().get(number) == int(step):
                self._say(trial, f"paused at rung epoch {int(step)}: {self._values(values)}")
            else:
                self._say(trial, f"kept at rung epoch {int(step)}: {self._values(values)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, f"failed; retrying{self._error_file(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended[trial.trial_id] = "failed"
        self._say(trial, f"failed{self._error_file(trial)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = self._epochs.get(trial.trial_id, {})
        done = max(epochs, default=0)
        if done >= self._max_t:
            values = selected_values(epochs)
            if not all(math.isfinite(v) for v in values):  # the searcher tells FAIL
                self._ended[trial.trial_id] = "failed"
                self._say(trial, f"failed: non-finite {self._values(values)}")
                return
            self._ended[trial.trial_id] = "complete"
            self._note_best(values[0], trial.config.get(OPTUNA_KEY, "?"))
            self._say(trial, f"complete after {done} epochs: {self._values(values)}")
        elif self._pruned is not None and self._pruned(trial.config.get(OPTUNA_KEY)):
            self._ended[trial.trial_id] = "pruned"
            last = self._values(epochs[done]["values"]) if epochs else "no result"
            self._say(trial, f"pruned at epoch {done}: {last}")
        else:
            self._ended[trial.trial_id] = "stopped"
            self._say(trial, f"stopped after {done} of {self._max_t} epochs (left for --resume)")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = self._clock()
        if now - self._last >= self._every:
            self._last = now
            print(self.summary(trials), flush=True)

    # ------------------------------------------------------------------ lines
    def summary(self, trials: list) -> str:
        """One line: elapsed time, trials running and ended by how, the best told value."""
        ended = list(self._ended.values())
        running = sum(1 for t in trials if t.status == "RUNNING")
        counts = ", ".join(
            f"{ended.count(state)} {state}" for state in ("complete", "pruned", "failed")
        )
        best = ""
        if self._best is not None:
            best = f"; best {self._metric[0]}={self._best[0]:.4f} (trial {self._best[1]})"
        return f"[{_elapsed(self._clock() - self._start)}] {running} running, {counts}{best}"

    def _say(self, trial: Any, text: str) -> None:
        number = trial.config.get(OPTUNA_KEY, "?")
        print(f"trial {number} (ray {trial.trial_id}) {text}", flush=True)

    def _error_file(self, trial: Any) -> str:
        return f" (see {self._ray_dir / trial.trial_id / 'error.txt'})" if self._ray_dir else ""

    def _values(self, values: list[float]) -> str:
        return " ".join(f"{m}={v:.4f}" for m, v in zip(self._metric, values, strict=False))

    def _note_best(self, value: float, number: Any) -> None:
        better = self._best is None or (
            value > self._best[0] if self._mode == "max" else value < self._best[0]
        )
        if math.isfinite(value) and better:
            self._best = (value, number)


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
