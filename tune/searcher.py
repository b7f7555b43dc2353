"""A Ray Tune searcher over a persistent Optuna study that records what ASHA really did.

The study lives in SQLite in the study folder and is the record of every trial: its parameters,
one intermediate value per epoch, and how it ended. A trial that reaches `max_t` epochs is told
COMPLETE with its objective values at the epoch the trainer selects (the best epoch of its
selection metric, i.e. the `best.pt` weights); one that the scheduler stops earlier is told
PRUNED; one that errors after Ray's retries is told FAIL. A trial interrupted with the driver is
left RUNNING: the next driver's searcher hands it out again before asking for a new one (it
keeps its Optuna number, which its folder and its MLflow run are found by).

The per-epoch records are also what ASHA's rungs are rebuilt from (`tune/scheduler.py`), so the
study keeps the scheduler settings it started with and refuses other ones on a resume.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from dsanet.errors import brief
from tune.layout import STATE_FILES, StudyFolder
from tune.space import SearcherSpec, SpaceSpec, sample

log = logging.getLogger(__name__)

OPTUNA_KEY = "_optuna_trial"  # config key: the Optuna trial number of a Ray trial
ADOPTED_ATTR = "adopted_from"  # the Ray trial id an adopted Optuna trial had before
RAY_TRIAL_ATTR = "ray_trial_id"
# {epochs done: {"values": [one per objective], "select": selection metric, "time": when the
# trainable reported it (the line of the trial's reports.jsonl that Ray accepted)}}
EPOCHS_ATTR = "epochs"
REPORTED_KEY = "reported_at"  # result key: the report's time, as in the trial's reports.jsonl
STUDY_ID_ATTR = "study_id"  # a random id fixed at creation: the study's runs in MLflow carry it
POINTS_ATTR = "points_enqueued"
SIZE_ATTR = "num_samples"  # the study's planned trial count, fixed when it starts
SCHEDULER_ATTR = "scheduler"  # the scheduler settings, fixed when it starts (scheduler_settings)
SEARCHER_ATTR = "searcher"  # the searcher's kind, fixed when it starts
STEP_KEY = "epochs_done"  # result key: epochs completed (ASHA's time; the epochs attr's key)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def storage_uri(study_dir: Path) -> str:
    return StudyFolder(study_dir).optuna_uri


def open_storage(study_dir: Path) -> optuna.storages.RDBStorage:
    """The study folder's Optuna storage (SQLite; a writer waits up to 60 s for the lock)."""
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        storage_uri(study_dir), engine_kwargs={"connect_args": {"timeout": 60}}
    )


def open_study(spec: SpaceSpec, study_dir: Path, storage: Any = None) -> optuna.Study:
    """Create or load the study of `spec` in `study_dir`; its directions must match the space."""
    storage = storage or open_storage(study_dir)
    directions = ["maximize" if mode == "max" else "minimize" for mode in spec.mode]
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        directions=directions,
        pruner=optuna.pruners.NopPruner(),  # the scheduler prunes; its decisions are told here
        load_if_exists=True,
    )
    stored = ["maximize" if d.name == "MAXIMIZE" else "minimize" for d in study.directions]
    if stored != directions:
        raise ValueError(
            f"{StudyFolder(study_dir).optuna_db} holds study {spec.name!r} with directions "
            f"{stored}, but the space asks for {directions} ({list(spec.metric)}); use another "
            f"--storage-path"
        )
    if SIZE_ATTR not in study.user_attrs:
        study.set_user_attr(SIZE_ATTR, spec.num_samples)
    if STUDY_ID_ATTR not in study.user_attrs:
        study.set_user_attr(STUDY_ID_ATTR, uuid.uuid4().hex)
    _pin(study, SCHEDULER_ATTR, scheduler_settings(spec), spec, study_dir)
    _pin(study, SEARCHER_ATTR, {"kind": spec.searcher.kind}, spec, study_dir)
    # A resumed study must not replay the sampler's random stream from the start.
    study.sampler = make_sampler(spec.searcher, offset=len(study.get_trials(deepcopy=False)))
    return study


def scheduler_settings(spec: SpaceSpec) -> dict[str, Any]:
    """What the study's PRUNED and COMPLETE states, and ASHA's rungs rebuilt from its epoch
    records, depend on: the scheduler block and the objective ASHA ranks by."""
    s = spec.scheduler
    return {
        "kind": s.kind,
        "metric": spec.metric[0],
        "mode": spec.mode[0],
        "max_t": s.max_t,
        "grace_period": s.grace_period,
        "reduction_factor": s.reduction_factor,
    }


def _pin(
    study: optuna.Study, attr: str, current: dict[str, Any], spec: SpaceSpec, study_dir: Path
) -> None:
    """Record settings (`attr`: scheduler or searcher) when the study starts; refuse other ones
    on a resume. A sampler's model is fitted to the trials another one proposed, and ASHA's
    rungs and the PRUNED states are the scheduler's, so neither changes under a study."""
    stored = study.user_attrs.get(attr)
    if stored is not None and not isinstance(stored, dict):
        stored = {}  # not a record of settings: every setting counts as changed
    if stored is None:
        study.set_user_attr(attr, current)
        return
    changed = sorted(k for k in current.keys() | stored.keys() if stored.get(k) != current.get(k))
    if changed:
        name = {k: k if k in current else brief(k) for k in changed}  # a foreign key is quoted
        was = ", ".join(f"{name[k]} {brief(stored.get(k))}" for k in changed[:8])
        now = ", ".join(f"{k} {current.get(k)!r}" for k in changed if k in current)
        raise ValueError(
            f"{StudyFolder(study_dir).optuna_db}: study {spec.name!r} was started with {attr} "
            f"settings {was}; the space now gives {now}. Resume with the study's original "
            f"{attr} settings, or use another --storage-path"
        )


def make_sampler(searcher: SearcherSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = searcher.seed + offset
    if searcher.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if searcher.kind == "gp":
        # No constant liar to set: GPSampler conditions each ask on the trials still RUNNING
        # (q-batch expected improvement over their parameters), so parallel asks spread out.
        # Conditional parameters fall outside the space every complete trial shares and are
        # sampled at random, which the plan says once instead of a warning per trial.
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=searcher.n_startup_trials, warn_independent_sampling=False
        )
    # constant_liar: trials still running count as bad guesses, so parallel asks spread out.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=searcher.n_startup_trials, constant_liar=True
    )


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def epoch_records(trial: optuna.trial.FrozenTrial) -> dict[int, dict[str, Any]]:
    """The per-epoch objective values recorded for `trial`, by epochs completed."""
    return {int(step): entry for step, entry in trial.user_attrs.get(EPOCHS_ATTR, {}).items()}


def kept_step(epochs: Mapping[int, Mapping[str, Any]]) -> int:
    """The epochs done at the epoch the trainer keeps: the first best of its selection metric.

    Without a finite selection metric (e.g. a loss-only protocol) the last epoch.
    """
    steps = sorted(epochs)
    finite = [s for s in steps if _finite(epochs[s].get("select"))]
    if not finite:
        return steps[-1]
    return max(finite, key=lambda s: (epochs[s]["select"], -s))  # ties: the earliest, as fit()


def selected_values(epochs: Mapping[int, Mapping[str, Any]]) -> list[float]:
    """Objective values at the epoch the trainer keeps (`kept_step`): Optuna's trial values."""
    return list(epochs[kept_step(epochs)]["values"])


class OptunaSearcher(Searcher):
    """Suggests from, and reports to, the Optuna study of a search space.

    `pruned(number)` says whether the scheduler stopped that Optuna trial early; the searcher
    cannot tell an ASHA stop from a finished trial otherwise.
    """

    def __init__(
        self,
        spec: SpaceSpec,
        study_dir: Path,
        pruned: Callable[[int], bool] | None = None,
    ) -> None:
        multi = len(spec.metric) > 1
        super().__init__(
            metric=list(spec.metric) if multi else spec.metric[0],
            mode=list(spec.mode) if multi else spec.mode[0],
        )
        self._spec = spec
        self._study_dir = Path(study_dir).resolve()
        self._pruned = pruned
        self._max_t = spec.scheduler.max_t
        self._trials: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self._study: optuna.Study | None = None
        self._storage: Any = None  # the study's, for reads of one trial
        self._study_key = -1  # the study's id in the storage
        self._handles: dict[int, optuna.Trial] = {}
        self._left: list[int] | None = None  # trials left RUNNING by an earlier driver

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Reopened lazily: a database connection cannot travel.
        state.update(_study=None, _storage=None, _handles={})
        return state

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._open()
        return self._study

    def _open(self) -> None:
        self._storage = open_storage(self._study_dir)
        self._study = open_study(self._spec, self._study_dir, self._storage)
        self._study_key = self._storage.get_study_id_from_name(self._spec.name)

    # ------------------------------------------------------------------ Ray hooks
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric, mode and space come from the search-space file

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self._trials:  # defensive: Ray never asks twice for one trial
            number = self._trials[trial_id]
            return {**self._handle(number).params, OPTUNA_KEY: number}
        self._enqueue_points()
        orphan = self._orphan()
        trial = self._handle(orphan.number) if orphan else self.study.ask()
        params = sample(trial, self._spec)  # an adopted trial returns its stored values
        trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        self._trials[trial_id] = trial.number
        self._handles[trial.number] = trial
        log.debug("Ray trial %s is Optuna trial %d: %s", trial_id, trial.number, params)
        if orphan and RAY_TRIAL_ATTR in orphan.user_attrs:
            trial.set_user_attr(ADOPTED_ATTR, orphan.user_attrs[RAY_TRIAL_ATTR])
        return {**params, OPTUNA_KEY: trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._trials:
            self._record(self._trials[trial_id], result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        number = self._trials.get(trial_id)
        if number is not None and self._tell(number, trial_id, result, error):
            # Only a trial still RUNNING in Optuna resumes: the rest need no optimizer state.
            (StudyFolder(self._study_dir).trial_dir(number) / STATE_FILES[0]).unlink(
                missing_ok=True
            )

    def _tell(self, number: int, trial_id: str, result: dict | None, error: bool) -> bool:
        """Tell Optuna how the trial ended; whether it has ended (False: interrupted)."""
        if self._frozen(number).state.is_finished():
            return True  # already told
        # Debug lines: the driver's console (tune/console.py) prints each of these endings.
        if error:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            log.debug("Optuna trial %d (Ray %s): FAIL", number, trial_id)
            return True
        if result:  # the last result: Ray skips on_trial_result when the scheduler stops
            self._record(number, result)
        epochs = epoch_records(self._frozen(number))
        done = max(epochs, default=0)
        if done >= self._max_t:
            self._tell_complete(number, epochs)  # COMPLETE, or FAIL on non-finite values
            return True
        if self._pruned is not None and self._pruned(number):
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            log.debug("Optuna trial %d (Ray %s): PRUNED after %d epochs", number, trial_id, done)
            return True
        log.debug(
            "Optuna trial %d (Ray %s) stopped after %d of %d epochs without a scheduler "
            "decision (interrupted); it stays RUNNING for --resume",
            number,
            trial_id,
            done,
            self._max_t,
        )
        return False

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the Optuna study is this searcher's state, and a driver never
        restores Ray's (a resumed study starts a new Tuner that adopts the RUNNING trials)."""

    # ------------------------------------------------------------------ internals
    def _enqueue_points(self) -> None:
        """Queue the space's starting points once per study, however often it is resumed."""
        study = self.study
        if study.user_attrs.get(POINTS_ATTR):
            return
        for point in self._spec.points_to_evaluate:
            study.enqueue_trial(point, skip_if_exists=True)
        study.set_user_attr(POINTS_ATTR, True)

    def _orphan(self) -> optuna.trial.FrozenTrial | None:
        """The next trial an interrupted driver left RUNNING, to run again before any new one.
        They are listed once, when this searcher first asks: every trial that becomes RUNNING
        later is one of its own."""
        if self._left is None:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            self._left = [t.number for t in running]
        if not self._left:
            return None
        number = self._left.pop(0)
        log.info("continuing Optuna trial %d, left running by an interrupted run", number)
        return self._frozen(number)

    def _record(self, number: int, result: Mapping[str, Any]) -> None:
        """Store one epoch's objective values (once per epoch, so a restarted trial's replay
        adds nothing)."""
        step = result.get(STEP_KEY)
        if step is None or any(m not in result for m in self._spec.metric):
            return
        frozen = self._frozen(number)
        epochs = frozen.user_attrs.get(EPOCHS_ATTR, {})
        if str(int(step)) in epochs:
            return
        values = [float(result[m]) for m in self._spec.metric]
        # The trainer reports best_<key> for its selection metric <key>; keep <key> per epoch.
        select_key = next((k.removeprefix("best_") for k in result if k.startswith("best_")), "")
        entry = {"values": values, "select": float(result.get(select_key, math.nan))}
        if _finite(result.get(REPORTED_KEY)):
            entry["time"] = float(result[REPORTED_KEY])
        trial = self._handle(number)
        trial.set_user_attr(EPOCHS_ATTR, {**epochs, str(int(step)): entry})
        if len(values) == 1 and int(step) not in frozen.intermediate_values:
            trial.report(values[0], int(step))  # multi-objective studies cannot report()

    def _tell_complete(self, number: int, epochs: Mapping[int, Mapping[str, Any]]) -> None:
        values = selected_values(epochs)
        if not all(_finite(v) for v in values):
            log.warning("Optuna trial %d ended with non-finite %s: FAIL", number, values)
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            return
        self.study.tell(number, values if len(values) > 1 else values[0], skip_if_finished=True)
        ray_id = self._frozen(number).user_attrs.get(RAY_TRIAL_ATTR, "")
        log.debug("Optuna trial %d (Ray %s): COMPLETE %s", number, ray_id, values)

    def _handle(self, number: int) -> optuna.Trial:
        if number not in self._handles:
            self._handles[number] = optuna.trial.Trial(self.study, self._trial_key(number))
        return self._handles[number]

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        """One trial from the storage: its cost does not grow with the study."""
        return self._storage.get_trial(self._trial_key(number))

    def _trial_key(self, number: int) -> int:
        """The storage's id of trial `number` (what Optuna addresses a live trial by)."""
        if self._storage is None:
            self._open()
        return self._storage.get_trial_id_from_study_id_trial_number(self._study_key, number)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
