"""Tests for dsanet.optim: schedule invariants (DESIGN §11), StableAdamW vs a naive loop, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dsanet.config import OptimConfig
from dsanet.optim import (
    Optimizers,
    StableAdamW,
    WarmCosineScheduler,
    build_optimizers,
    warm_cosine_schedule,
)

# ---------------------------------------------------------------------------- schedules


def test_main_cosine_factors_per_epoch() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opts = build_optimizers([p], [], OptimConfig(lr=1.0), steps_per_epoch=3, epochs=10)
    factors = []
    for _ in range(10):
        factors.append(opts.lrs()["main"])
        opts.step()  # no gradients: nothing moves, but the scheduler sees a prior step
        opts.epoch_end()
    expected = [1, 0.976, 0.905, 0.794, 0.655, 0.5, 0.345, 0.206, 0.095, 0.024]
    np.testing.assert_allclose(factors, expected, atol=5e-4)


def test_xd_warm_cosine_invariants() -> None:
    lr = 1e-5
    s = warm_cosine_schedule(lr, 10 * 412)
    assert len(s) == 4120
    assert s[0] == 0.0
    assert s[1] == pytest.approx(lr / 99, rel=1e-12)
    assert s[99] == pytest.approx(lr, rel=1e-12)
    assert s[100] == pytest.approx(lr, rel=1e-12)
    assert s[4119] == pytest.approx(0.1 * lr, rel=1e-5)
    assert np.all(np.diff(s[100:]) <= 0)


def test_ucf_schedule_formula_reproduces_q_o2() -> None:
    lr = 7e-5
    cfg = OptimConfig(lr=lr, sgnm_schedule_steps_per_epoch=251)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opts = build_optimizers([p], [q], cfg, steps_per_epoch=125, epochs=10)
    assert opts.sgnm_scheduler is not None
    assert opts.sgnm_scheduler.total_steps == 2510
    # 10 epochs x 125 real steps end at index 1249, far above the floor.
    assert opts.sgnm_scheduler.lr_at(1249) == pytest.approx(0.5828 * lr, rel=1e-4)


def test_scheduler_past_end_and_short_schedule() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = StableAdamW([p], lr=1.0)
    sched = WarmCosineScheduler(opt, 2.0, total_steps=5, warmup=10, floor=0.1)
    assert len(sched.schedule) == 5
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(lrs[:5], np.linspace(0.0, 2.0, 10)[:5])
    assert lrs[5:] == [pytest.approx(0.2), pytest.approx(0.2)]


def test_first_sgnm_update_has_lr_zero() -> None:
    # Q-O3: the warm-up starts at 0, so the very first SG-NM step (decay included) is a no-op.
    main, sgnm = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opts = build_optimizers([main], [sgnm], OptimConfig(lr=0.1), steps_per_epoch=4, epochs=2)
    opts.zero_grad()
    (main.sum() + sgnm.sum()).backward()
    opts.step()
    assert torch.equal(sgnm.detach(), torch.ones(3))
    assert not torch.equal(main.detach(), torch.ones(3))
    assert opts.lrs()["sgnm"] == pytest.approx(0.1 / 99)


# ---------------------------------------------------------------------------- StableAdamW


def naive_stable_adamw(
    values: list[list[float]],
    grads: list[list[list[float]]],
    lrs: list[float],
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
    clip: float,
) -> tuple[list[list[float]], list[float]]:
    """Scalar re-statement of DESIGN §4 per tensor. Returns final values and every ρ seen."""
    values = [list(v) for v in values]
    m = [[0.0] * len(v) for v in values]
    v2 = [[0.0] * len(v) for v in values]
    vmax = [[0.0] * len(v) for v in values]
    rhos = []
    for t, (lr, step_grads) in enumerate(zip(lrs, grads, strict=True), start=1):
        for k, g in enumerate(step_grads):
            n = len(g)
            denom = []
            for j in range(n):
                values[k][j] *= 1 - lr * wd
                m[k][j] = beta1 * m[k][j] + (1 - beta1) * g[j]
                v2[k][j] = beta2 * v2[k][j] + (1 - beta2) * g[j] ** 2
                vmax[k][j] = max(vmax[k][j], v2[k][j])
                denom.append(math.sqrt(vmax[k][j]) / math.sqrt(1 - beta2**t) + eps)
            rho = math.sqrt(sum((g[j] / denom[j]) ** 2 for j in range(n)) / n)
            rhos.append(rho)
            step = lr / (1 - beta1**t) / max(1.0, rho / clip)
            for j in range(n):
                values[k][j] -= step * m[k][j] / denom[j]
    return values, rhos


def test_stable_adamw_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes
    ]
    start = [p.detach().flatten().tolist() for p in params]
    # Small gradients, then a 100x spike (ρ > 1 → clipping), then decaying ones (AMSGrad max).
    scales = [1e-3, 1e-3, 2e-3, 1e-3, 1e-1, 1e-3, 5e-4, 1e-2]
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64) * sc for s in shapes] for sc in scales
    ]
    lrs = [0.0, 0.01, 0.02, 0.05, 0.05, 0.03, 0.02, 0.01]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-10, wd=0.5, clip=1.0)

    opt = StableAdamW(
        params, lr=1.0, eps=hyper["eps"], weight_decay=hyper["wd"], clip_threshold=hyper["clip"]
    )
    for lr, step_grads in zip(lrs, grads, strict=True):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()

    expected, rhos = naive_stable_adamw(
        start, [[g.flatten().tolist() for g in sg] for sg in grads], lrs, **hyper
    )
    assert max(rhos) > 1.5, "the spike must trigger update clipping"
    assert min(rhos) < 0.99, "some steps must be unclipped"
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().flatten().numpy(), e, rtol=1e-12, atol=1e-15)


def test_stable_adamw_skips_params_without_grad() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = StableAdamW([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    assert opt.state[a]["step"] == 1 and "max_exp_avg_sq" in opt.state[a]


def test_stable_adamw_rejects_bad_hyperparameters() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="clip_threshold=0"):
        StableAdamW([p], clip_threshold=0.0)
    with pytest.raises(ValueError, match="betas"):
        StableAdamW([p], betas=(0.9, 1.0))


# ---------------------------------------------------------------------------- bundle and resume


def make_params(seed: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    main = [
        torch.nn.Parameter(torch.randn(4, 3, generator=gen)),
        torch.nn.Parameter(torch.randn(3, generator=gen)),
    ]
    sgnm = [torch.nn.Parameter(torch.randn(5, 2, generator=gen))]
    return main, sgnm


def train_steps(
    opts: Optimizers, params: list[torch.nn.Parameter], steps: range, steps_per_epoch: int
) -> None:
    """Deterministic fake training: iteration n's gradients depend only on n and the params."""
    for n in steps:
        gen = torch.Generator().manual_seed(1000 + n)
        opts.zero_grad()
        loss = sum(
            ((p - torch.randn(p.shape, generator=gen)) ** 2).sum() * (1 + n % 3) for p in params
        )
        loss.backward()
        opts.step()
        if (n + 1) % steps_per_epoch == 0:
            opts.epoch_end()


@pytest.mark.parametrize(
    "schedule,with_sgnm",
    [("cosine+warmcosine", True), ("cosine+warmcosine", False), ("multistep", True)],
)
def test_state_dict_round_trip_is_bit_exact(schedule: str, with_sgnm: bool) -> None:
    cfg = OptimConfig(lr=0.05, sgnm_warmup=2, schedule=schedule, milestones=(1, 3))
    spe, epochs, k, total = 3, 4, 5, 12

    def build(main: list, sgnm: list) -> Optimizers:
        return build_optimizers(main, sgnm if with_sgnm else [], cfg, spe, epochs)

    main_a, sgnm_a = make_params(7)
    params_a = main_a + (sgnm_a if with_sgnm else [])
    opts_a = build(main_a, sgnm_a)
    train_steps(opts_a, params_a, range(total), spe)

    main_b, sgnm_b = make_params(7)
    params_b = main_b + (sgnm_b if with_sgnm else [])
    opts_b = build(main_b, sgnm_b)
    train_steps(opts_b, params_b, range(k), spe)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_b], "optim": opts_b.state_dict()}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    main_c, sgnm_c = make_params(123)  # different init: everything must come from the checkpoint
    params_c = main_c + (sgnm_c if with_sgnm else [])
    with torch.no_grad():
        for p, v in zip(params_c, saved["params"], strict=True):
            p.copy_(v)
    opts_c = build(main_c, sgnm_c)
    opts_c.load_state_dict(saved["optim"])
    train_steps(opts_c, params_c, range(k, total), spe)

    for a, b, c in zip(params_a, saved["params"], params_c, strict=True):
        assert torch.equal(a, c)
        assert not torch.equal(b, c)  # the resumed steps really moved every tensor
    assert opts_a.lrs() == opts_c.lrs()


def test_sgnm_off_and_mismatch() -> None:
    main, sgnm = make_params(0)
    off = build_optimizers(main, [], OptimConfig(), steps_per_epoch=2, epochs=2)
    assert off.sgnm is None and off.sgnm_scheduler is None and "sgnm" not in off.lrs()
    on = build_optimizers(main, sgnm, OptimConfig(), steps_per_epoch=2, epochs=2)
    with pytest.raises(ValueError, match="use_sgnm"):
        off.load_state_dict(on.state_dict())


def test_multistep_is_one_adamw_over_everything() -> None:
    main, sgnm = make_params(0)
    cfg = OptimConfig(lr=2e-5, schedule="multistep", milestones=(4, 8), gamma=0.1)
    opts = build_optimizers(main, sgnm, cfg, steps_per_epoch=2, epochs=10)
    assert opts.sgnm is None
    assert isinstance(opts.main, torch.optim.AdamW)
    assert len(opts.main.param_groups[0]["params"]) == len(main) + len(sgnm)
    lrs = []
    for _ in range(10):
        lrs.append(opts.lrs()["main"])
        opts.step()
        opts.epoch_end()
    np.testing.assert_allclose(lrs, [2e-5] * 4 + [2e-6] * 4 + [2e-7] * 2, rtol=1e-9)


def test_build_rejects_empty_main_group() -> None:
    _, sgnm = make_params(0)
    with pytest.raises(ValueError, match="no trainable parameters in the main group"):
        build_optimizers([], sgnm, OptimConfig(), steps_per_epoch=2, epochs=2)
