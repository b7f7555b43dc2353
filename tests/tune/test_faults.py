"""Faults on real processes: a killed trial worker, a storage folder that cannot be written or
runs full, and checkpoint writes cut short. Nothing finished is lost or recorded twice.

The other faults of the README's table are tested where their machinery lives: a removed Ray
node and a SIGKILLed driver in test_driver.py, a tracking server that goes away in
test_tracking.py.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState
from ray_fixtures import (
    assert_resumed_from_checkpoint,
    mlflow_children,
    one_trial_space,
    reports,
    study_trials,
    write_space,
)

from dsanet.trainer import load_checkpoint, save_atomic
from tune.driver import main

EPOCHS = 5


# ---------------------------------------------------------------------------- a killed worker


@pytest.mark.slow
def test_killed_trial_worker_is_retried_from_its_folder(tmp_path, xd_small, local_ray):
    from mlflow import MlflowClient

    space = one_trial_space(tmp_path, xd_small, EPOCHS)
    root, killed = tmp_path / "studies" / "t", []

    ended = threading.Event()

    def kill_the_worker_mid_epoch() -> None:
        """SIGKILL the trial's worker (its PID is in the trial's reports) after epoch 2."""
        while not ended.is_set() and not killed:
            trial_dirs = list((root / "trials").glob("*"))
            lines = reports(root, trial_dirs[0].name) if trial_dirs else []
            if len(lines) >= 2:
                time.sleep(1.0)  # into the next epoch
                killed.append(lines[-1]["pid"])
                os.kill(lines[-1]["pid"], signal.SIGKILL)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_mid_epoch, daemon=True)
    killer.start()
    try:
        assert main(["--space", str(space), "--final-seeds", "0"]) == 0
    finally:
        ended.set()  # however long the study took (a loaded machine trains slowly)
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


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """No file of this process may grow past `nbytes` (a disk that is full): the soft
    RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail with EFBIG; both restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("case", ["storage path is a file", "disk full"])
def test_unusable_storage_is_one_error_before_ray(tmp_path, xd_small, case, capsys, monkeypatch):
    """In-process `main(argv)` (tests/tune/test_run.py runs `python tune/run.py` itself)."""
    import ray

    space = write_space(tmp_path, xd_small)
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    if case == "storage path is a file":
        status = main(["--space", str(space), "--storage-path", str(blocker / "s")])
        message = f"storage path {blocker}/s/t: {blocker} is not a folder"
    else:
        with file_size_limit(64 << 10):
            status = main(["--space", str(space)])
        message = r"storage path .*/studies/t cannot be written \(File too large\)"
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("error:") == 1
    assert "Traceback" not in stderr
    assert re.search(message, stderr), stderr
    assert "--storage-path" in stderr  # the fix
    assert not list(ray_tmp.iterdir()) and not ray.is_initialized()  # Ray never started
    assert not (tmp_path / "studies").exists() and not list(tmp_path.glob(".dsanet-write-probe*"))


# ---------------------------------------------------------------------------- atomic checkpoints


def _old_checkpoint(path: Path) -> dict:
    state = {"epoch": 1, "weights": torch.arange(1000.0)}
    torch.save(state, path)
    return state


def _same(a: dict, b: dict) -> bool:
    return a["epoch"] == b["epoch"] and torch.equal(a["weights"], b["weights"])


@pytest.mark.parametrize("had_one", [True, False], ids=["over-an-old-one", "first"])
def test_checkpoint_write_on_a_full_disk_leaves_the_old_file_or_nothing(tmp_path, had_one):
    """In-process: the 64 MB checkpoint never fits under a 1 MB file-size limit."""
    path = tmp_path / "last.pt"
    old = _old_checkpoint(path) if had_one else None
    state = {"epoch": 2, "weights": torch.ones(16 << 20)}
    with file_size_limit(1 << 20), pytest.raises(OSError) as raised:
        save_atomic(state, path)
    message = str(raised.value)
    assert f"could not write {path}" in message and "checkpoint is kept" in message
    if had_one:
        assert _same(load_checkpoint(path, torch.device("cpu")), old)
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["last.pt"] if had_one else [])


def _write_and_linger(state: dict, path: Path, started) -> None:
    """The writer process: say it starts, write the new checkpoint, then wait to be killed."""
    started.set()
    save_atomic(state, path)
    time.sleep(60)


def test_checkpoint_write_killed_midway_leaves_a_complete_file(tmp_path):
    """The writer is a fork of this process (torch is imported already), SIGKILLed while its
    temporary file is half written."""
    path = tmp_path / "last.pt"
    old = _old_checkpoint(path)
    new = {"epoch": 2, "weights": torch.ones(16 << 20)}  # 64 MB, made before the fork
    context = multiprocessing.get_context("fork")
    started = context.Event()
    writer = context.Process(target=_write_and_linger, args=(new, path, started), daemon=True)
    writer.start()
    try:
        assert started.wait(timeout=60)
        deadline = time.monotonic() + 60
        while not [p for p in tmp_path.glob(".last.pt.tmp-*") if p.stat().st_size > 0]:
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.001)
    finally:
        writer.kill()
        writer.join(timeout=30)
    assert writer.exitcode == -signal.SIGKILL
    # The kill cut the new file short; the checkpoint is still the old, complete one.
    (partial,) = tmp_path.glob(".last.pt.tmp-*")
    with pytest.raises(ValueError, match="not a torch.save file"):
        load_checkpoint(partial, torch.device("cpu"))
    assert _same(load_checkpoint(path, torch.device("cpu")), old)
