"""MLflow as a view of the study folder: one parent run, a nested run per trial and final seed.

The study folder is the record; MLflow only shows it. `MlflowView.sync` writes what the folder
holds and MLflow lacks, and nothing else:
- a trial's run from its Optuna trial (state, parameters, which epochs were accepted) and its
  `trials/<number>/reports.jsonl` (everything the trainer measured in each epoch);
- a final seed's run from `final/seed_<n>/`: its `config.yaml` once it starts, each epoch from
  its `reports.jsonl` as it trains, its `result.json` when done;
- the parent run from the space, the Optuna study's best trial, `final/summary.json` and the
  files under `report/`.

Runs are found by tags (the study's id and a run key), never by a saved map of run ids, and
every metric carries the time its epoch was reported, so writing it again changes nothing. The
view syncs the trials that an event touched while the study runs (the cost of an event does not
grow with the study), and the whole study when the driver starts and ends; whatever an outage
or a killed driver kept from MLflow is written then. Only config fields, search settings,
measurements, the git commit and files of the study go to MLflow: no environment, no
credentials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import subprocess
import time
import urllib.parse
import urllib.request
from bisect import bisect_right, insort
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback

from dsanet.config import ConfigError, flatten
from dsanet.errors import redact
from dsanet.files import link_atomic, write_atomic
from tune.layout import (
    MLFLOW_ARTIFACTS,
    REPORT_PARTS,
    RESULT_FILE,
    RUN_CONFIG,
    STATE_FILES,
    StudyFolder,
    read_config,
)
from tune.plan import PROTOCOL_NOTES
from tune.report import ranking
from tune.searcher import (
    OPTUNA_KEY,
    RAY_TRIAL_ATTR,
    STUDY_ID_ATTR,
    epoch_records,
    kept_step,
    open_storage,
)
from tune.space import SpaceSpec, trial_config
from tune.trainable import report_lines

__all__ = ["PARENT", "RUN_STATUS", "MlflowView", "Standings", "TrackingUnavailable"]

log = logging.getLogger(__name__)

PARENT = "study"  # run key of the parent run; trials are "trial/<optuna number>"
TAG_KEY, TAG_STUDY = "dsanet.run_key", "dsanet.study"  # what finds a run
TAG_STATUS, TAG_STAGE, TAG_EPOCHS = "dsanet.status", "dsanet.stage", "dsanet.epochs"
TAG_PARENT, TAG_NOTE = "mlflow.parentRunId", "mlflow.note.content"  # MLflow's own tags
TAG_BEST_TRIAL, TAG_BEST_RUN = "dsanet.best_trial", "dsanet.best_run_id"  # on the parent
# The experiment's kind in MLflow 3 (its UI's model-training view); 3.17's UI opens the view a
# URL's workflowType names, so the printed link carries that too.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "?workflowType=machine_learning"
# dsanet status -> (MLflow run status, what the run's name adds). MLflow has four end states
# and its runs table draws FAILED and KILLED with the same red icon, so the name tells them
# apart: a pruned trial did its job (ASHA stopped a poor config by design) and is FINISHED, its
# name saying after how many epochs; an error is FAILED; a trial or seed left running when the
# driver ended is KILLED and becomes RUNNING again when a resumed driver carries it on.
RUN_STATUS = {
    "RUNNING": ("RUNNING", ""),
    "FINISHED": ("FINISHED", ""),
    "PRUNED": ("FINISHED", " (pruned@{epochs})"),
    "INTERRUPTED": ("KILLED", " (interrupted)"),
    "KILLED": ("KILLED", ""),
    "FAILED": ("FAILED", " (failed)"),
}
_TRIAL_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "PRUNED"}
_TRIAL_STATUS[TrialState.FAIL] = "FAILED"
# MLflow's HTTP client retries a refused connection for about 4 minutes by default; inside a
# Tune callback that stalls the whole study, so calls get a short budget unless the user set
# one: the next event retries anyway.
_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_WARN_EVERY_S = 300.0
_BATCH = 100  # MLflow's limit of params (and tags) per log_batch; metrics allow 1000


class TrackingUnavailable(ConnectionError):
    """The tracking URI cannot be used; the message names the URI and the fix."""


@dataclass
class _Run:
    """What MLflow holds of one run, as far as the view needs it."""

    run_id: str
    name: str  # the run's name, which shows its end (RUN_STATUS)
    epochs: int = 0  # epochs (or history records) logged
    status: str = "RUNNING"  # the dsanet status tag; NEW until its params are logged
    state: str = "RUNNING"  # MLflow's status (an older view ended pruned runs KILLED)


class Standings:
    """The study as the view last read its trials: how many are in each state, and the best
    complete one (`tune.report.best_of`) with its place among complete trials in order of
    completion. Each read of a trial updates them by what changed in it, so a trial's end
    costs the same at 10 trials and at 10,000; the driver's first sync reads every trial once,
    which builds them for a resumed study."""

    def __init__(self, maximize: Sequence[bool]) -> None:
        self.trials: dict[int, FrozenTrial] = {}  # each trial as its last read
        self.counts: Counter[TrialState] = Counter()
        self.best: FrozenTrial | None = None
        self._rank = ranking(maximize)
        self._completed: list[datetime] = []  # when each complete trial completed, in order

    def update(self, trial: FrozenTrial) -> None:
        """Take `trial` as read now, in place of its previous read (if any)."""
        old = self.trials.get(trial.number)
        self.trials[trial.number] = trial
        if old is not None:
            self.counts[old.state] -= 1
        self.counts[trial.state] += 1
        # Optuna never changes a finished trial, so a complete one enters the ranking once.
        if trial.state != TrialState.COMPLETE or (old is not None and old.state == trial.state):
            return
        insort(self._completed, trial.datetime_complete)  # trials told late land in place
        if self.best is None or self._rank(trial) > self._rank(self.best):
            self.best = trial

    def place(self) -> int:
        """The best trial's place among the complete trials in order of completion (1-based;
        those completed at the same time count before it); 0 before one completes."""
        if self.best is None:
            return 0
        return bisect_right(self._completed, self.best.datetime_complete)


class MlflowView(Callback):
    """The study's MLflow record, kept up to date by Tune events and by `sync`.

    `start()` before the search, `finish(status)` after it, `sync()` whenever the folder
    changed outside a Tune event (the final stage).
    """

    def __init__(self, study_dir: Path, spec: SpaceSpec, tracking_uri: str = "") -> None:
        """`study_dir` holds the Optuna study of `spec` (`tune.searcher.open_study`)."""
        self.root, self.spec = Path(study_dir).resolve(), spec
        self.folder = StudyFolder(self.root)
        self.uri = tracking_uri or self.folder.mlflow_uri
        self.client = MlflowClient(tracking_uri=self.uri)
        check_reachable(self.client, self.uri, spec.path)
        self._storage: Any = None  # the Optuna study's, opened by the first sync
        self._study, self.study_id, self.experiment_id = -1, "", ""
        self._runs: dict[str, _Run] = {}  # run key -> its run, once read or created
        self._dirty: set[str] = set()  # run keys to sync
        self._errors: dict[str, str] = {}  # run key -> its error line (trials: from Ray)
        self._git: dict[str, str] = {}  # the parent's git tags, read once
        self._standings = Standings([m == "max" for m in spec.mode])  # the trials' own reads
        self._files_due = True  # the parent's report/ files: logged by a whole-study sync
        self._ended = ""  # the parent's final status, once the driver ends
        self._outage_since: float | None = None
        self._warned = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles a Tuner's callbacks into ray/<run>/, never read back: a stand-in.
        return (Callback, ())

    @property
    def parent_run_id(self) -> str:
        """The parent run's id; "" until MLflow has accepted it."""
        run = self._runs.get(PARENT)
        return run.run_id if run else ""

    def ui_command(self) -> str:
        """How to browse the study: a server's URL, or `mlflow ui --backend-store-uri ...` and
        the page to open. MLflow 3.17's UI picks its GenAI or model-training view from the
        URL's `workflowType` (remembered by the browser, GenAI by default), not from the
        experiment's kind, so the link asks for model training."""
        uri, page = redact(self.uri), f"#/experiments/{self.experiment_id}{UI_VIEW}"
        if uri.startswith(("http://", "https://")) and self.experiment_id:
            return f"{uri.rstrip('/')}/{page}"
        command = f"mlflow ui --backend-store-uri {uri}"
        return (
            f"{command}, then open http://127.0.0.1:5000/{page}" if self.experiment_id else command
        )

    # ------------------------------------------------------------------ the driver's calls
    def start(self) -> str:
        """Write the space's files and sync the whole study (a resumed study's too)."""
        self._write_space_files()
        self.sync()
        return self.parent_run_id

    def finish(self, status: str = "FINISHED", wait_s: float = 60.0) -> bool:
        """End the parent (FINISHED, KILLED or FAILED) and its trials still running
        (INTERRUPTED), after a last sync; wait up to `wait_s` for an unreachable server.

        True when MLflow holds the whole study. Otherwise what it lacks is written when the
        study is resumed: nothing is lost, as the study folder is the record.
        """
        if status not in ("FINISHED", "KILLED", "FAILED"):
            raise ValueError(f"finish status {status!r}: use FINISHED, KILLED or FAILED")
        self._ended = status
        done = self.sync(wait_s) and not self._dirty
        if not done:
            log.error(
                "MLflow at %s lacks updates of %d runs; they are written when the study is "
                "resumed (--resume), from the study folder",
                redact(self.uri),
                len(self._dirty),
            )
        log.info("MLflow: browse the study with: %s", self.ui_command())
        return done

    def sync(self, wait_s: float = 0.0) -> bool:
        """Write every run of the study that MLflow lacks; True when nothing is left."""
        self._dirty.update(self._all_keys())
        self._files_due = True
        return self.drain(wait_s)

    def sync_seeds(self) -> bool:
        """Write what the final stage's seeds did since the last call (while they train)."""
        self._dirty.update(self._seed_keys())
        return self.drain()

    def seed_failed(self, seed: int, error: str) -> None:
        """Record that the final stage's `seed` failed: its run ends FAILED at the next sync."""
        self._errors[f"final/seed_{seed}"] = error.strip().splitlines()[-1][:500] if error else ""

    def drain(self, wait_s: float = 0.0) -> bool:
        """Sync the runs marked as changed, retrying for up to `wait_s`; True if none remain."""
        deadline, pause = time.monotonic() + wait_s, 1.0
        while not self._sync_dirty():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            log.warning("MLflow at %s unreachable; retrying (%.0f s left)", redact(self.uri), left)
            time.sleep(min(pause, left))
            pause = min(2 * pause, 15.0)
        return True

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._touched(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info: Any) -> None:
        self._touched(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._dirty.add(PARENT)  # the study's best trial may have changed
        self._touched(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        number = (trial.config or {}).get(OPTUNA_KEY)
        if number is not None:
            self._errors[f"trial/{number}"] = _error_line(trial)
        self._dirty.add(PARENT)  # its count of failed trials
        self._touched(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.drain()

    def _touched(self, trial: Any) -> None:
        number = (trial.config or {}).get(OPTUNA_KEY)
        if number is not None:
            self._dirty.add(f"trial/{number}")
        self.drain()

    # ------------------------------------------------------------------ syncing
    def _all_keys(self) -> list[str]:
        if self._storage is None:
            return [PARENT]  # a first sync opens the stores and marks everything
        trials = [
            f"trial/{t.number}"
            for t in self._storage.get_all_trials(self._study, deepcopy=False)
            if RAY_TRIAL_ATTR in t.user_attrs  # asked by Ray; not a point waiting in the queue
        ]
        return [PARENT, *trials, *self._seed_keys()]

    def _seed_keys(self) -> list[str]:
        """Final seeds that started (a config.yaml), finished (a result.json) or failed."""
        files = [*self.folder.final_dir.glob(f"seed_*/{RUN_CONFIG}")]
        files += self.folder.final_dir.glob(f"seed_*/{RESULT_FILE}")
        failed = {k for k in self._errors if k.startswith("final/")}
        return sorted({f"final/{p.parent.name}" for p in files} | failed)

    def _sync_dirty(self) -> bool:
        """One pass over the changed runs, parent first; False when MLflow stopped answering."""
        if not self._dirty:
            return True
        problem = probe(self.uri) if self._outage_since is not None else ""
        try:
            if problem:
                raise ConnectionError(problem)
            with _short_retries():
                if not self.experiment_id:
                    self._open_stores()
                if PARENT not in self._runs:  # first: the children name its run id
                    self._sync_one(PARENT)
                    self._dirty.add(PARENT)
                # The parent last: it names the winner among the trials synced before it.
                for key in sorted(self._dirty, key=lambda k: k == PARENT):
                    self._sync_one(key)
                    self._dirty.discard(key)
        except (MlflowException, requests.RequestException, OSError, KeyError) as exc:
            if not _transient(exc):  # e.g. no permission: logged, left for the next full sync
                log.error("MLflow at %s: %s", redact(self.uri), exc)
                return True
            self._outage(str(exc))
            return False
        if self._outage_since is not None:
            log.warning("MLflow at %s answers again; the study is written", redact(self.uri))
            self._outage_since = None
        return True

    def _sync_one(self, key: str) -> None:
        """Sync one run; an error other than an outage is logged, and the run is tried again
        by the driver's next full sync."""
        try:
            if key == PARENT:
                self._sync_parent()
            elif key.startswith("trial/"):
                self._sync_trial(int(key.removeprefix("trial/")))
            else:
                self._sync_seed(int(key.removeprefix("final/seed_")))
        except (MlflowException, requests.RequestException, OSError, ValueError) as exc:
            if _transient(exc):
                raise
            log.warning("MLflow: run %s could not be written: %s", key, exc)

    def _sync_parent(self) -> None:
        self._git = self._git or _git_tags(Path(__file__).resolve().parents[1])
        tags = {
            "dsanet.role": "study",
            TAG_STAGE: "search",
            "dsanet.space": self.spec.name,
            "dsanet.protocol": self.spec.base.data.protocol,
            "dsanet.study_dir": str(self.root),
            **self._git,
        }
        run = self._run(PARENT, lambda: _parent_params(self.spec), tags)
        summary_file, summary = self.folder.final_summary, {}
        metrics = []
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            metrics = [Metric(k, v, _stamp(summary_file), 0) for k, v in summary.items()]
        best_metrics, best_tags = self._winner(summary)
        self._log(run, metrics + best_metrics, best_tags)
        for name in REPORT_PARTS if self._files_due else ():  # report/<part>/ -> <part>/
            folder = self.folder.report_dir(name)
            if folder.is_dir():
                self._log_files(run, folder, name)
        self._files_due = False
        self._set_status(run, self._ended or "RUNNING", PARENT)

    def _winner(self, summary: Mapping[str, float]) -> tuple[list[Metric], dict[str, str]]:
        """The parent's account of the study and its best trial (`tune.report.best_of`):
        tags naming the trial and its run, a note, and metrics `best_<objective>` and
        `best_epoch` (0-based, as the trainer counts epochs).

        The winner changes while the study runs; the metrics are logged at step = the winner's
        place among complete trials in order of completion and with its completion time, so a
        new winner (which completed later) is the latest value MLflow shows, each winner is
        one point of a best-so-far curve, and syncing again writes nothing new."""
        standings = self._standings  # as read by the trials' own syncs: no store read
        count = standings.counts
        protocol = self.spec.base.data.protocol
        note = (
            f"Study {self.spec.name}: {len(standings.trials)} trials ({count[TrialState.COMPLETE]} "
            f"complete, {count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed, "
            f"{count[TrialState.RUNNING]} running or interrupted); data.protocol={protocol}: "
            f"{PROTOCOL_NOTES[protocol]}."
        )
        best = standings.best
        if best is None or f"trial/{best.number}" not in self._runs:
            return [], {TAG_NOTE: note + " No trial has completed yet."}
        run, kept = self._runs[f"trial/{best.number}"], kept_step(epoch_records(best)) - 1
        stamp = int(best.datetime_complete.timestamp() * 1000)
        place = standings.place()
        values = dict(zip(self.spec.metric, best.values, strict=False))
        metrics = [Metric(f"best_{k}", v, stamp, place) for k, v in values.items()]
        metrics.append(Metric("best_epoch", kept, stamp, place))
        shown = ", ".join(f"{k}={v:.4f}" for k, v in values.items())
        note += f" Best: trial {best.number} (run {run.name}), {shown} at epoch {kept}."
        note += _final_note(summary)
        tags = {TAG_BEST_TRIAL: str(best.number), TAG_BEST_RUN: run.run_id, TAG_NOTE: note}
        return metrics, tags

    def _sync_trial(self, number: int) -> None:
        trial = self._frozen(number)
        ray_id = str(trial.user_attrs.get(RAY_TRIAL_ATTR, ""))
        tags = {TAG_STAGE: "search", "dsanet.optuna_trial": str(number)}
        folder = self.folder.trial_dir(number)
        params = lambda: self._params(trial, folder)  # noqa: E731  (only built for a new run)
        key = f"trial/{number}"
        run = self._run(key, params, tags)
        epochs = accepted_epochs(trial, folder, self.spec.metric)
        records = epoch_records(trial)
        metrics = [
            Metric(name, value, stamp, epoch)
            for epoch, stamp, values in epochs[run.epochs :]
            for name, value in {**values, **self._kept(records, epoch + 1, values)}.items()
        ]
        tags = {"dsanet.trial_id": ray_id, TAG_EPOCHS: str(len(epochs))}
        self._log(run, metrics, tags | _error_tag(self._errors.get(key)))
        run.epochs = len(epochs)
        self._end(run, key, folder, _TRIAL_STATUS.get(trial.state) or self._unfinished(key))
        self._standings.update(trial)

    def _kept(
        self, records: Mapping[int, Mapping[str, Any]], done: int, logged: Mapping[str, float]
    ) -> dict[str, float]:
        """After `done` epochs: `kept_epoch` (0-based, the epoch whose values Optuna records
        as the trial's, `tune.searcher.kept_step`) and `best_<objective>`, its values, unless
        the trainer reports that name itself (`best_<selection metric>`)."""
        upto = {step: entry for step, entry in records.items() if step <= done}
        kept = kept_step(upto)
        values = zip(self.spec.metric, upto[kept]["values"], strict=False)
        best = {f"best_{k}": v for k, v in values if f"best_{k}" not in logged}
        return {"kept_epoch": kept - 1, **best}

    def _sync_seed(self, seed: int) -> None:
        """A seed's run, from when its `config.yaml` exists; each epoch of its `reports.jsonl`
        as it trains; when `result.json` exists, the rest of `_seed_rows` and its files."""
        key, folder = f"final/seed_{seed}", self.folder.seed_dir(seed)
        cfg_file = folder / RUN_CONFIG
        tags = {TAG_STAGE: "final", "dsanet.seed": str(seed)}
        params = (lambda: flatten(read_config(cfg_file))) if cfg_file.is_file() else dict
        run = self._run(key, params, tags)
        if run.status == "FINISHED":
            return
        rows, done = _seed_rows(folder), (folder / RESULT_FILE).is_file()
        metrics = [
            Metric(name, value, stamp, epoch)
            for epoch, stamp, values in (rows if done else rows[run.epochs :])
            for name, value in values.items()
            if name != "epoch" and _is_number(value)
        ]
        tags = {TAG_EPOCHS: str(len(rows))} | _error_tag(self._errors.get(key))
        self._log(run, metrics, tags)
        run.epochs = len(rows)
        self._end(run, key, folder, "FINISHED" if done else self._unfinished(key))

    def _unfinished(self, key: str) -> str:
        """The status of a trial or seed that has not ended well (yet)."""
        if key in self._errors:
            return "FAILED"
        return "INTERRUPTED" if self._ended else "RUNNING"

    def _end(self, run: _Run, key: str, folder: Path, status: str) -> None:
        """Set the run's status; the files of `folder` go with the first end status."""
        if status != run.status and status != "RUNNING":
            kept = (RUN_CONFIG, RESULT_FILE, STATE_FILES[1])
            for name in kept[:1] if status == "FAILED" else kept:
                if (folder / name).is_file():
                    self._log_files(run, folder / name, None)
        self._set_status(run, status, key)

    # ------------------------------------------------------------------ MLflow
    def _open_stores(self) -> None:
        """Open the Optuna study, find or create the experiment, read the study's runs once."""
        # Its own storage, uncached: each read sees what the searcher has just written.
        self._storage = open_storage(self.root)
        self._study = self._storage.get_study_id_from_name(self.spec.name)
        self.study_id = str(self._storage.get_study_user_attrs(self._study)[STUDY_ID_ATTR])
        name = self.spec.mlflow.experiment or self.spec.name
        found, (kind, value) = self.client.get_experiment_by_name(name), EXPERIMENT_KIND
        if found is None:
            self.experiment_id = self.client.create_experiment(
                name, _artifact_location(self.uri), tags={kind: value}
            )
        else:
            self.experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                log.warning("MLflow: experiment %r was deleted; restoring it", name)
                self.client.restore_experiment(self.experiment_id)
            if kind not in found.tags:  # a kind the user chose stays
                self.client.set_experiment_tag(self.experiment_id, kind, value)
        query, token = f"tags.`{TAG_STUDY}` = '{self.study_id}'", None
        while True:
            page = self.client.search_runs([self.experiment_id], query, page_token=token)
            for found_run in page:
                tags = found_run.data.tags
                if TAG_KEY in tags:
                    self._runs[tags[TAG_KEY]] = _Run(
                        found_run.info.run_id,
                        found_run.info.run_name,
                        int(tags.get(TAG_EPOCHS, 0)),
                        tags.get(TAG_STATUS, "RUNNING"),
                        found_run.info.status,
                    )
            token = page.token
            if not token:
                break
        self._dirty.update(self._all_keys())  # a driver's first look: anything may be missing

    def _run(self, key: str, params: Any, tags: Mapping[str, str]) -> _Run:
        """The run of `key`, created (nested under the parent) if MLflow has none. It is
        created with its identifying tags and status NEW until its params are logged, so a
        kill in between leaves a run that is found, and completed, by the next sync."""
        run = self._runs.get(key)
        if run is None:
            tags = {**tags, TAG_KEY: key, TAG_STUDY: self.study_id, TAG_STATUS: "NEW"}
            if key != PARENT:
                tags[TAG_PARENT] = self._runs[PARENT].run_id
            name = self._name(key)
            created = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run = self._runs[key] = _Run(created.info.run_id, name, status="NEW")
        if run.status == "NEW":  # logging the same params again is allowed
            pairs = [Param(k, str(v)[:6000]) for k, v in params().items()]
            for i in range(0, len(pairs), _BATCH):
                self.client.log_batch(run.run_id, params=pairs[i : i + _BATCH])
        return run

    def _log(self, run: _Run, metrics: list[Metric], tags: Mapping[str, str]) -> None:
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(metrics), len(tag_list)), _BATCH):
            self.client.log_batch(
                run.run_id, metrics[i : i + _BATCH], tags=tag_list[i : i + _BATCH]
            )

    def _name(self, key: str) -> str:
        """A run's name before RUN_STATUS adds its end: study-<folder>, trial-<n>,
        final-seed-<n>."""
        if key == PARENT:
            return f"study-{self.root.name}"
        return key.replace("/seed_", "-seed-").replace("/", "-")

    def _set_status(self, run: _Run, status: str, key: str) -> None:
        """MLflow status, `dsanet.status` tag and name of `status` (RUN_STATUS), each
        written only when it differs from what MLflow holds."""
        mlflow_status, suffix = RUN_STATUS[status]
        name = self._name(key) + suffix.format(epochs=run.epochs)
        if name != run.name:
            self.client.update_run(run.run_id, name=name)
            run.name = name
        if (status, mlflow_status) == (run.status, run.state):
            return
        self.client.set_tag(run.run_id, TAG_STATUS, status)
        if status == "RUNNING":
            self.client.update_run(run.run_id, status="RUNNING")
        else:
            self.client.set_terminated(run.run_id, mlflow_status)
        run.status, run.state = status, mlflow_status

    def _log_files(self, run: _Run, path: Path, dest: str | None) -> None:
        """`log_artifact(s)`; a checkpoint going to a local artifact folder on the same
        filesystem is hard-linked there instead of copied (checkpoints are most of a study's
        bytes, and dsanet only ever replaces a `.pt` file whole, never edits it in place)."""
        if path.suffix == ".pt":
            info = self.client.get_run(run.run_id).info
            folder = local_folder(info.artifact_uri)
            if folder is not None and _link_into(path, folder / (dest or "")):
                return
        if path.is_dir():
            self.client.log_artifacts(run.run_id, str(path), dest)
        else:
            self.client.log_artifact(run.run_id, str(path), dest)

    def _outage(self, reason: str) -> None:
        now = time.monotonic()
        if self._outage_since is None or now - self._warned > _WARN_EVERY_S:
            log.warning(
                "MLflow at %s unreachable (%s); the search goes on, and MLflow is brought up "
                "to date from the study folder once it answers",
                redact(self.uri),
                reason[:200],
            )
            self._warned = now
        if self._outage_since is None:
            self._outage_since = now

    # ------------------------------------------------------------------ the study folder
    def _frozen(self, number: int) -> FrozenTrial:
        """One trial from the storage: its cost does not grow with the study."""
        storage = self._storage
        return storage.get_trial(
            storage.get_trial_id_from_study_id_trial_number(self._study, number)
        )

    def _params(self, trial: FrozenTrial, folder: Path) -> dict[str, Any]:
        """The trial's whole resolved config, as its `config.yaml`: the base config with its
        sampled values and its own folder."""
        try:
            cfg = trial_config(self.spec, trial.params)
            return flatten(cfg.with_overrides({"train.out_dir": str(folder)}))
        except ConfigError as exc:
            log.warning("MLflow: trial %d config is invalid (%s)", trial.number, exc)
            return dict(trial.params)

    def _write_space_files(self) -> None:
        """The space file (URI credentials masked) and the resolved base config."""
        folder = self.folder.report_dir("space")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / self.spec.path.name, redact(self.spec.path.read_text()))
        write_atomic(folder / "base_config.yaml", self.spec.base.to_yaml())


def accepted_epochs(
    trial: FrozenTrial, folder: Path, objectives: Sequence[str]
) -> list[tuple[int, int, dict[str, float]]]:
    """(epoch, report time in ms, numbers measured) of each epoch Optuna holds for `trial`.

    The trainable writes each epoch's numbers to the trial's reports before Ray receives them,
    one line per epoch (a restart reports its epochs with their lines' times); a folder of an
    older version may hold an epoch twice. The line kept is the one whose report time Optuna
    recorded with the epoch; a record without a time keeps the epoch's last line; an epoch
    without a line keeps the objective values Optuna holds.
    """
    written = report_lines(folder)
    lines = {(line["epoch"], line["time"]): line for line in written}
    last = {line["epoch"]: line for line in written}
    out = []
    for step, entry in sorted(epoch_records(trial).items()):
        epoch = step - 1
        line = lines.get((epoch, entry.get("time", math.nan))) or last.get(epoch)
        if line:
            values = {k: v for k, v in line["metrics"].items() if k != "epoch"}
            stamp = int(line["time"] * 1000)
        else:
            values = dict(zip(objectives, entry["values"], strict=False))
            stamp = int(trial.datetime_start.timestamp() * 1000) + step
        out.append((epoch, stamp, {k: v for k, v in values.items() if _is_number(v)}))
    return out


def _seed_rows(folder: Path) -> list[tuple[int, int, dict[str, Any]]]:
    """(epoch, time in ms, numbers) of a final seed: one row per line of its reports; once its
    result.json exists, also the epochs of its history the reports lack (a kill between the
    checkpoint and the line; a seed trained before seeds wrote reports) and its test metrics
    at step 0, stamped with the file's time."""
    lines = {line["epoch"]: line for line in report_lines(folder)}
    rows = [(e, int(line["time"] * 1000), line["metrics"]) for e, line in sorted(lines.items())]
    result_file = folder / RESULT_FILE
    if result_file.is_file():
        result, stamp = json.loads(result_file.read_text()), _stamp(result_file)
        history = result.get("history", [])
        rows += [(int(r["epoch"]), stamp, r) for r in history if int(r["epoch"]) not in lines]
        rows.append((0, stamp, {f"test_{k}": v for k, v in result.get("test", {}).items()}))
    return rows


# ---------------------------------------------------------------------------- helpers


def check_reachable(client: MlflowClient, uri: str, space: Path) -> None:
    """Raise TrackingUnavailable unless the tracking store answers a search."""
    problem = probe(uri)
    if not problem:
        try:
            with _short_retries():
                client.search_experiments(max_results=1)
        except MlflowException as exc:
            problem = exc.message[:300]
    if problem:
        raise TrackingUnavailable(
            f"MLflow tracking URI {redact(uri)} is not usable: {problem}. Start the server "
            f"(mlflow server --backend-store-uri sqlite:///ABS/PATH/mlflow.db --host HOST "
            f"--port PORT), fix mlflow.tracking_uri in {space}, or leave it empty to track in "
            f"an SQLite file in the study folder"
        )


def probe(uri: str) -> str:
    """'' if an HTTP tracking server answers (any status below 500), else what went wrong."""
    if not uri.startswith(("http://", "https://")):
        return ""
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=(3, 10))
    except requests.Timeout:
        return "no answer within 10 s"
    except requests.RequestException as exc:
        return f"no connection ({type(exc).__name__})"
    return f"HTTP {response.status_code}" if response.status_code >= 500 else ""


def _parent_params(spec: SpaceSpec) -> dict[str, Any]:
    """Search settings and the searched ranges (the base config goes in as a file)."""
    settings: dict[str, Any] = {
        "study.space": spec.name,
        "study.metric": ",".join(spec.metric),
        "study.mode": ",".join(spec.mode),
        "study.num_samples": spec.num_samples,
        "study.max_concurrent": spec.max_concurrent,
        "study.max_failures": spec.max_failures,
        "study.points_to_evaluate": len(spec.points_to_evaluate),
        "study.resources": f"cpu={spec.resources.cpu} gpu={spec.resources.gpu}",
    }
    for block in ("searcher", "scheduler"):
        for name, value in vars(getattr(spec, block)).items():
            settings[f"{block}.{name}"] = value
    return settings | {f"search.{p.name}": p.describe() for p in spec.params}


def _git_tags(folder: Path) -> dict[str, str]:
    """The commit of the checkout holding this code, and whether tracked files differ."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "dsanet.git_dirty": str(bool(dirty)).lower()}


def _error_line(trial: Any) -> str:
    """The last line of the trial's error file (the exception), if Ray wrote one."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line]
        return lines[-1][:500] if lines else ""
    return ""


def _final_note(summary: Mapping[str, float]) -> str:
    """The final stage's mean ± std of each metric, as a sentence ("" before it ran)."""
    names = [k.removesuffix("_mean") for k in summary if k.endswith("_mean")]
    cells = ", ".join(
        f"{k.removeprefix('final_')} {summary[f'{k}_mean']:.4f} ± "
        f"{summary.get(f'{k}_std', math.nan):.4f}"
        for k in names
    )
    return f" Final stage, test mean ± std over seeds: {cells}." if names else ""


def _error_tag(error: str | None) -> dict[str, str]:
    """The `dsanet.error` tag of a run that failed with `error` (none for None)."""
    return {} if error is None else {"dsanet.error": error}


def _stamp(path: Path) -> int:
    """When a file was written (ms): the fixed timestamp of what is logged from it."""
    return int(path.stat().st_mtime * 1000)


def _is_number(value: Any) -> bool:
    """Real numbers (numpy's too) that MLflow stores: finite or NaN, not bools."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) or math.isnan(value)


@contextlib.contextmanager
def _short_retries() -> Iterator[None]:
    missing = [k for k in _RETRY_ENV if k not in os.environ]
    os.environ.update({k: _RETRY_ENV[k] for k in missing})
    try:
        yield
    finally:
        for k in missing:
            os.environ.pop(k, None)


def _transient(exc: BaseException) -> bool:
    """Errors a later retry can cure: no connection, a timeout, a locked SQLite file."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    code = getattr(exc, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or any(
        s in str(exc) for s in ("API request to", "database is locked", "timed out")
    )


def _artifact_location(uri: str) -> str | None:
    """Artifacts of an SQLite store go next to its file (MLflow's default is ./mlruns under the
    working directory); a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / MLFLOW_ARTIFACTS)
    return None


def local_folder(artifact_uri: str) -> Path | None:
    """The folder of a `file:` or plain-path artifact URI; None for any remote or proxied store
    (`mlflow-artifacts:`, `s3:`, ...), which only MLflow's own client may write."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def _link_into(path: Path, folder: Path) -> bool:
    """Hard-link a file into `folder` under its name; False if that cannot be done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return link_atomic(path, folder / path.name)
