"""Building blocks of the DSANet video branch: local-window temporal transformer and graph block.

DESIGN §2.1 (temporal encoder) and §2.2 (similarity / distance graphs, graph convolutions).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def quick_gelu_mlp(width: int, ratio: int) -> nn.Sequential:
    """width -> ratio*width -> width with QuickGELU (keys c_fc / c_proj, as in CLIP)."""
    return nn.Sequential(
        OrderedDict(
            [
                ("c_fc", nn.Linear(width, width * ratio)),
                ("gelu", QuickGELU()),
                ("c_proj", nn.Linear(width * ratio, width)),
            ]
        )
    )


def length_mask(lengths: Tensor, T: int) -> Tensor:
    """(B,) true lengths -> (B, T) bool, True on the valid slots t < len."""
    return torch.arange(T, device=lengths.device) < lengths[:, None]


# ---------------------------------------------------------------------------- temporal encoder


def window_mask(T: int, window: int) -> Tensor:
    """Additive (T, T) mask: 0 inside the diagonal blocks of size `window`, -inf elsewhere."""
    if window < 1 or T % window:
        raise ValueError(
            f"model.attn_window={window} must divide model.visual_length={T} "
            f"(otherwise the trailing rows are fully masked and give NaN, Q-A1)"
        )
    block = torch.arange(T) // window
    same = block[:, None] == block[None, :]
    return torch.zeros(T, T).masked_fill(~same, float("-inf"))


def padded_window_mask(window: Tensor, valid: Tensor, heads: int) -> Tensor:
    """Per-sample additive mask (B*heads, T, T) that also hides padded keys (flag mask_padding).

    A padded query keeps its own key, so a window that is all padding never yields a NaN row.
    """
    T = window.shape[0]
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    allowed = valid[:, None, :] | eye  # (B, T, T)
    mask = window.masked_fill(~allowed, float("-inf"))  # (B, T, T)
    return mask.repeat_interleave(heads, dim=0)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)), then + MLP(LN(x)) with QuickGELU (DESIGN §2.1)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = quick_gelu_mlp(width, mlp_ratio)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


# ---------------------------------------------------------------------------- graph block


def similarity_adjacency(x: Tensor, lengths: Tensor, threshold: float) -> Tensor:
    """Batched thresholded-cosine graph A_sim (B, T, T) of x (B, T, D) (DESIGN §2.2).

    Per sample, on the top-left len x len block: cosines <= threshold become 0 (not -inf, so
    they still weigh e^0 = 1), then a row softmax over j < len. Rows and columns >= len are 0.
    """
    T = x.shape[1]
    with torch.autocast(x.device.type, enabled=False):  # the 0.7 threshold needs fp32 cosines
        x = x.float()
        norms = x.norm(dim=-1, keepdim=True)  # (B, T, 1)
        cos = (x @ x.mT) / (norms @ norms.mT + 1e-20)  # (B, T, T)
        cos = F.threshold(cos, threshold, 0.0)
        # A zero length would leave a row with no valid key: keep key 0 so softmax stays finite;
        # the row itself is zeroed below.
        keys = length_mask(lengths.clamp(min=1), T)  # (B, T)
        rows = length_mask(lengths, T)
        cos = cos.masked_fill(~keys[:, None, :], float("-inf"))
        return cos.softmax(dim=-1) * rows[:, :, None]


def distance_adjacency(T: int, scale: float) -> Tensor:
    """A_dist (T, T) = exp(-|i - j| / scale); not row-normalised (DESIGN §2.2)."""
    pos = torch.arange(T, dtype=torch.float64)
    return torch.exp(-(pos[:, None] - pos[None, :]).abs() / scale).float()


class DistanceAdjacency(nn.Module):
    """Holds A_dist as a buffer, plus the reference's unused `sigma` (Q-A2, DESIGN §7.1 count)."""

    def __init__(self, T: int, scale: float = math.e) -> None:
        super().__init__()
        self.sigma = nn.Parameter(torch.full((1,), 0.1))
        self.register_buffer("matrix", distance_adjacency(T, scale), persistent=False)

    def forward(self, valid: Tensor | None = None) -> Tensor:
        """(T, T), or (B, T, T) with padded rows and columns zeroed when `valid` (B, T) is given."""
        if valid is None:
            return self.matrix
        return self.matrix * (valid[:, :, None] & valid[:, None, :])


class GraphConvolution(nn.Module):
    """out = A (X W) + R(X); R is a width-5 Conv1d over time when in != out, else identity."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))  # applied as X W
        nn.init.xavier_uniform_(self.weight)
        self.residual = (
            nn.Conv1d(in_features, out_features, kernel_size=5, padding=2)
            if in_features != out_features
            else None
        )

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        out = adj @ (x @ self.weight)  # (B, T, out); adj is (B, T, T) or broadcast (T, T)
        if self.residual is None:
            return out + x
        return out + self.residual(x.mT).mT
