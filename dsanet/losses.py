"""DSANet training losses (DESIGN §3), vectorised over the batch with length masks.

`labels` is always the multi-hot (B, C) target with column 0 = normal; `lengths` (B,) are the
true lengths (>= 1). Every loss returns a scalar tensor and is computed in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from dsanet.config import LossConfig

if TYPE_CHECKING:
    from dsanet.model import DSANetOutput


def topk_mean(values: Tensor, lengths: Tensor, divisor: int = 16) -> Tensor:
    """Mean of the top k_b = min(len_b // divisor + 1, len_b) valid values along T, per column.

    (B, T) -> (B,) or (B, T, C) -> (B, C). Masked sort + rank mask: the same values a
    per-sample torch.topk picks, without a loop.
    """
    T = values.shape[1]
    pos = torch.arange(T, device=values.device)
    extra = (1,) * (values.dim() - 2)
    valid = (pos < lengths[:, None]).view(-1, T, *extra)  # (B, T, 1...)
    k = torch.minimum(lengths // divisor + 1, lengths.clamp(min=1))  # (B,); <= len if divisor 1
    take = (pos < k[:, None]).view(-1, T, *extra)
    ranked = values.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
    return torch.where(take, ranked, 0.0).sum(dim=1) / k.view(-1, *extra).to(values.dtype)


def _per_video(logits: Tensor) -> Tensor:
    """(B, 1, C) pooled logits, as the model returns them, -> (B, C)."""
    return logits.squeeze(1) if logits.dim() == 3 else logits


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def mil_bce(logits_det: Tensor, labels: Tensor, lengths: Tensor, divisor: int = 16) -> Tensor:
    """L1: BCE of the top-k mean of sigmoid(l1) (B, T, 1) against "video is anomalous"."""
    probs = torch.sigmoid(logits_det.float().flatten(1))  # (B, T)
    score = topk_mean(probs, lengths, divisor)  # (B,)
    target = 1.0 - labels[:, 0].float()
    with torch.autocast(score.device.type, enabled=False):  # BCE refuses to autocast
        return F.binary_cross_entropy(score, target)  # clamps log at -100 like the reference


def mil_align(logits_align: Tensor, labels: Tensor, lengths: Tensor, divisor: int = 16) -> Tensor:
    """L2: per-class top-k mean of l2 (B, T, C), soft cross-entropy against labels / sum."""
    pooled = topk_mean(logits_align.float(), lengths, divisor)  # (B, C)
    labels = labels.float()
    return _soft_cross_entropy(pooled, labels / labels.sum(dim=1, keepdim=True))


def event_align(logits_event: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """L4: l3 (B, 1, C) against labels / sum, label-smoothed by `smoothing` over C."""
    logits = _per_video(logits_event.float())
    labels = labels.float()
    target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1e-6)
    return _soft_cross_entropy(logits, (1 - smoothing) * target + smoothing / logits.shape[-1])


def background_align(
    logits_bkg: Tensor, labels: Tensor, smoothing: float = 0.1, off_mass: float = 0.01
) -> Tensor:
    """L5: l4 (B, 1, C) against one fixed target for every video: (1, off_mass, ...) / sum,
    label-smoothed. `labels` only fixes the batch; the video label plays no part (DESIGN §3)."""
    logits = _per_video(logits_bkg.float())
    C = logits.shape[-1]
    base = torch.full((C,), off_mass, device=logits.device)
    base[0] = 1.0
    target = (1 - smoothing) * base / base.sum() + smoothing / C  # (C,)
    return _soft_cross_entropy(logits, target.expand(labels.shape[0], C))


def separation(text_features: Tensor) -> Tensor:
    """L3: mean over anomaly classes c >= 1 of |cos(t_0, t_c)| for t (C, D)."""
    t = F.normalize(text_features.float(), dim=-1)
    return (t[1:] @ t[0]).abs().mean()


def consistency(
    logits_det: Tensor, features: Tensor, reconstructed: Tensor, lengths: Tensor
) -> Tensor:
    """L_cons: MSE over valid snippets between sigmoid(l1) and (1 - cos(V, R~)) / 2."""
    error = (1.0 - F.cosine_similarity(features.float(), reconstructed.float(), dim=-1)) / 2
    probs = torch.sigmoid(logits_det.float().flatten(1))  # (B, T)
    valid = torch.arange(probs.shape[1], device=probs.device) < lengths[:, None]  # (B, T)
    squared = torch.where(valid, (probs - error) ** 2, 0.0)
    return squared.sum() / valid.sum()


def total_loss(
    outputs: DSANetOutput, labels: Tensor, lengths: Tensor, cfg: LossConfig
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the terms (DESIGN §3) and the unweighted terms by name, plus "total".

    DCSA terms need loss.use_dcsa; consistency and gather terms come with SG-NM outputs.
    """
    terms = {
        "mil": (cfg.w_mil, mil_bce(outputs.logits_det, labels, lengths, cfg.topk_divisor)),
        "align": (
            cfg.w_align,
            mil_align(outputs.logits_align, labels, lengths, cfg.topk_divisor),
        ),
        "sep": (cfg.w_sep, separation(outputs.text_features)),
    }
    if cfg.use_dcsa:
        if outputs.logits_event is None or outputs.logits_bkg is None:
            raise ValueError(
                "loss.use_dcsa is on but the model returned no event/background logits: "
                "build the model with the same LossConfig"
            )
        terms["event"] = (
            cfg.w_event,
            event_align(outputs.logits_event, labels, cfg.label_smoothing),
        )
        terms["bkg"] = (
            cfg.w_bkg,
            background_align(outputs.logits_bkg, labels, cfg.label_smoothing, cfg.bkg_off_mass),
        )
    if outputs.sgnm is not None:
        sgnm = outputs.sgnm
        terms["cons"] = (
            cfg.w_cons,
            consistency(outputs.logits_det, sgnm.features, sgnm.reconstructed, lengths),
        )
        terms["gather"] = (cfg.w_gather, sgnm.gather_loss.float())
    loss = sum(weight * value for weight, value in terms.values())
    names = [*terms, "total"]
    values = torch.stack([value.detach() for _, value in terms.values()] + [loss.detach()])
    return loss, dict(zip(names, values.tolist(), strict=True))  # one device sync
