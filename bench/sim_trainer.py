"""A simulated `dsanet.trainer.fit` for bench/bench_scale.py: the trainer's contract, no model.

Each epoch sleeps 10-100 ms and reports a value from a seeded learning curve that depends on
the sampled parameters, so ASHA and TPE have something to decide. `install()` is the Ray
workers' setup hook: `tune.trainable.run_trial` imports `fit` from `dsanet.trainer` when it
runs, so it gets this one. The stock-Ray leg of the benchmark calls `curve` directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

# The searched fields of search_spaces/demo.yaml, as dotted names.
PARAMS = (
    "optim.lr",
    "model.num_prototypes",
    "model.normal_ratio",
    "text.adapt_layers",
    "text.adapter_weight",
    "loss.w_align",
)


def install() -> None:
    """Ray's worker_process_setup_hook: make `dsanet.trainer.fit` the simulated one."""
    import dsanet.trainer

    dsanet.trainer.fit = fit


def quality(values: dict[str, Any]) -> float:
    """How good a configuration is, in (0, 1]: smooth in each parameter, best near the middle."""
    lr = math.log10(float(values["optim.lr"]))
    q = math.exp(-(((lr + 3.5) / 0.6) ** 2))  # best lr 3e-4
    q *= 0.7 + 0.3 * math.exp(-(((float(values["model.normal_ratio"]) - 0.8) / 0.15) ** 2))
    q *= 0.85 + 0.05 * int(values["text.adapt_layers"])
    q *= 0.9 + 0.1 * (int(values["model.num_prototypes"]) == 8)
    q *= 0.8 + 0.2 * math.exp(-(((float(values["text.adapter_weight"]) - 0.3) / 0.3) ** 2))
    q *= 0.8 + 0.2 * math.exp(-(((math.log10(float(values["loss.w_align"])) - 0.3) / 0.5) ** 2))
    return max(q, 1e-3)


def curve(values: dict[str, Any], epoch: int) -> tuple[float, float]:
    """(val_ap, seconds to sleep) of `epoch` (0-based) for these values; seeded by them."""
    key = json.dumps([str(values[p]) for p in PARAMS]) + f"/{epoch}"
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    ap = 0.5 + 0.45 * quality(values) * (1 - math.exp(-(epoch + 1) / 1.5))
    return min(1.0, ap + rng.gauss(0.0, 0.01)), 0.010 + 0.090 * rng.random()


def epoch_record(values: dict[str, Any], epoch: int, best: float) -> tuple[dict[str, float], float]:
    """Sleep through one simulated epoch; its record (keys as the real trainer's) and val_ap."""
    ap, pause = curve(values, epoch)
    start = time.perf_counter()
    time.sleep(pause)
    record = {
        "epoch": float(epoch),
        "seconds": time.perf_counter() - start,
        "loss_total": 1.0 / (epoch + 1),
        "loss_bce": 0.7 / (epoch + 1),
        "loss_align": 0.3 / (epoch + 1),
        "val_ap": ap,
        "val_auc": min(1.0, ap + 0.05),
        "val_class_acc": ap - 0.1,
        "best_val_ap": max(best, ap),
    }
    return record, ap


def fit(cfg: Any, on_epoch_end: Any = None, resume: bool = True, bundle: Any = None,
        test: bool = True) -> dict[str, Any]:  # fmt: skip
    """dsanet.trainer.fit's contract as a search trial uses it: config.yaml, last.pt (a torch
    file with the epochs' `history`, which a restarted trial reports again) and best.pt in
    cfg.train.out_dir (small files), resume from last.pt, one `on_epoch_end(record,
    out_dir)` per epoch (a truthy return stops), result.json at the end."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = {p: _field(cfg, p) for p in PARAMS}
    state = {"epoch": 0, "best_metric": -math.inf, "best_epoch": -1, "history": []}
    if resume and (out / "last.pt").is_file():  # a torch file, as the trainable reads it
        state = torch.load(out / "last.pt", weights_only=True)
    _write(out / "config.yaml", cfg.to_yaml().encode())
    while state["epoch"] < cfg.train.epochs:
        epoch = state["epoch"]
        record, ap = epoch_record(values, epoch, state["best_metric"])
        if ap > state["best_metric"]:
            state.update(best_metric=ap, best_epoch=epoch)
            _write(out / "best.pt", json.dumps({"weights": epoch}).encode())
        state["history"].append(record)
        state["epoch"] = epoch + 1
        buffer = io.BytesIO()
        torch.save(state, buffer)  # tensors-free: {"history": [...], ...}
        _write(out / "last.pt", buffer.getvalue())
        if on_epoch_end is not None and on_epoch_end(record, out):
            break
    summary = {
        "best_epoch": state["best_epoch"],
        "best_metric": state["best_metric"],
        "select_metric": "val_ap",
        "history": state["history"],
    }
    _write(out / "result.json", json.dumps(summary).encode())
    return summary


def _field(cfg: Any, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _write(path: Path, data: bytes) -> None:
    """Replace the file whole, as the trainer does (the trainable hard-links these files)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
