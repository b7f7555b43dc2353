"""Optimisers and learning-rate schedules (DESIGN §4): AdamW + per-epoch cosine for the main group,
StableAdamW + per-iteration warm cosine for the SG-NM group, bundled behind one step/state API.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR

from dsanet.config import OptimConfig

logger = logging.getLogger(__name__)


class StableAdamW(torch.optim.Optimizer):
    """AdamW with AMSGrad and per-tensor update clipping, as used for SG-NM by DSANet.

    Per parameter tensor and step t (matching the reference `utils/StableAdamW.py`):
      p ← p·(1 − lr·wd)                                   (decoupled, scheduled lr, never clipped)
      m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;  v_max ← max(v_max, v)
      denom = √v_max / √(1 − β2^t) + eps                  (eps outside the root)
      ρ = ‖g / denom‖₂ / √numel                           (RMS of the raw gradient, not of m)
      p ← p − lr / (1 − β1^t) / max(1, ρ / clip) · m / denom
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-10,
        weight_decay: float = 1e-4,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        checks = {
            "lr": (lr, lr >= 0.0, ">= 0"),
            "eps": (eps, eps >= 0.0, ">= 0"),
            "betas": (betas, all(0.0 <= b < 1.0 for b in betas), "each in [0, 1)"),
            "weight_decay": (weight_decay, weight_decay >= 0.0, ">= 0"),
            "clip_threshold": (clip_threshold, clip_threshold > 0.0, "> 0"),
        }
        for name, (value, ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"StableAdamW: {name}={value!r} must be {allowed}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            clip_threshold=clip_threshold,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise ValueError("StableAdamW does not support sparse gradients; use dense ones")
        lr, (beta1, beta2) = group["lr"], group["betas"]
        state = self.state[p]
        if not state:
            # Key names and the Python-int step follow the reference, so its states load here.
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

        p.mul_(1.0 - lr * group["weight_decay"])  # decay first, as in the reference
        state["step"] += 1
        t = state["step"]
        exp_avg, second = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if group["amsgrad"]:
            second = torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
        denom = (second.sqrt() / math.sqrt(1.0 - beta2**t)).add_(group["eps"])
        ratio = grad / denom
        rms = torch.linalg.vector_norm(ratio) / grad.numel() ** 0.5
        # The step size stays a 0-dim device tensor (the reference syncs via Python's max), and
        # is rounded in the reference's order, so CPU results match it bit for bit.
        step_size = torch.clamp(rms / group["clip_threshold"], min=1.0).reciprocal_()
        step_size.mul_(-lr / (1.0 - beta1**t))
        p.add_(torch.mul(exp_avg, step_size, out=ratio).div_(denom))


def warm_cosine_schedule(
    base_lr: float, total_steps: int, warmup: int = 100, floor: float = 0.1
) -> np.ndarray:
    """Per-iteration lr for iterations 0 … total_steps − 1 (the reference `WarmCosineScheduler`).

    Warm-up `linspace(0, lr, warmup)` starts at 0 (Q-O3: the first update has lr 0) and reaches
    lr at index warmup − 1; then `f·lr + ½(lr − f·lr)(1 + cos(πi/(N − warmup)))`, f = floor, for
    i = 0 … N − warmup − 1. Iterations ≥ N = total_steps use f·lr (see `lr_at`).
    """
    if total_steps < 1 or warmup < 0:
        raise ValueError(
            f"warm_cosine_schedule: total_steps={total_steps} must be >= 1 and warmup={warmup} >= 0"
        )
    final = base_lr * floor
    ramp = np.linspace(0.0, base_lr, warmup)
    i = np.arange(max(total_steps - warmup, 0))
    cosine = final + 0.5 * (base_lr - final) * (1.0 + np.cos(np.pi * i / max(len(i), 1)))
    # With total_steps < warmup the reference keeps the whole ramp but never indexes past N.
    return np.concatenate([ramp, cosine])[:total_steps]


class WarmCosineScheduler:
    """Sets every group's lr to `schedule[iteration]`; call `step()` once after each update."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        total_steps: int,
        warmup: int = 100,
        floor: float = 0.1,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr, self.floor = base_lr, floor
        self.total_steps, self.warmup = total_steps, warmup
        self.iteration = 0
        self._rebuild()

    def _rebuild(self) -> None:
        self.schedule = warm_cosine_schedule(
            self.base_lr, self.total_steps, self.warmup, self.floor
        )
        self._apply()

    def lr_at(self, iteration: int) -> float:
        if iteration >= self.total_steps:
            return self.base_lr * self.floor
        return float(self.schedule[iteration])

    def _apply(self) -> None:
        lr = self.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup": self.warmup,
            "floor": self.floor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter and schedule shape, then set the groups' lr for that iteration."""
        missing = sorted({"iteration", "base_lr", "total_steps", "warmup", "floor"} - set(state))
        if missing:
            raise KeyError(
                f"WarmCosineScheduler state lacks {missing}; was it saved by another scheduler?"
            )
        self.iteration = int(state["iteration"])
        self.base_lr, self.floor = float(state["base_lr"]), float(state["floor"])
        self.total_steps, self.warmup = int(state["total_steps"]), int(state["warmup"])
        self._rebuild()


@dataclass
class Optimizers:
    """Both parameter groups' optimisers and schedulers. `sgnm` is None when there is no SG-NM
    optimiser (SG-NM off, or the single-AdamW "multistep" mode)."""

    main: torch.optim.Optimizer
    main_scheduler: LRScheduler
    sgnm: StableAdamW | None = None
    sgnm_scheduler: WarmCosineScheduler | None = None

    @property
    def has_sgnm(self) -> bool:
        return self.sgnm is not None and self.sgnm_scheduler is not None

    def zero_grad(self) -> None:
        self.main.zero_grad()
        if self.sgnm is not None:
            self.sgnm.zero_grad()

    def step(self) -> None:
        """After backward: main step, SG-NM step, SG-NM scheduler step (DESIGN §4 order)."""
        self.main.step()
        if self.has_sgnm:
            self.sgnm.step()
            self.sgnm_scheduler.step()

    def epoch_end(self) -> None:
        self.main_scheduler.step()

    def lrs(self) -> dict[str, float]:
        """Current learning rates, for logging."""
        out = {"main": float(self.main.param_groups[0]["lr"])}
        if self.sgnm is not None:
            out["sgnm"] = float(self.sgnm.param_groups[0]["lr"])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "main_scheduler": self.main_scheduler.state_dict(),
            "sgnm": self.sgnm.state_dict() if self.has_sgnm else None,
            "sgnm_scheduler": self.sgnm_scheduler.state_dict() if self.has_sgnm else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore all four states; optimisers before schedulers so the lr ends up scheduled."""
        saved = state.get("sgnm") is not None
        if saved != self.has_sgnm:
            raise ValueError(
                f"optimiser state {'has' if saved else 'lacks'} an SG-NM optimiser but this run "
                f"{'has' if self.has_sgnm else 'lacks'} one; resume with the same "
                f"model.use_sgnm and optim.schedule as the saved run"
            )
        self.main.load_state_dict(state["main"])
        self.main_scheduler.load_state_dict(state["main_scheduler"])
        if self.has_sgnm:
            self.sgnm.load_state_dict(state["sgnm"])
            self.sgnm_scheduler.load_state_dict(state["sgnm_scheduler"])


def build_optimizers(
    main_params: Iterable[nn.Parameter],
    sgnm_params: Iterable[nn.Parameter],
    cfg: OptimConfig,
    steps_per_epoch: int,
    epochs: int,
) -> Optimizers:
    """Build the DESIGN §4 optimisers.

    "cosine+warmcosine": AdamW(lr, wd) + CosineAnnealingLR(T_max=epochs) stepped per epoch for
    the main group; StableAdamW + warm cosine over epochs × steps iterations for SG-NM, where
    steps is `cfg.sgnm_schedule_steps_per_epoch` if set (Q-O2: UCF's 251), else `steps_per_epoch`.
    "multistep" (VadCLIP-like): one AdamW over all parameters with MultiStepLR, no StableAdamW.
    """
    main, sgnm = list(main_params), list(sgnm_params)
    if steps_per_epoch < 1 or epochs < 1 or cfg.sgnm_schedule_steps_per_epoch < 0:
        raise ValueError(
            f"build_optimizers: steps_per_epoch={steps_per_epoch} and epochs={epochs} "
            f"must be >= 1, optim.sgnm_schedule_steps_per_epoch="
            f"{cfg.sgnm_schedule_steps_per_epoch} >= 0"
        )
    if cfg.schedule == "multistep":
        params = main + sgnm
        _require(params, "any group")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
        logger.info("optim: one AdamW (lr %g) for all, MultiStepLR %s", cfg.lr, cfg.milestones)
        return Optimizers(optimizer, scheduler)

    _require(main, "the main group")
    optimizer = torch.optim.AdamW(main, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Optimizers(optimizer, CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0))
    logger.info("optim: AdamW (lr %g), cosine over %d epochs", cfg.lr, epochs)
    if not sgnm:
        return out
    sgnm_lr = cfg.sgnm_lr or cfg.lr
    total = epochs * (cfg.sgnm_schedule_steps_per_epoch or steps_per_epoch)
    out.sgnm = StableAdamW(
        sgnm,
        lr=sgnm_lr,
        eps=cfg.sgnm_eps,
        weight_decay=cfg.sgnm_weight_decay,
        clip_threshold=cfg.sgnm_clip,
    )
    out.sgnm_scheduler = WarmCosineScheduler(
        out.sgnm, sgnm_lr, total, cfg.sgnm_warmup, cfg.sgnm_floor
    )
    logger.info("optim: SG-NM StableAdamW (lr %g), warm cosine over %d steps", sgnm_lr, total)
    return out


def _require(params: list[nn.Parameter], where: str) -> None:
    if not params:
        raise ValueError(
            f"build_optimizers: no trainable parameters in {where}; check which modules are frozen"
        )
