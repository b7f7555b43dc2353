"""Fixtures of the search tests: a real `mlflow server` on 127.0.0.1, small synthetic data, a
local Ray, short Ray temp dirs; and the top-level helpers.

`import conftest` in a test under tests/tune finds this file first, so the helpers of
tests/conftest.py are re-exported here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

_spec = importlib.util.spec_from_file_location(
    "_tests_top_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
)
_top = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_top)
REPO, SHARED, FIXTURES = _top.REPO, _top.SHARED, _top.FIXTURES
tiny_run_overrides, write_tiny_tree = _top.tiny_run_overrides, _top.write_tiny_tree
one_error = _top.one_error

MLFLOW = Path(sys.executable).parent / "mlflow"
START_TIMEOUT_S = 300.0  # 8-18 s on an idle 2-core machine; minutes when it is shared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` over an SQLite file (or the database `backend` names, e.g. PostgreSQL's
    from tests/tune/postgres.py); can be stopped and started again on the same port."""

    def __init__(self, root: Path, port: int | None = None, backend: str = "") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, port or free_port()
        self.db, self.artifacts = root / "mlflow.db", root / "artifacts"
        self.backend = backend or f"sqlite:///{self.db}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> MlflowServer:
        return self.launch().wait_until_up()

    def launch(self) -> MlflowServer:
        """Start the server's process and return at once; `wait_until_up` waits for it."""
        self.starts += 1
        self._logname = str(self.root / f"server-{self.starts}.log")
        command = [
            str(MLFLOW), "server",
            "--backend-store-uri", self.backend,
            "--default-artifact-root", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self._logname, "w") as logfile:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command, stdout=logfile, stderr=subprocess.STDOUT, env=env
            )
        return self

    def wait_until_up(self) -> MlflowServer:
        logname = self._logname
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = Path(logname).read_text()[-2000:]
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            try:
                if requests.get(f"{self.uri}/", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """SIGTERM to the server's PID (it stops its uvicorn worker), SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._wait_port_free()

    def _wait_port_free(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.uri}/health", timeout=1)
            except requests.RequestException:
                return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One tracking server for the session (each test uses its own experiment), started at its
    first use (in each xdist worker that runs a test of it: test_tracking's, with `--dist
    loadfile`)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_mlflow_server(tmp_path) -> MlflowServer:
    """A server the test may stop and restart (same database and port)."""
    server = MlflowServer(tmp_path / "mlflow-server").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def xd_small(tmp_path_factory) -> dict[str, Path]:
    """A quarter-size synthetic xd-mini (40 train / 20 test videos): epochs of about a second."""
    from dsanet.synth import generate

    out = tmp_path_factory.mktemp("xd-small") / "data"
    generate("xd-mini", out, seed=0, scale=0.25)
    return {"lists": out / "lists", "features": out / "features", "cache": out.parent / "cache"}


@pytest.fixture
def local_ray() -> Iterator[None]:
    """An in-process local Ray with 2 CPUs and a short temp dir; `tune.driver.main` uses it."""
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Unix socket paths must stay short
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short temp dir for the Ray sessions of subprocess studies, removed afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def write_space(
    folder: Path,
    experiment: str,
    tracking_uri: str = "",
    overrides: dict | None = None,
    **extra: object,
):
    """A small search space over the demo config, loaded and validated (a `SpaceSpec`)."""
    import yaml

    from tune.space import load_space

    folder.mkdir(parents=True, exist_ok=True)
    tree = {
        "name": "tiny",
        "base": "demo",
        "overrides": overrides or {},
        "search": {
            "optim.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
            "model.num_prototypes": [4, 8],
        },
        "metric": "val_ap",
        "mode": "max",
        "scheduler": {"kind": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 4,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment},
        "storage_path": str(folder / "studies"),
        **extra,
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_space(path)
