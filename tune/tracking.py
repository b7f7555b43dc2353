"""MLflow tracking of a study: one parent run, a nested run per trial and per final-stage seed.

`MlflowTracker` is a Ray Tune callback (it runs in the driver). Its writes go through a
`RunQueue` persisted in `<study_dir>/mlflow_state.json`, so a restored study reuses its runs
and logs each epoch once, and what is logged while the tracking server is down is delivered
once it is back. Only config fields, search settings, per-epoch numbers, the git commit and
files of the study are logged: no environment variables, no credentials.
"""

from __future__ import annotations

import logging
import math
import numbers
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray.tune import Callback

from dsanet.config import ConfigError, flatten
from tune.mlflow_queue import PARENT, STATE_FILE, RunQueue, TrackingUnavailable, redact
from tune.plan import PROTOCOL_NOTES
from tune.searcher import ADOPTED_KEY
from tune.space import SpaceSpec, sampled_values, trial_config

__all__ = ["PARENT", "STATE_FILE", "MlflowTracker", "TrackingUnavailable", "RUN_STATUS"]

log = logging.getLogger(__name__)

TAG_STATUS, TAG_STAGE = "dsanet.status", "dsanet.stage"
# dsanet status -> MLflow run status (MLflow has no PRUNED: KILLED plus the dsanet.status tag)
RUN_STATUS = {
    "RUNNING": "RUNNING",
    "FINISHED": "FINISHED",
    "PRUNED": "KILLED",
    "INTERRUPTED": "KILLED",
    "KILLED": "KILLED",
    "FAILED": "FAILED",
}
# Keys Ray adds to every result: bookkeeping, not measurements (`epoch` is the step).
_RAY_KEYS = frozenset(
    "epoch training_iteration timestamp time_this_iter_s time_total_s time_since_restore "
    "iterations_since_restore pid done date hostname node_ip trial_id experiment_tag config "
    "should_checkpoint checkpoint_dir_name experiment_id".split()
)
# Numbers a trainable may report that identify rather than measure: logged as tags.
_TAG_KEYS = {"optuna_trial": "dsanet.optuna_trial"}
_QUEUES: dict[Path, tuple[str, RunQueue]] = {}  # study folder -> (URI asked for, its queue)


class MlflowTracker(Callback):
    """Logs a study to MLflow: a Tune callback, plus `start_parent` (call it before the search)
    and `finish_parent`. Trackers of one study folder in one process share their queue, so the
    copy `Tuner.restore` unpickles from tuner.pkl and a tracker built anew act as one.
    """

    def __init__(self, study_dir: Path, spec: SpaceSpec, tracking_uri: str = "") -> None:
        self.study_dir = Path(study_dir).resolve()
        self.spec = spec
        self._uri_asked = tracking_uri
        uri, queue = _QUEUES.get(self.study_dir, ("", None))
        if queue is None or uri != tracking_uri:
            experiment = spec.mlflow.experiment or spec.name
            queue = RunQueue(self.study_dir, tracking_uri, experiment, spec.path)
            _QUEUES[self.study_dir] = (tracking_uri, queue)
        self._queue = queue

    def __reduce__(self) -> tuple[Any, ...]:  # the client and the queue stay in this process
        return (MlflowTracker, (self.study_dir, self.spec, self._uri_asked))

    @property
    def tracking_uri(self) -> str:
        return self._queue.uri

    @property
    def client(self) -> MlflowClient:
        return self._queue.client

    @property
    def parent_run_id(self) -> str:
        """The parent run's id; "" until MLflow has accepted it."""
        return self._queue.run_id(PARENT)

    def ui_command(self) -> str:
        """How to browse the study: `mlflow ui --backend-store-uri ...`, or a server's URL."""
        uri = redact(self.tracking_uri)
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{self._queue.state['experiment_id']}"
        return f"mlflow ui --backend-store-uri {uri}"

    # ------------------------------------------------------------------ parent run
    def start_parent(self, resumed: bool) -> str:
        """Create the parent run (on resume, reopen the saved one) and log the study settings.

        On resume, child runs left RUNNING by a killed driver are ended as INTERRUPTED; the
        trials Tune resumes reopen theirs.
        """
        saved = self.parent_run_id  # "" while its creation is still queued (MLflow was down)
        if resumed and PARENT in self._queue.runs and (not saved or self._queue.run_exists(saved)):
            self._close_running("INTERRUPTED")
            self.open_run(PARENT, "", {}, {})  # reopens it if it was ended
            return self.parent_run_id
        protocol = self.spec.base.data.protocol
        if self._queue.runs:
            log.warning(
                "MLflow: new parent run for %s; its earlier runs stay as they are", self.study_dir
            )
            self._queue.reset()
        self.open_run(
            PARENT,
            f"study-{self.study_dir.name}",
            _parent_params(self.spec),
            {
                "dsanet.role": "study",
                TAG_STAGE: "search",
                "dsanet.space": self.spec.name,
                "dsanet.protocol": protocol,
                "mlflow.note.content": f"Study {self.spec.name}, data.protocol={protocol}: "
                f"{PROTOCOL_NOTES[protocol]}.",
                "dsanet.study_dir": str(self.study_dir),
                **_git_tags(Path(__file__).resolve().parents[1]),
            },
        )
        for path in self._write_space_files():
            self.log_artifact(PARENT, path, "space")
        return self.parent_run_id

    def finish_parent(
        self,
        status: str = "FINISHED",
        summary: Mapping[str, Any] | None = None,
        wait_s: float = 60.0,
    ) -> None:
        """Log `summary` (numbers as metrics, the rest as tags), end every open run, deliver.

        `status`: FINISHED, KILLED (interrupted) or FAILED. Waits up to `wait_s` for an
        unreachable server; what is still undelivered stays in the state file and is delivered
        when the study resumes. MLflow errors never raise here.
        """
        if status not in ("FINISHED", "KILLED", "FAILED"):
            raise ValueError(f"finish_parent status {status!r}: use FINISHED, KILLED or FAILED")
        if summary:
            values = {k: v for k, v in summary.items() if _is_number(v)}
            texts = {f"dsanet.summary.{k}": str(v) for k, v in summary.items() if k not in values}
            self.log(PARENT, metrics=values, tags=texts)
        self._close_running("INTERRUPTED")
        self.close_run(PARENT, status)
        self.flush(wait_s)
        log.info("MLflow: browse the study with: %s", self.ui_command())

    # ------------------------------------------------------------------ any run of the study
    def open_run(
        self, key: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str]
    ) -> None:
        """A run nested under the parent, created once per `key`; an ended one is reopened."""
        record = self._queue.runs.get(key)
        if record is None:
            self._queue.runs[key] = {"status": "RUNNING", "last_epoch": -1}
            params = {
                k: str(list(v) if isinstance(v, tuple) else v)[:6000] for k, v in params.items()
            }
            tags = {**tags, TAG_STATUS: "RUNNING"}
            self._queue.submit(
                {"op": "create", "key": key, "name": name, "tags": tags, "params": params}
            )
        elif record["status"] != "RUNNING":
            record["status"] = "RUNNING"
            self.log(key, tags={TAG_STATUS: "RUNNING"})
            self._queue.submit({"op": "status", "key": key, "status": "RUNNING"})

    def log(
        self,
        key: str,
        metrics: Mapping[str, Any] | None = None,
        step: int = 0,
        tags: Mapping[str, str] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Numeric metrics at `step` and tags; a fixed `timestamp_ms` makes a replay a no-op."""
        values = {k: float(v) for k, v in (metrics or {}).items() if _is_number(v)}
        if values or tags:
            ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
            self._queue.submit(
                {
                    "op": "log",
                    "key": key,
                    "metrics": values,
                    "step": int(step),
                    "ts": ts,
                    "tags": dict(tags or {}),
                }
            )

    def log_artifact(self, key: str, path: Path, dest: str | None = None) -> None:
        """A file, or a folder's contents, under `dest` in the run's artifacts."""
        self._queue.submit({"op": "artifact", "key": key, "path": str(path), "dest": dest})

    def close_run(self, key: str, status: str, tags: Mapping[str, str] | None = None) -> None:
        """End a run: the MLflow status from RUN_STATUS, the dsanet status as a tag."""
        record = self._queue.runs.get(key)
        if record is None:
            return
        record["status"] = status
        self.log(key, tags={TAG_STATUS: status, **(tags or {})})
        self._queue.submit({"op": "status", "key": key, "status": RUN_STATUS[status]})

    def status_of(self, key: str) -> str | None:
        """The dsanet status recorded for a run key; None if it has no run."""
        return self._queue.runs.get(key, {}).get("status")

    def flush(self, wait_s: float = 0.0) -> bool:
        """Deliver buffered updates, waiting up to `wait_s` for the server; True if none remain."""
        return self._queue.flush(wait_s)

    def close(self) -> None:
        """Deliver what can be delivered now and detach this study folder's queue."""
        self._queue.flush(0.0)
        _QUEUES.pop(self.study_dir, None)

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        tags = {TAG_STAGE: "search", "dsanet.trial_id": trial.trial_id}
        if key != trial.trial_id and self.status_of(key) is not None:
            self.log(key, tags=tags)  # the run now follows the Ray trial that adopted it
        self.open_run(key, f"trial-{trial.trial_id}", self._trial_params(trial), tags)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        key = self._key(trial)
        if key not in self._queue.runs:
            self.on_trial_start(iteration, trials, trial)
        record = self._queue.runs[key]
        if isinstance(result.get("out_dir"), str):
            record["out_dir"] = result["out_dir"]
        epoch = int(result.get("epoch", result.get("training_iteration", 1) - 1))
        if epoch <= record["last_epoch"]:
            return  # logged before a restore: each epoch goes to MLflow once
        record["last_epoch"] = epoch
        metrics = {k: v for k, v in result.items() if k not in _RAY_KEYS and k not in _TAG_KEYS}
        tags = {tag: str(result[k]) for k, tag in _TAG_KEYS.items() if k in result}
        self.log(key, metrics, step=epoch, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        record = self._queue.runs.get(key)
        if record is None:
            return
        self._log_trial_files(key, ("best.pt", "config.yaml"))
        done = record["last_epoch"] + 1 >= self.spec.scheduler.max_t
        self.close_run(key, "FINISHED" if done else "PRUNED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._key(trial)
        if key not in self._queue.runs:
            self.on_trial_start(iteration, trials, trial)
        self._log_trial_files(key, ("config.yaml",))
        self.close_run(key, "FAILED", {"dsanet.error": _error_line(trial)})

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._close_running("INTERRUPTED")  # trials left running by Ctrl-C
        self.flush(0.0)

    # ------------------------------------------------------------------ helpers
    def _key(self, trial: Any) -> str:
        """The run key of a Ray trial: its id; or, when it adopted the Optuna trial of a Ray
        trial lost with a killed driver (config `_adopted_from`), the key of that trial's run,
        so the Optuna trial keeps one MLflow run and its epochs are logged once."""
        aliases: dict[str, str] = self._queue.state.setdefault("aliases", {})
        if trial.trial_id in aliases:
            return aliases[trial.trial_id]
        previous = (trial.config or {}).get(ADOPTED_KEY)
        if previous and trial.trial_id not in self._queue.runs:
            key = aliases.get(previous, previous)
            if key in self._queue.runs:
                aliases[trial.trial_id] = key
                return key
        return trial.trial_id

    def _close_running(self, status: str) -> None:
        for key, record in list(self._queue.runs.items()):
            if key != PARENT and record["status"] == "RUNNING":
                self.close_run(key, status)

    def _trial_params(self, trial: Any) -> dict[str, Any]:
        """The trial's whole resolved config: the base config with its sampled values."""
        sampled = sampled_values(trial.config or {})
        try:
            return flatten(trial_config(self.spec, sampled))
        except ConfigError as exc:
            log.warning(
                "MLflow: trial %s config is invalid (%s); logging the sampled values",
                trial.trial_id,
                exc,
            )
            return sampled

    def _log_trial_files(self, key: str, names: tuple[str, ...]) -> None:
        out_dir = self._queue.runs[key].get("out_dir")
        for name in names:
            if out_dir and (Path(out_dir) / name).is_file():
                self.log_artifact(key, Path(out_dir) / name)

    def _write_space_files(self) -> list[Path]:
        """The space file (URI credentials masked) and the resolved base config."""
        folder = self.study_dir / "report" / "space"
        folder.mkdir(parents=True, exist_ok=True)
        space, base = folder / self.spec.path.name, folder / "base_config.yaml"
        space.write_text(redact(self.spec.path.read_text()))
        base.write_text(self.spec.base.to_yaml())
        return [space, base]


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


def _is_number(value: Any) -> bool:
    """Real numbers (numpy's too) that MLflow stores: finite or NaN, not bools."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) or math.isnan(value)
