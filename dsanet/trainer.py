"""The training loop: epochs, evaluation and selection, atomic checkpoints, exact resume.

`fit(cfg, on_epoch_end)` is what both the CLI and each search trial run; the callback is the
only hook the search uses.
"""

from __future__ import annotations

import logging
import pickle
import random
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsanet.config import ConfigError, ExperimentConfig, flatten, from_dict, to_dict
from dsanet.data import epoch_batches, iterate_batches
from dsanet.errors import brief
from dsanet.evaluate import (
    VAL_AP,
    VAL_AUC,
    autocast,
    predict_test,
    test_metrics,
    validation_metrics,
)
from dsanet.files import json_text, remove_stale, replace_atomic, write_atomic
from dsanet.loading import DataBundle, load_data
from dsanet.losses import total_loss
from dsanet.metrics import AP, AUC, MAP_AVG
from dsanet.model import DSANet, parameter_groups
from dsanet.optim import build_optimizers
from dsanet.text import build_text_encoder
from dsanet.yamlio import load_yaml_file

log = logging.getLogger(__name__)

CHECKPOINT, BEST, RESULT, CONFIG = "last.pt", "best.pt", "result.json", "config.yaml"
# Fields that say where a run's files are or what runs it: they may differ between a run and its
# resume (data moved, another GPU). Every other field shapes the run's numbers.
RELOCATABLE = frozenset(
    {
        "data.list_dir",
        "data.feature_root",
        "data.test_feature_root",
        "data.cache_dir",
        "train.out_dir",
        "train.device",
    }
)
# What each select_metric means under each protocol: the held-out split or the test set.
_SELECT = {
    ("validation", "ap"): VAL_AP,
    ("validation", "auc"): VAL_AUC,
    ("reference", "ap"): f"test_{AP}",
    ("reference", "auc"): f"test_{AUC}",
    ("reference", "map_avg"): f"test_{MAP_AVG}",
}

EpochCallback = Callable[[dict[str, float], Path], Any]


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    select_metric: str
    history: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    out_dir: Path = Path(".")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device={name!r} but no CUDA device is visible; use train.device=cpu (or auto)"
        )
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def build_model(cfg: ExperimentConfig, bundle_spec, device: torch.device) -> DSANet:
    encoder = build_text_encoder(cfg.text, bundle_spec.prompts)
    return DSANet(cfg.model, cfg.loss, bundle_spec.num_classes, encoder).to(device)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`: a crash or a
    full disk leaves the previous file (or none), never a partial one."""
    try:
        replace_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports ENOSPC/EFBIG as a RuntimeError
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(
            f"could not write {path} ({str(exc).splitlines()[0]}; {free:.0f} MiB free there); "
            f"the previous checkpoint is kept. Free disk space or move train.out_dir (a study's "
            f"storage_path), then run again: it resumes from the previous checkpoint"
        ) from exc


def write_json_atomic(obj: Any, path: Path) -> None:
    """Strict JSON (`dsanet.files.json_text`): a metric without a finite value yet is null."""
    write_atomic(path, json_text(obj))


def read_run_config(path: Path) -> ExperimentConfig:
    """The `config.yaml` a run wrote next to its checkpoints."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a run folder holds the config.yaml that training wrote next to "
            f"its checkpoints"
        )
    return from_dict(load_yaml_file(path, ConfigError), str(path))


def check_same_run(cfg: ExperimentConfig, saved: ExperimentConfig | dict, source: Path) -> None:
    """Refuse to continue the run saved in `source` with another config (the fields that shape
    its numbers must match; `RELOCATABLE` ones may differ)."""
    fix = (
        "pass --restart to train from scratch with this config (the folder's checkpoints are "
        "replaced), or set another train.out_dir"
    )
    try:
        old = flatten(saved if isinstance(saved, ExperimentConfig) else from_dict(saved))
    except ConfigError as exc:
        raise ValueError(f"{source} holds a config this version cannot read; {fix}") from exc
    new = flatten(cfg)
    changed = [k for k, v in new.items() if k not in RELOCATABLE and old.get(k) != v]
    if changed:
        shown = "; ".join(f"{k} {brief(old.get(k))} -> {brief(new[k])}" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ValueError(f"{source.parent} holds a run of another config ({shown}{more}); {fix}")


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint this trainer wrote (tensors and plain values only: weights_only)."""
    fix = "point to the last.pt/best.pt of a run, or delete it (a run then starts from scratch)"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; junk trips the legacy reader
        raise ValueError(f"checkpoint {path} is not a torch.save file (truncated?); {fix}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        reason = str(exc).split(".")[0]
        raise ValueError(f"checkpoint {path} cannot be read ({reason}); {fix}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


class Trainer:
    """One run: model, optimisers and data, stepping through epochs with selection."""

    def __init__(
        self, cfg: ExperimentConfig, bundle: DataBundle | None = None, test: bool = True
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.out_dir = Path(cfg.train.out_dir).expanduser().resolve()
        # The test split is read only to test once at the end, or to select on under protocol
        # reference (the official procedure).
        self.bundle = bundle or load_data(
            cfg.data,
            cfg.model.visual_length,
            cfg.model.visual_width,
            test=test or cfg.data.protocol == "reference",
        )
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.model = build_model(cfg, self.bundle.spec, self.device)
        self.steps_per_epoch = len(self._batches(0))
        main, sgnm = parameter_groups(self.model)
        self.optim = build_optimizers(main, sgnm, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        # protocol 'final' selects nothing: the last epoch is the model.
        self.select_key = _SELECT.get((cfg.data.protocol, cfg.train.select_metric), "")
        self.epoch = 0  # next epoch to run
        self.best_metric = -float("inf")
        self.best_epoch = -1
        self.history: list[dict[str, float]] = []

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "model": self.model.trainable_state_dict(),
            "optim": self.optim.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_trainable_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.epoch, self.best_metric = state["epoch"], state["best_metric"]
        self.best_epoch, self.history = state["best_epoch"], list(state["history"])

    def resume(self, path: Path) -> None:
        """Continue the run checkpointed in `path`; its config must be this trainer's."""
        state = load_checkpoint(path, self.device)
        check_same_run(self.cfg, state.get("config") or {}, path)
        self.load_state_dict(state)
        log.info("resumed from %s at epoch %d", path, self.epoch)

    # -------------------------------------------------------------------- loop
    def _batches(self, epoch: int) -> list[np.ndarray]:
        b, t = self.bundle, self.cfg.train
        batches = epoch_batches(
            b.train_rows, b.train.targets, b.spec.sampling, t.batch_size, t.seed, epoch
        )
        return batches[: t.max_steps_per_epoch] if t.max_steps_per_epoch else batches

    def evaluate(self) -> dict[str, float]:
        """Selection metrics: the validation split, or the test set under protocol reference."""
        t = self.cfg.train
        if self.cfg.data.protocol == "final":
            return {}
        if self.cfg.data.protocol == "reference":
            preds = predict_test(self.model, self.bundle.test, self.device, t.precision)
            scores = {
                f"test_{k}": v for k, v in test_metrics(preds, self.bundle, self.cfg.eval).items()
            }
        else:
            scores = validation_metrics(
                self.model,
                self.bundle,
                self.device,
                t.batch_size,
                self.cfg.loss.topk_divisor,
                t.precision,
            )
        self.model.train()
        return scores

    def _maybe_select(self, scores: dict[str, float]) -> None:
        if not self.select_key:
            return
        value = scores[self.select_key]
        if np.isfinite(value) and value > self.best_metric:
            self.best_metric, self.best_epoch = value, self.epoch
            save_atomic(self.model.trainable_state_dict(), self.out_dir / BEST)

    def run_epoch(self) -> dict[str, float]:
        t = self.cfg.train
        self.model.train()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        scores: dict[str, float] = {}
        batches = self._batches(self.epoch)
        train = self.bundle.train
        progress = _progress(len(batches), f"epoch {self.epoch}")
        for step, batch in enumerate(
            iterate_batches(train.features, train.lengths, train.targets, batches)
        ):
            features = torch.from_numpy(batch.features).to(self.device, non_blocking=True)
            lengths = torch.from_numpy(batch.lengths).to(self.device)
            targets = torch.from_numpy(batch.targets).to(self.device)
            with autocast(self.device, t.precision):
                out = self.model(features, lengths)
                loss, terms = total_loss(out, targets, lengths, self.cfg.loss)
            self.optim.zero_grad()
            loss.backward()
            self.optim.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            progress(step + 1)
            if t.eval_every and step > 0 and step % t.eval_every == 0:
                scores = self.evaluate()
                self._maybe_select(scores)
        self.optim.epoch_end()
        if not t.eval_every:
            scores = self.evaluate()
            self._maybe_select(scores)
        record = {
            "epoch": float(self.epoch),
            "seconds": time.perf_counter() - start,
            **{f"loss_{k}": v / max(1, len(batches)) for k, v in sums.items()},
            **scores,
        }
        if self.select_key:
            record["best_" + self.select_key] = self.best_metric
        self.history.append(record)
        if t.reload_best_each_epoch and (self.out_dir / BEST).is_file():  # Q-O1
            self.model.load_trainable_state_dict(load_checkpoint(self.out_dir / BEST, self.device))
        self.epoch += 1
        save_atomic(self.state_dict(), self.out_dir / CHECKPOINT)
        return record

    def final_test(self) -> dict[str, float]:
        """Load the selected weights and evaluate on the test set once."""
        assert self.bundle.test is not None, "the data were loaded without the test split"
        if (self.out_dir / BEST).is_file():
            self.model.load_trainable_state_dict(load_checkpoint(self.out_dir / BEST, self.device))
        preds = predict_test(self.model, self.bundle.test, self.device, self.cfg.train.precision)
        return test_metrics(preds, self.bundle, self.cfg.eval)


def fit(
    cfg: ExperimentConfig,
    on_epoch_end: EpochCallback | None = None,
    resume: bool = True,
    bundle: DataBundle | None = None,
    test: bool = True,
) -> FitResult:
    """Train, select the best epoch on the selection metric, evaluate it on the test set once.

    With `resume`, a checkpoint in `cfg.train.out_dir` is continued exactly. `on_epoch_end`
    gets each epoch's record and the folder holding its checkpoint; a truthy return stops.
    Without `test` there is no test pass (a search's trials): `FitResult.test` and result.json
    hold no test metric, and the test split is not even read unless protocol reference selects
    on it.
    """
    trainer = Trainer(cfg, bundle, test)
    out = trainer.out_dir
    # Everything is checked before anything in the folder changes: a refused resume leaves the
    # run's files as they were.
    if resume and (out / CHECKPOINT).is_file():
        trainer.resume(out / CHECKPOINT)
    elif resume and (out / CONFIG).is_file():  # a run with no checkpoint (yet, or any more)
        check_same_run(cfg, read_run_config(out / CONFIG), out / CONFIG)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # files of a run killed mid-write (one run owns a folder)
    write_atomic(out / CONFIG, cfg.to_yaml())
    while trainer.epoch < cfg.train.epochs:
        record = trainer.run_epoch()
        log.info(
            "epoch %d  %s",
            int(record["epoch"]),
            "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"),
        )
        if on_epoch_end is not None and on_epoch_end(record, out):
            break
    if not trainer.select_key:  # protocol final: the last epoch is the model
        save_atomic(trainer.model.trainable_state_dict(), out / BEST)
    scores = trainer.final_test() if test else {}
    result = FitResult(
        trainer.best_epoch, trainer.best_metric, trainer.select_key, trainer.history, scores, out
    )
    summary = {
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "select_metric": result.select_metric,
        **({"test": scores} if test else {}),
        "history": trainer.history,
    }
    write_json_atomic(summary, out / RESULT)
    log.info(
        "best epoch %d (%s=%.4f)%s",
        result.best_epoch,
        result.select_metric,
        result.best_metric,
        "; test " + "  ".join(f"{k}={v:.4f}" for k, v in scores.items()) if test else "",
    )
    return result


def _progress(total: int, label: str) -> Callable[[int], None]:
    """A one-line progress bar on a terminal; silent otherwise (logs, Ray workers)."""
    if not sys.stderr.isatty() or total < 20:
        return lambda done: None

    def show(done: int) -> None:
        filled = int(30 * done / total)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\r" + " " * (45 + len(label)) + "\r")
        sys.stderr.flush()

    return show
