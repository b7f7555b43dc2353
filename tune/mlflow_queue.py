"""A persisted, ordered queue of MLflow writes for one study folder, delivered when MLflow answers.

Each write is a JSON operation (create a run, log metrics and tags, log an artifact, set a run
status) kept in `<study_dir>/mlflow_state.json`, next to the run ids, until MLflow accepts it.
Operations are idempotent (a metric keeps the timestamp it was queued with, a run is created
once per key), so delivering one again after a crash changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from dsanet.errors import brief
from tune.links import link_atomic

log = logging.getLogger(__name__)

STATE_FILE = "mlflow_state.json"
PARENT = "study"  # run key of the parent run
TAG_KEY = "dsanet.run_key"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag
# MLflow's HTTP client retries a refused connection for about 4 minutes by default; inside a
# Tune callback that stalls the whole study, so our calls get a short budget unless the user set
# one: the queue does the retrying.
_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_MAX_TRIES = 5  # failures of one operation while the server answers, before it is dropped
_WARN_EVERY_S = 300.0
_BATCH = 100  # MLflow's limit of params (and tags) per log_batch


class TrackingUnavailable(ConnectionError):
    """The tracking URI cannot be used; the message names the URI and the fix."""


class RunQueue:
    """Run ids, per-run records and pending MLflow operations of one study, persisted."""

    def __init__(self, study_dir: Path, tracking_uri: str, experiment: str, space: Path) -> None:
        study_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri or f"sqlite:///{study_dir / 'mlflow.db'}"
        self.experiment, self.path = experiment, study_dir / STATE_FILE
        self.client = MlflowClient(tracking_uri=self.uri)
        self.outage_since: float | None = None
        self._artifact_uris: dict[str, str] = {}  # run id -> its artifact URI
        self.last_warning = 0.0
        check_reachable(self.client, self.uri, space)
        self.state = load_state(self.path)

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        """Run key -> record: `run_id` once MLflow created it, plus what the tracker keeps."""
        return self.state["runs"]

    def run_id(self, key: str) -> str:
        return self.runs.get(key, {}).get("run_id", "")

    def reset(self) -> None:
        self.state = {"experiment_id": "", "runs": {}, "pending": []}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)

    def run_exists(self, run_id: str) -> bool:
        try:
            with _short_retries():
                self.client.get_run(run_id)
        except MlflowException as exc:
            if _transient(exc):
                return True  # assume so; the queued operations will find out
            log.warning("MLflow: saved run %s is gone (%s)", run_id, exc.message)
            return False
        return True

    # ------------------------------------------------------------------ delivery
    def submit(self, op: dict[str, Any]) -> None:
        """Queue one operation (op: create | log | artifact | status) and try to deliver.

        The queue is saved first: a driver killed after MLflow created a run, before the run id
        was saved, leaves the create queued, and delivering it again adopts that run.
        """
        self.state["pending"].append(op)
        self.save()
        self.flush(0.0)

    def flush(self, wait_s: float = 0.0) -> bool:
        """Deliver pending operations, retrying for up to `wait_s`; True when none remain."""
        deadline, pause = time.monotonic() + wait_s, 1.0
        while not self._deliver():
            left = deadline - time.monotonic()
            if left <= 0:
                if wait_s > 0:
                    log.error(
                        "MLflow at %s is still unreachable: %d updates stay buffered in %s and "
                        "are delivered when the study is resumed",
                        redact(self.uri),
                        len(self.state["pending"]),
                        self.path,
                    )
                return False
            log.warning(
                "MLflow at %s unreachable; waiting for it with %d updates buffered (%.0f s left)",
                redact(self.uri),
                len(self.state["pending"]),
                left,
            )
            time.sleep(min(pause, left))
            pause = min(2 * pause, 15.0)
        return True

    def _deliver(self) -> bool:
        """Apply pending operations in order; False when the server stopped answering."""
        pending = self.state["pending"]
        problem = probe(self.uri) if pending else ""
        if problem:
            self._outage(problem)
            self.save()
            return False
        while pending:
            op = pending[0]
            try:
                with _short_retries():
                    self._apply(op)
            except (MlflowException, requests.RequestException, OSError) as exc:
                op["tries"] = op.get("tries", 0) + 1
                if _transient(exc) and op["tries"] < _MAX_TRIES:
                    self._outage(str(exc))
                    self.save()
                    return False
                log.warning("MLflow: dropped %s for run %s: %s", op["op"], op["key"], exc)
            pending.pop(0)
            self.save()
        if self.outage_since is not None:
            log.warning("MLflow at %s answers again; buffered updates delivered", redact(self.uri))
            self.outage_since = None
        return True

    def _outage(self, reason: str) -> None:
        now = time.monotonic()
        if self.outage_since is None or now - self.last_warning > _WARN_EVERY_S:
            log.warning(
                "MLflow at %s unreachable (%s); buffering updates in %s and retrying at each "
                "trial event; the search goes on",
                redact(self.uri),
                reason[:200],
                self.path,
            )
            self.last_warning = now
        if self.outage_since is None:
            self.outage_since = now

    def _apply(self, op: dict[str, Any]) -> None:
        if op["op"] == "create":
            self._create(op)
            return
        run_id = self.run_id(op["key"]) or _fail(f"run {op['key']!r} was never created")
        if op["op"] == "log":
            metrics = [Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()]
            tags = [RunTag(k, v) for k, v in op["tags"].items()]
            for i in range(0, max(len(metrics), len(tags)), _BATCH):
                self.client.log_batch(run_id, metrics[i : i + _BATCH], tags=tags[i : i + _BATCH])
        elif op["op"] == "artifact":
            self._log_files(run_id, Path(op["path"]), op["dest"])
        elif op["status"] == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, op["status"])

    def _log_files(self, run_id: str, path: Path, dest: str | None) -> None:
        """`log_artifact(s)`; a checkpoint going to a local artifact folder on the same
        filesystem is hard-linked there instead of copied (checkpoints are most of a study's
        bytes, and dsanet only ever replaces a `.pt` file whole, never edits it in place)."""
        if path.suffix == ".pt" and path.is_file():
            if run_id not in self._artifact_uris:
                self._artifact_uris[run_id] = self.client.get_run(run_id).info.artifact_uri
            folder = local_folder(self._artifact_uris[run_id])
            if folder is not None and _link_into(path, folder / (dest or "")):
                return
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), dest)
        else:
            self.client.log_artifact(run_id, str(path), dest)

    def _create(self, op: dict[str, Any]) -> None:
        """Create a run once. A child run already carrying this key (a kill between its
        creation and the state save) is adopted instead of duplicated."""
        key, record = op["key"], self.runs.setdefault(op["key"], {})
        if record.get("run_id"):
            return
        tags = {TAG_KEY: key, **op["tags"]}
        experiment_id = self._experiment_id()
        if key != PARENT:
            tags[TAG_PARENT] = self.run_id(PARENT) or _fail("the parent run was never created")
            query = f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_PARENT}` = '{tags[TAG_PARENT]}'"
            found = self.client.search_runs([experiment_id], query, max_results=1)
            if found:
                record["run_id"] = found[0].info.run_id
                return
        run = self.client.create_run(experiment_id, run_name=op["name"], tags=tags)
        params = [Param(k, v) for k, v in op["params"].items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(run.info.run_id, params=params[i : i + _BATCH])
        record["run_id"] = run.info.run_id

    def _experiment_id(self) -> str:
        if self.state["experiment_id"]:
            return self.state["experiment_id"]
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            experiment_id = self.client.create_experiment(
                self.experiment, _artifact_location(self.uri)
            )
        else:
            experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                log.warning("MLflow: experiment %r was deleted; restoring it", self.experiment)
                self.client.restore_experiment(experiment_id)
        self.state["experiment_id"] = experiment_id
        return experiment_id


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


def redact(text: str) -> str:
    """Mask credentials in URIs (scheme://user:secret@host)."""
    return re.sub(r"(\w+://)[^/@\s'\"]+@", r"\1***@", text)


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"experiment_id": "", "runs": {}, "pending": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not (
            isinstance(state, dict)
            and isinstance(state.get("experiment_id"), str)
            and isinstance(state.get("runs"), dict)
            and isinstance(state.get("pending"), list)
            and all(isinstance(r, dict) for r in state["runs"].values())
        ):
            raise ValueError("not the queue's state")
    except ValueError as exc:  # JSON, UTF-8 or shape
        raise ValueError(
            f"{path} is damaged ({brief(str(exc))}); delete it to start the MLflow record of "
            f"this study afresh"
        ) from exc
    return state


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
        return str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
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


def _fail(message: str) -> str:
    raise MlflowException(message)
