"""Fixtures and helpers for search tests on a real Ray: small data, spaces, processes.

Test modules import the helpers they use (`from ray_fixtures import ...`); the fixtures
(`xd_small`, `local_ray`, `ray_tmp`) live in conftest.py, so the session's data is made once.
Ray is always started with
`address="local"` or as a `ray.cluster_utils.Cluster` of this test, never joined; processes are
stopped by the PIDs the test started, never with `ray stop`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

_top_spec = importlib.util.spec_from_file_location(
    "_tune_tests_top_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
)
_top = importlib.util.module_from_spec(_top_spec)
_top_spec.loader.exec_module(_top)
REPO = _top.REPO
RUN_PY = REPO / "tune" / "run.py"
MAX_T = 3  # epochs of every test trial


def tiny_overrides(data: dict[str, Path], **more: Any) -> dict[str, Any]:
    """tests/conftest.py's tiny DSANet as space overrides, MAX_T epochs of 2 steps."""
    pairs = (item.split("=", 1) for item in _top.tiny_run_overrides(data, Path("unused")))
    overrides = {k: yaml.safe_load(v) for k, v in pairs if k != "train.out_dir"}
    overrides.update({"train.epochs": MAX_T, "train.max_steps_per_epoch": 2}, **more)
    return overrides


def write_space(folder: Path, data: dict[str, Path], **fields: Any) -> Path:
    """A search space over the tiny model; `fields` replace top-level keys."""
    folder.mkdir(parents=True, exist_ok=True)
    space = {
        "name": "t",
        "base": "demo",
        "overrides": tiny_overrides(data),
        "search": {
            "optim.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
            "train.seed": [234, 1, 2, 3, 4, 5, 6, 7],  # different starts: different epoch-1 scores
        },
        "metric": "val_ap",
        "mode": "max",
        "points_to_evaluate": ["base"],
        "searcher": {"kind": "tpe", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"kind": "asha", "max_t": MAX_T, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 4,
        "max_concurrent": 2,
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"tracking_uri": "", "experiment": f"t-{folder.name}"},
        "storage_path": str(folder / "studies"),
        **fields,
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- studies


def one_trial_space(folder: Path, data: dict[str, Path], epochs: int) -> Path:
    """A space of one trial that runs `epochs` epochs without a scheduler (fault tests)."""
    overrides = tiny_overrides(data, **{"train.epochs": epochs})
    return write_space(
        folder,
        data,
        overrides=overrides,
        num_samples=1,
        max_concurrent=1,
        scheduler={"kind": "none"},
    )


def load_study(root: Path, name: str = "t") -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


def study_trials(root: Path, name: str = "t") -> list[Any]:
    """The study's trials, or [] before the driver has made its database.

    Opening the store before the driver has stamped its schema version would make Optuna stamp
    it from here too, and one of the two processes fails on the duplicate version row.
    """
    if not _schema_stamped(root / "optuna.db"):
        return []
    try:
        return load_study(root, name).get_trials(deepcopy=False)
    except KeyError:  # the study row is not written yet
        return []


def _schema_stamped(path: Path) -> bool:
    import sqlite3
    from contextlib import closing

    if not path.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return db.execute("SELECT version_num FROM alembic_version").fetchone() is not None
    except sqlite3.Error:  # no table yet, or the driver holds the write lock
        return False


def reports(root: Path, number: int | str) -> list[dict[str, Any]]:
    """What Optuna trial `number`'s workers reported: one dict per epoch, in the order written
    (tune.trainable.REPORTS_FILE)."""
    import json

    path = root / "trials" / str(number) / "reports.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def mlflow_children(root: Path) -> list[Any]:
    """The trial runs under the study's parent run in the study's MLflow database."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=1000
    )
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


# ---------------------------------------------------------------------------- processes


def start_study(args: list[str], log: Path, ray_tmp: Path) -> subprocess.Popen:
    """`python tune/run.py ARGS` in its own process group (so the test can kill all of it)."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.Popen(
        [sys.executable, str(RUN_PY), *args],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the study exited ({proc.returncode}) before the condition")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s")
        time.sleep(0.5)


def kill_study(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group and every process it started (Ray's included)."""
    family = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in family if alive(pid)]
    assert not survivors, f"processes of the killed study still alive: {survivors}"


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_resumed_from_checkpoint(root: Path, trial: Any, lost_pid: int, epochs: int) -> None:
    """The trial's worker `lost_pid` died (killed, or its node removed) and another worker
    finished it from the checkpoint in the trial's folder: every epoch has exactly one line,
    and the new worker's first line is the first epoch the lost one left without a line."""
    lines = reports(root, trial.number)
    before = [line["epoch"] for line in lines if line["pid"] == lost_pid]
    after = [line for line in lines if line["pid"] != lost_pid]
    assert before == list(range(len(before))) and after, "no epoch ran after the worker died"
    start = after[0]["resumed_at"]
    assert start == len(before) > 0
    assert [line["epoch"] for line in after] == list(range(start, epochs))
