"""Load a finished run for evaluation: its config, data and model with the selected weights.

Apart from `dsanet.evaluate` because it builds models through `dsanet.trainer`, which imports
`dsanet.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dsanet import evaluate
from dsanet.config import ExperimentConfig
from dsanet.loading import DataBundle, load_data
from dsanet.model import DSANet
from dsanet.trainer import (
    BEST,
    CHECKPOINT,
    CONFIG,
    build_model,
    load_checkpoint,
    read_run_config,
    resolve_device,
    seed_everything,
)


@dataclass(frozen=True)
class LoadedRun:
    """A run ready to evaluate: `model` holds the weights of `checkpoint`, in eval mode."""

    cfg: ExperimentConfig
    model: DSANet
    bundle: DataBundle  # without the test split when loaded for split "val"
    device: torch.device
    checkpoint: Path

    def predict_test(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per test video: (ℓ1 (T_v, 1), ℓ2 (T_v, C)), as the run's own test pass."""
        return evaluate.predict_test(
            self.model, self.bundle.test, self.device, self.cfg.train.precision
        )

    def test_metrics(self) -> dict[str, float]:
        """The run's test metrics (`dsanet.metrics.metric_keys`), recomputed."""
        return evaluate.test_metrics(self.predict_test(), self.bundle, self.cfg.eval)

    def validation_metrics(self) -> dict[str, float]:
        """Video-level scores on the held-out training videos (protocol validation only)."""
        t = self.cfg.train
        divisor = self.cfg.loss.topk_divisor
        return evaluate.validation_metrics(
            self.model, self.bundle, self.device, t.batch_size, divisor, t.precision
        )


def load_run(
    path: str | Path,
    overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
    split: Literal["test", "val"] = "test",
) -> LoadedRun:
    """The run in folder `path` (its best.pt; under protocol final, last.pt's model when best.pt
    is missing) or the run of checkpoint file `path` (best.pt or last.pt), with `overrides`
    applied to its config.yaml (e.g. moved data folders).

    `device` defaults to the run's train.device. With split "val" the run must have held out
    validation videos, and the test split is not read. Seeds torch, numpy and random with
    train.seed first, as training did, so that a random frozen text tower is rebuilt the same.
    """
    checkpoint, config_file = _run_files(Path(path))
    cfg = read_run_config(config_file)
    if split == "val" and cfg.data.protocol != "validation":
        raise ValueError(
            f"--split val: {config_file} trained under data.protocol={cfg.data.protocol}, on "
            f"every training video, so the run has no held-out validation videos; use --split "
            f"test"
        )
    if overrides:
        cfg = cfg.with_overrides(list(overrides))
        if split == "val" and cfg.data.protocol != "validation":
            raise ValueError("--split val needs data.protocol=validation; drop that override")
    device = resolve_device(cfg.train.device if device is None else str(device))
    state = load_checkpoint(checkpoint, device)  # a broken file fails before the data is read
    bundle = load_data(cfg.data, cfg.model.visual_length, cfg.model.visual_width, split == "test")
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # as `Trainer` builds its model
    model = build_model(cfg, bundle.spec, device)
    model.load_trainable_state_dict(state.get("model", state))  # last.pt holds more than weights
    model.eval()
    return LoadedRun(cfg, model, bundle, device, checkpoint)


def _run_files(path: Path) -> tuple[Path, Path]:
    """(weights file, config.yaml) of a run folder or of a checkpoint file in one."""
    if path.is_file():
        return path, path.parent / CONFIG
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} not found; runs write last.pt and best.pt into train.out_dir "
            f"(pass one of them, or that folder)"
        )
    if (path / BEST).is_file():
        return path / BEST, path / CONFIG
    protocol = read_run_config(path / CONFIG).data.protocol
    if protocol == "final" and (path / CHECKPOINT).is_file():
        return path / CHECKPOINT, path / CONFIG
    if protocol == "final":
        fix = "pass the folder of a run that finished at least one epoch"
    else:
        fix = (
            f"under data.protocol={protocol} best.pt holds the selected epoch and no epoch was "
            f"selected yet (no finite selection metric); train on, or pass {CHECKPOINT} itself "
            f"to evaluate the last epoch"
        )
    raise FileNotFoundError(f"{path} holds no {BEST}; {fix}")
