"""The one bridge from a Ray Tune trial to dsanet: sampled parameters -> config -> `fit`.

A trial trains in `trials/<optuna number>/` and resumes from that folder's `last.pt`, whichever
Ray trial runs it and on whichever host: a retry after a lost worker or node, and a `--resume`
after a lost driver, both carry on where the folder is (a cluster shares the study folder).
Ray holds no checkpoint and no state of ours. On a (re)start the trainable first reports again
each epoch that `last.pt` holds (`_Reporter.replay`); the searcher, ASHA and the MLflow view
keep the first report of an epoch and ignore repeats, so an epoch trained but never received by
the driver (a kill between the checkpoint and its report) is recorded once, and no epoch is
trained twice. Workers are reused between trials (function trainables allow it when the last
trial's thread ends within Ray's 2 s), keep the memory-mapped feature cache open, run
`resources.cpu` torch threads and cap a fractional GPU share. Inside a trial only
`ray.tune.report/get_context` are used.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from dsanet.config import ExperimentConfig
from tune.layout import REPORTS_FILE, STATE_FILES, StudyFolder, read_base
from tune.searcher import OPTUNA_KEY, REPORTED_KEY, STEP_KEY
from tune.space import sampled_values

log = logging.getLogger(__name__)

STUDY_KEY = "_study"  # config key of the fixed study info: {"dir": study folder, "max_t": epochs}
_bundles: dict[str, Any] = {}  # data bundles kept by a reused worker: cache maps, lists
_running: set[threading.Thread] = set()  # training threads of this worker process


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one sampled config, reporting every epoch."""
    entered = time.time()
    from dsanet.trainer import fit  # torch stays out of the driver, which only schedules

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():  # not in tests
        worker_logging()
    number, folder = config[OPTUNA_KEY], StudyFolder(config[STUDY_KEY]["dir"])
    if not folder.base_yaml.is_file():  # the driver wrote it before Ray started
        raise FileNotFoundError(
            f"the study folder {folder.root} is not visible on this node ({_node() or 'local'}): "
            f"on a cluster, storage_path must be a shared file system mounted at the same path "
            f"on every node"
        )
    out_dir = folder.trial_dir(number)
    cfg = read_trial_config(config, out_dir)
    reporter = _Reporter(out_dir, {"out_dir": str(out_dir), "optuna_trial": number}, entered)
    if reporter.replay() >= config[STUDY_KEY]["max_t"]:
        return  # it had finished, but the driver that ran it ended before it was told
    gpu_share = _claim_resources()
    _running.add(threading.current_thread())
    try:
        fit(cfg, reporter, resume=True, bundle=_bundle(cfg), test=False)  # test: final stage
    finally:
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
    """fit's on_epoch_end: each epoch goes to the trial's reports.jsonl, then to Ray."""

    def __init__(self, out_dir: Path, extras: dict[str, Any], entered: float) -> None:
        self.out_dir, self.extras, self.entered = out_dir, extras, entered
        self.first = True  # the first line this (re)start writes carries its marks

    def __call__(self, record: dict[str, float], out_dir: Path) -> bool:
        self._report(record, None)
        return False  # the scheduler stops trials; fit runs to train.epochs otherwise

    def replay(self) -> int:
        """Report again every epoch the folder's `last.pt` holds, each with the time of its
        line in reports.jsonl (a line is written for an epoch that has none); return how many
        epochs that is (0 for a new trial)."""
        path = self.out_dir / STATE_FILES[0]
        if not path.is_file():
            return 0
        import torch

        from dsanet.trainer import load_checkpoint

        history = load_checkpoint(path, torch.device("cpu"))["history"]
        written = {line["epoch"]: line["time"] for line in report_lines(self.out_dir)}
        for record in history:
            self._report(record, written.get(int(record["epoch"])))
        log.info("trial %s resumes from its last.pt after %d epochs", self.out_dir, len(history))
        return len(history)

    def _report(self, record: dict[str, float], written_at: float | None) -> None:
        epoch = int(record["epoch"])
        if written_at is None:
            marks = {"resumed_at": epoch, "entered": self.entered} if self.first else None
            written_at, self.first = append_report(self.out_dir, record, marks), False
        tune.report(
            {**record, "epoch": epoch, STEP_KEY: epoch + 1, **self.extras, REPORTED_KEY: written_at}
        )


def append_report(out_dir: Path, record: dict[str, float], marks: dict | None = None) -> float:
    """Append one epoch's line to `out_dir/reports.jsonl` (a trial's or a final seed's: the
    MLflow view logs it, stamped with its time); return that time."""
    now = time.time()
    line = {
        "epoch": int(record["epoch"]),
        "pid": os.getpid(),
        "node": _node(),  # which host trained it
        "time": now,
        "seconds": record["seconds"],
        "resumed_at": -1,
        **(marks or {}),
        "metrics": record,
    }
    with open(out_dir / REPORTS_FILE, "a") as log_file:
        log_file.write(json.dumps(line) + "\n")
    return now


def _node() -> str:
    """This process's Ray node IP ("" outside Ray)."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else ""


def report_lines(folder: Path) -> list[dict[str, Any]]:
    """The lines of `folder/reports.jsonl` (`append_report`) with an int `epoch`, a float
    `time` and a dict of `metrics`, in the order written; damaged lines are skipped."""
    lines, path = [], folder / REPORTS_FILE
    if path.is_file():
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                line = json.loads(text)
                line.update(epoch=int(line["epoch"]), time=float(line["time"]))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            if isinstance(line["metrics"], dict):
                lines.append(line)
    return lines


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
