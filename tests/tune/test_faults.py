"""Faults on real processes: a killed trial worker, a storage folder that cannot be written or
runs full, and checkpoint writes cut short. Nothing finished is lost or recorded twice.

The other faults of the README's table are tested where their machinery lives: a removed Ray
node and a SIGKILLed driver in test_driver.py, a tracking server that goes away in
test_tracking.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from ray_fixtures import (
    REPO,
    RUN_PY,
    assert_resumed_from_checkpoint,
    mlflow_children,
    one_trial_space,
    reports,
    study_trials,
    write_space,
)

from dsanet.trainer import load_checkpoint
from tune.driver import main

EPOCHS = 5


# ---------------------------------------------------------------------------- a killed worker


@pytest.mark.slow
def test_killed_trial_worker_is_retried_from_its_last_checkpoint(tmp_path, xd_small, local_ray):
    from mlflow import MlflowClient

    space = one_trial_space(tmp_path, xd_small, EPOCHS)
    root, killed = tmp_path / "studies" / "t", []

    def kill_the_worker_mid_epoch() -> None:
        """SIGKILL the trial's worker (its PID is in the trial's reports) after epoch 2."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            trial_dirs = list((root / "trials").glob("*"))
            lines = reports(root, trial_dirs[0].name) if trial_dirs else []
            if len(lines) >= 2:
                time.sleep(1.0)  # the driver registers the checkpoint; the next epoch runs
                killed.append(lines[-1]["pid"])
                os.kill(lines[-1]["pid"], signal.SIGKILL)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_mid_epoch, daemon=True)
    killer.start()
    try:
        assert main(["--space", str(space), "--final-seeds", "0"]) == 0
    finally:
        killer.join(timeout=5)
    assert killed, "the trial's worker was never killed"

    (trial,) = study_trials(root)  # once, complete, every epoch told to Optuna once
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
    assert_resumed_from_checkpoint(root, trial, killed[0], EPOCHS)

    (run,) = mlflow_children(root)  # one MLflow run, each finished epoch in it exactly once
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ap")]
    assert sorted(steps) == list(range(EPOCHS))
    assert run.info.status == "FINISHED" and run.data.tags["dsanet.status"] == "FINISHED"


# ---------------------------------------------------------------------------- storage


def _run_py(
    args: list[str], ray_tmp: Path, fsize: int | None = None
) -> subprocess.CompletedProcess:
    """`python tune/run.py ARGS`; with `fsize`, no file may grow past that many bytes (a disk
    that is full), and SIGXFSZ is ignored so that writes fail with EFBIG instead."""
    code = "import resource, runpy, signal, sys\n"
    if fsize is not None:
        code += (
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        )
    code += f"sys.argv = ['tune/run.py', *sys.argv[1:]]\nrunpy.run_path({str(RUN_PY)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
        timeout=300,
    )


@pytest.mark.parametrize("case", ["storage path is a file", "disk full"])
def test_unusable_storage_is_one_error_before_ray(tmp_path, xd_small, case):
    space = write_space(tmp_path, xd_small)
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    if case == "storage path is a file":
        run = _run_py(["--space", str(space), "--storage-path", str(blocker / "s")], ray_tmp)
        message = f"storage path {blocker}/s/t: {blocker} is not a folder"
    else:
        run = _run_py(["--space", str(space)], ray_tmp, fsize=64 << 10)
        message = r"storage path .*/studies/t cannot be written \(File too large\)"
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("error:") == 1
    assert "Traceback" not in run.stderr
    assert re.search(message, run.stderr), run.stderr
    assert "--storage-path" in run.stderr  # the fix
    assert not list(ray_tmp.iterdir())  # Ray never started
    assert not (tmp_path / "studies").exists() and not list(tmp_path.glob(".dsanet-write-probe*"))


# ---------------------------------------------------------------------------- atomic checkpoints

_WRITER = """
import resource, signal, sys, time, torch
from pathlib import Path
from dsanet.trainer import save_atomic
path, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "small-disk":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
print("writing", flush=True)
save_atomic({"epoch": 2, "weights": torch.ones(16 << 20)}, path)  # 64 MB: never fits 1 MB
print("written", flush=True)
time.sleep(60)
"""


def _old_checkpoint(path: Path) -> dict:
    state = {"epoch": 1, "weights": torch.arange(1000.0)}
    torch.save(state, path)
    return state


def _same(a: dict, b: dict) -> bool:
    return a["epoch"] == b["epoch"] and torch.equal(a["weights"], b["weights"])


@pytest.mark.parametrize("had_one", [True, False], ids=["over-an-old-one", "first"])
def test_checkpoint_write_on_a_full_disk_leaves_the_old_file_or_nothing(tmp_path, had_one):
    path = tmp_path / "last.pt"
    old = _old_checkpoint(path) if had_one else None
    run = subprocess.run(
        [sys.executable, "-c", _WRITER, str(path), "small-disk"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"OSError: could not write {path}" in run.stderr and "checkpoint is kept" in run.stderr
    assert "written" not in run.stdout
    if had_one:
        assert _same(load_checkpoint(path, torch.device("cpu")), old)
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["last.pt"] if had_one else [])


def test_checkpoint_write_killed_midway_leaves_a_complete_file(tmp_path):
    path = tmp_path / "last.pt"
    old = _old_checkpoint(path)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), "kill"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while not [p for p in tmp_path.glob(".last.pt.tmp-*") if p.stat().st_size > 0]:
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.001)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    # The kill cut the new file short; the checkpoint is still the old, complete one.
    (partial,) = tmp_path.glob(".last.pt.tmp-*")
    with pytest.raises(ValueError, match="not a torch.save file"):
        load_checkpoint(partial, torch.device("cpu"))
    assert _same(load_checkpoint(path, torch.device("cpu")), old)
