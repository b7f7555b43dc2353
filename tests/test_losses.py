"""Losses: reference values from the official code, and vectorised vs per-sample loops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsanet import losses
from dsanet.config import LossConfig
from dsanet.model import DSANetOutput
from dsanet.sgnm import SGNMOutput

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="module")
def reference():
    arrays = np.load(FIXTURES / "losses_seed0.npz")
    inputs = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    expected = json.loads((FIXTURES / "losses_seed0.json").read_text())["expected"]
    return inputs, expected


def test_reference_values(reference):
    x, expected = reference
    eps = expected["label_smoothing"]
    got = {
        "mil_bce": losses.mil_bce(x["logits_det"], x["labels"], x["lengths"]),
        "mil_align": losses.mil_align(x["logits_align"], x["labels"], x["lengths"]),
        "event_align": losses.event_align(x["logits_event"], x["labels"], smoothing=eps),
        "bkg_align": losses.background_align(x["logits_bkg"], x["labels"], smoothing=eps),
        "separation": losses.separation(x["text_features"]),
        "consistency": losses.consistency(
            x["logits_det"], x["features"], x["reconstructed"], x["lengths"]
        ),
    }
    assert expected["separation_divisor"] == x["labels"].shape[1] - 1
    for name, value in got.items():
        assert value.dim() == 0, name
        assert value.item() == pytest.approx(expected[name], rel=1e-5), name


# ---------------------------------------------------------------------------- naive loops


def _inputs(seed: int, B: int = 7, T: int = 64, C: int = 5, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[1] = 1
    labels = (torch.rand(B, C, generator=g) < 0.3).float()
    labels[:, 0] = 0
    labels[labels.sum(1) == 0, 1] = 1  # every anomalous video names a class
    labels[:2] = 0
    labels[:2, 0] = 1  # two normal videos
    return {
        "lengths": lengths,
        "labels": labels,
        "logits_det": torch.randn(B, T, 1, generator=g),
        "logits_align": torch.randn(B, T, C, generator=g) * 3,
        "logits_event": torch.randn(B, 1, C, generator=g),
        "logits_bkg": torch.randn(B, 1, C, generator=g),
        "text_features": torch.randn(C, D, generator=g),
        "features": torch.randn(B, T, D, generator=g),
        "reconstructed": torch.randn(B, T, D, generator=g),
    }


def _loop_topk(values: torch.Tensor, lengths: torch.Tensor, divisor: int = 16) -> torch.Tensor:
    rows = []
    for b in range(values.shape[0]):
        n = int(lengths[b])
        k = min(int(n / divisor + 1), n)
        rows.append(torch.topk(values[b, :n], k=k, dim=0).values.mean(0))
    return torch.stack(rows)


def _loop_mil_bce(x):
    probs = torch.sigmoid(x["logits_det"].squeeze(-1))
    scores = _loop_topk(probs, x["lengths"])
    return F.binary_cross_entropy(scores, 1 - x["labels"][:, 0])


def _loop_mil_align(x):
    pooled = _loop_topk(x["logits_align"], x["lengths"])
    target = x["labels"] / x["labels"].sum(1, keepdim=True)
    return -(target * F.log_softmax(pooled, 1)).sum(1).mean()


def _loop_event(x, eps=0.1):
    total = 0.0
    C = x["labels"].shape[1]
    for b in range(x["labels"].shape[0]):
        q = (1 - eps) * x["labels"][b] / x["labels"][b].sum() + eps / C
        total = total - (q * F.log_softmax(x["logits_event"][b, 0], 0)).sum()
    return total / x["labels"].shape[0]


def _loop_bkg(x, eps=0.1, off=0.01):
    total = 0.0
    C = x["labels"].shape[1]
    for b in range(x["labels"].shape[0]):
        base = torch.tensor([1.0] + [off] * (C - 1))
        q = (1 - eps) * base / base.sum() + eps / C
        total = total - (q * F.log_softmax(x["logits_bkg"][b, 0], 0)).sum()
    return total / x["labels"].shape[0]


def _loop_separation(x):
    t = x["text_features"]
    total = 0.0
    for c in range(1, t.shape[0]):
        total = total + torch.abs(t[0] / t[0].norm() @ (t[c] / t[c].norm()))
    return total / (t.shape[0] - 1)


def _loop_consistency(x):
    probs, errors = [], []
    for b in range(x["labels"].shape[0]):
        n = int(x["lengths"][b])
        cos = F.cosine_similarity(x["features"][b, :n], x["reconstructed"][b, :n], dim=-1)
        errors.append((1 - cos) / 2)
        probs.append(torch.sigmoid(x["logits_det"][b, :n, 0]))
    return F.mse_loss(torch.cat(probs), torch.cat(errors))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_losses_match_loops(seed):
    x = _inputs(seed)
    pairs = {
        "mil_bce": (losses.mil_bce(x["logits_det"], x["labels"], x["lengths"]), _loop_mil_bce(x)),
        "mil_align": (
            losses.mil_align(x["logits_align"], x["labels"], x["lengths"]),
            _loop_mil_align(x),
        ),
        "event": (losses.event_align(x["logits_event"], x["labels"]), _loop_event(x)),
        "bkg": (losses.background_align(x["logits_bkg"], x["labels"]), _loop_bkg(x)),
        "sep": (losses.separation(x["text_features"]), _loop_separation(x)),
        "cons": (
            losses.consistency(x["logits_det"], x["features"], x["reconstructed"], x["lengths"]),
            _loop_consistency(x),
        ),
    }
    for name, (fast, slow) in pairs.items():
        torch.testing.assert_close(fast, slow.reshape(()), atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("shape", [(9, 40), (9, 40, 3)])
def test_topk_mean_matches_loop(shape):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(*shape, generator=g)
    lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=g)
    for divisor in (16, 4, 1):
        torch.testing.assert_close(
            losses.topk_mean(values, lengths, divisor),
            _loop_topk(values, lengths, divisor),
            atol=1e-6,
            rtol=1e-6,
        )


def test_topk_rule():
    lengths = torch.tensor([1, 15, 16, 256])
    values = torch.arange(256.0).flip(0).expand(4, 256)  # descending 255 ... 0
    k = torch.tensor([1, 1, 2, 17])
    expected = torch.stack([values[i, : k[i]].mean() for i in range(4)])
    torch.testing.assert_close(losses.topk_mean(values, lengths), expected)


def test_background_target_constants():
    C = 7
    logits = torch.zeros(1, 1, C)
    logits[0, 0, 0] = 50.0  # log_softmax ~ (0, -50, ...): the loss reads off the target mass
    loss = losses.background_align(logits, torch.zeros(1, C))
    q_off = (loss.item()) / (50.0 * (C - 1))
    assert q_off == pytest.approx(0.022776, abs=1e-6)
    assert 1 - (C - 1) * q_off == pytest.approx(0.863342, abs=1e-5)


def test_topk_gradient_is_finite():
    x = _inputs(4)
    logits = x["logits_align"].clone().requires_grad_(True)
    losses.mil_align(logits, x["labels"], x["lengths"]).backward()
    assert torch.isfinite(logits.grad).all()
    padded = torch.arange(logits.shape[1])[None, :] >= x["lengths"][:, None]
    assert (logits.grad[padded] == 0).all()


def _outputs(x, with_dcsa: bool, with_sgnm: bool) -> DSANetOutput:
    sgnm = None
    if with_sgnm:
        sgnm = SGNMOutput(x["reconstructed"], torch.tensor(0.25), x["features"])
    return DSANetOutput(
        logits_det=x["logits_det"],
        logits_align=x["logits_align"],
        text_features=x["text_features"],
        logits_event=x["logits_event"] if with_dcsa else None,
        logits_bkg=x["logits_bkg"] if with_dcsa else None,
        sgnm=sgnm,
    )


def test_total_loss_combines_weighted_terms():
    x = _inputs(5)
    cfg = LossConfig(w_align=5.0, w_sep=0.5, w_cons=2.0)
    loss, terms = losses.total_loss(_outputs(x, True, True), x["labels"], x["lengths"], cfg)
    assert set(terms) == {"mil", "align", "sep", "event", "bkg", "cons", "gather", "total"}
    weights = {"align": 5.0, "sep": 0.5, "cons": 2.0}
    expected = sum(weights.get(k, 1.0) * v for k, v in terms.items() if k != "total")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert terms["total"] == pytest.approx(loss.item())
    assert terms["gather"] == pytest.approx(0.25)
    assert terms["mil"] == pytest.approx(_loop_mil_bce(x).item(), rel=1e-6)


def test_total_loss_switches():
    x = _inputs(6)
    _, terms = losses.total_loss(
        _outputs(x, False, False), x["labels"], x["lengths"], LossConfig(use_dcsa=False)
    )
    assert set(terms) == {"mil", "align", "sep", "total"}
    with pytest.raises(ValueError, match="use_dcsa"):
        losses.total_loss(_outputs(x, False, False), x["labels"], x["lengths"], LossConfig())
