"""The one bridge from a Ray Tune trial to dsanet: sampled parameters -> config -> `fit`.

Each epoch is reported once with a checkpoint (hard links to the trainer's `last.pt`, `best.pt`
and `config.yaml`, plus the epoch count). Ray's checkpoint is the truth on a restart: the
trial's folder is reset to it (or emptied when there is none) before `fit(resume=True)`
continues, so a restart repeats at most the epoch Ray had not yet registered, and the searcher,
ASHA and the MLflow view each record an epoch once. Workers are reused between trials
(function trainables allow it when the last trial's thread ends within Ray's 2 s), keep the
memory-mapped feature cache open, run `resources.cpu` torch threads and cap a fractional GPU
share. Inside a trial only `ray.tune.report/get_checkpoint/get_context/Checkpoint` are used.
"""

from __future__ import annotations

import atexit
import filecmp
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback

from dsanet.config import ExperimentConfig
from dsanet.files import link_atomic, link_or_copy
from tune.layout import (
    PROGRESS_FILE,
    REPORTS_FILE,
    RUN_CONFIG,
    STAGE_DIR,
    STATE_FILES,
    StudyFolder,
    read_base,
)
from tune.searcher import OPTUNA_KEY, REPORTED_KEY
from tune.space import sampled_values

log = logging.getLogger(__name__)

STUDY_KEY = "_study"  # config key of the fixed study info: {"dir": study folder, "max_t": epochs}
_bundles: dict[str, Any] = {}  # data bundles kept by a reused worker: cache maps, lists
_running: set[threading.Thread] = set()  # training threads of this worker process


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one sampled config, reporting every epoch."""
    entered = time.time()
    from dsanet.trainer import fit  # torch stays out of the driver, which only schedules

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # per epoch
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():  # not in tests
        worker_logging()
    out_dir = StudyFolder(config[STUDY_KEY]["dir"]).trial_dir(tune.get_context().get_trial_id())
    cfg = read_trial_config(config, out_dir)
    resumed_at = _reset_to_checkpoint(out_dir)
    slimmed = resumed_at > 0 and not (out_dir / STATE_FILES[0]).is_file()
    if slimmed or resumed_at >= config[STUDY_KEY]["max_t"]:
        return  # it had finished, but a crash kept that from Ray's last snapshot
    gpu_share = _claim_resources()
    extras = {"out_dir": str(out_dir), "optuna_trial": config.get(OPTUNA_KEY, -1)}
    _running.add(threading.current_thread())
    try:
        reporter = _Reporter(out_dir, extras, resumed_at, entered)
        fit(cfg, reporter, resume=True, bundle=_bundle(cfg), test=False)  # test: final stage
    finally:
        shutil.rmtree(out_dir / STAGE_DIR, ignore_errors=True)
        # Ray's checkpoint holds the state now; the full-state copy here is 3x the weights.
        (out_dir / STATE_FILES[0]).unlink(missing_ok=True)
        _release(gpu_share)
        _running.discard(threading.current_thread())


def worker_logging() -> None:
    """This project's warnings in a worker, each once and in the driver's format.

    dsanet and tune get one stderr handler each and stop there: open_clip logs through the
    root logger (`logging.info`), which installs a root handler (`basicConfig`) in a process
    without one, so records went on through it or Python's last-resort handler, in two formats
    from one trial to the next. The random text-tower warnings are left to the plan
    (`quiet_random_weights`).
    """
    for name in ("dsanet", "tune"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_dsanet_worker", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler._dsanet_worker = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False
    quiet_random_weights()


def quiet_random_weights() -> None:
    """Drop the warnings that a model is built with a random text tower in this process: the
    driver's plan says it once for the study (`tune.plan.describe`), where every trial, seed
    and plot would repeat it. dsanet's comes from `dsanet.text`, open_clip's own repeat of it
    from the root logger; a logger's filter sees only the records logged on it."""
    for name in ("dsanet.text", ""):
        logger = logging.getLogger(name)
        if _said_in_the_plan not in logger.filters:
            logger.addFilter(_said_in_the_plan)


def _said_in_the_plan(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not message.startswith(("text.weights is empty", "No pretrained weights loaded"))


def read_trial_config(config: dict[str, Any], out_dir: Path) -> ExperimentConfig:
    """A Ray trial's config: its study's `base.yaml` (the folder in `config[STUDY_KEY]`) with
    the sampled values of `config` and `out_dir` as train.out_dir. The driver's counterpart,
    from the space's base, is `tune.space.trial_config`."""
    base = read_base(StudyFolder(config[STUDY_KEY]["dir"]))
    return base.with_overrides({**sampled_values(config), "train.out_dir": str(out_dir)})


class _Reporter:
    """fit's on_epoch_end: one `tune.report` per epoch with the trial folder's state."""

    def __init__(
        self, out_dir: Path, extras: dict[str, Any], resumed_at: int, entered: float
    ) -> None:
        self.out_dir, self.extras = out_dir, extras
        self.start = {"resumed_at": resumed_at, "entered": entered}

    def __call__(self, record: dict[str, float], out_dir: Path) -> bool:
        epoch, now = int(record["epoch"]), append_report(self.out_dir, record, self.start)
        metrics = {**record, "epoch": epoch, **self.extras, REPORTED_KEY: now}
        self.start = {}  # only the first report after a (re)start carries it
        stage = _stage(out_dir, epochs_done=epoch + 1)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(stage))
        return False  # the scheduler stops trials; fit runs to train.epochs otherwise


def append_report(out_dir: Path, record: dict[str, float], marks: dict | None = None) -> float:
    """Append one epoch's line to `out_dir/reports.jsonl` (a trial's or a final seed's: the
    MLflow view logs it, stamped with its time); return that time."""
    now = time.time()
    line = {
        "epoch": int(record["epoch"]),
        "pid": os.getpid(),
        "node": ray.util.get_node_ip_address() if ray.is_initialized() else "",  # which host
        "time": now,
        "seconds": record["seconds"],
        "resumed_at": -1,
        **(marks or {}),
        "metrics": record,
    }
    with open(out_dir / REPORTS_FILE, "a") as log_file:
        log_file.write(json.dumps(line) + "\n")
    return now


class SlimFinishedCheckpoints(Callback):
    """Disk hygiene when a trial ends: one copy of its weights instead of three.

    Drops `last.pt` (optimizer state included) from the trial's Ray checkpoint: only a running
    trial resumes from it; `best.pt`, `config.yaml` and the epoch count stay. A trial restored
    from such a checkpoint (Ray's snapshot lagging a crash) just ends. The trial folder's
    `best.pt`, a byte-identical copy of the checkpoint's, becomes a hard link to it (the MLflow
    view, after this callback, links its artifact to the same file where it can).
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        checkpoint = trial.checkpoint
        if checkpoint is None or not Path(checkpoint.path).is_dir():  # remote storage
            return
        saved = Path(checkpoint.path)
        (saved / STATE_FILES[0]).unlink(missing_ok=True)
        study = (trial.config or {}).get(STUDY_KEY) or {}
        if "dir" in study:
            out_dir = StudyFolder(study["dir"]).trial_dir(trial.trial_id)
            share_file(saved / STATE_FILES[1], out_dir / STATE_FILES[1])


def share_file(source: Path, copy: Path) -> bool:
    """Replace `copy` by a hard link to `source` when both hold the same bytes (True if done).

    Files here are written once (the trainer replaces its files atomically), so a shared inode
    never sees a change; on different filesystems, or with different bytes, nothing happens.
    """
    try:
        if copy.samefile(source):
            return True
        if not filecmp.cmp(source, copy, shallow=False):
            return False
    except OSError:  # either file missing
        return False
    return link_atomic(source, copy)


def _stage(out_dir: Path, epochs_done: int) -> Path:
    """A folder of hard links to the files a checkpoint needs (Ray copies it in report)."""
    stage = out_dir / STAGE_DIR
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    for name in (*STATE_FILES, RUN_CONFIG):
        if (out_dir / name).is_file():
            link_or_copy(out_dir / name, stage / name)
    (stage / PROGRESS_FILE).write_text(json.dumps({"epochs": epochs_done}))
    return stage


def _reset_to_checkpoint(out_dir: Path) -> int:
    """Make the trial folder hold exactly Ray's checkpoint; the epochs it had done (0: none).

    A folder left by a killed attempt may be ahead of what Ray recorded; resuming from it
    would skip reports that the scheduler, Optuna and MLflow never received.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        (out_dir / name).unlink(missing_ok=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        for name in STATE_FILES:
            if (Path(folder) / name).is_file():
                link_or_copy(Path(folder) / name, out_dir / name)
        done = json.loads((Path(folder) / PROGRESS_FILE).read_text())["epochs"]
    log.info("trial %s resumes from Ray's checkpoint after %d epochs", out_dir.name, done)
    return done


def _claim_resources() -> float:
    """Threads = the trial's CPUs; a fractional GPU caps this process's share of its memory."""
    import torch

    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    share = float(resources.get("GPU", 0.0))
    if 0 < share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share)  # the one device Ray made visible
    return share


def _release(gpu_share: float) -> None:
    if gpu_share > 0:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a reused worker hands the memory to the next trial


@atexit.register
def _join_trials() -> None:
    """Let a stopped trial's thread unwind before the worker exits.

    Ray stops a function trial by raising SystemExit in its training thread and, when the
    worker is not reused, exits the process without waiting; a thread still freeing tensors
    while Python 3.11 finalises aborts the process with a C++ stack trace.
    """
    for thread in list(_running):
        if thread is not threading.current_thread():
            thread.join(timeout=10)


def _bundle(cfg: ExperimentConfig) -> Any:
    """The trial's data: the memory-mapped cache the driver built, opened once per worker.

    No test split: trials select on the validation split, and only protocol reference (the
    official procedure, optimistic by construction) selects on the test set.
    """
    from dsanet.loading import load_data

    with_test = cfg.data.protocol == "reference"
    key = repr((cfg.data, cfg.model.visual_length, cfg.model.visual_width))
    if key not in _bundles:
        _bundles.clear()
        _bundles[key] = load_data(
            cfg.data, cfg.model.visual_length, cfg.model.visual_width, test=with_test
        )
    return _bundles[key]
