"""The DSANet network (DESIGN §2): temporal encoder, graph block, detection head, class alignment,
DCSA pooling and SG-NM, over pre-extracted CLIP features, with an injected text encoder.

`belief_modulation` (DESIGN §5.1) lives here too; importing this module loads only torch and yaml.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsanet.config import LossConfig, ModelConfig
from dsanet.layers import (
    DistanceAdjacency,
    GraphConvolution,
    QuickGELU,
    TemporalTransformer,
    length_mask,
    padded_window_mask,
    quick_gelu_mlp,
    similarity_adjacency,
    window_mask,
)
from dsanet.sgnm import SGNM, SGNMOutput


def belief_modulation(logits_det: Tensor, logits_align: Tensor, temperature: float) -> Tensor:
    """Hierarchical belief modulation (DESIGN §5.1): (T, 1), (T, C) logits -> (T, C) probabilities.

    Column 0 is 1 - sigmoid(l1/beta); column c >= 1 is sigmoid(l1/beta) times softmax(l2/beta)
    renormalised over the anomaly classes. Rows sum to 1.
    """
    abnormal = torch.sigmoid(logits_det / temperature)  # (T, 1)
    anomaly = torch.softmax(logits_align / temperature, dim=-1)[..., 1:]  # (T, C-1)
    anomaly = anomaly / (anomaly.sum(dim=-1, keepdim=True) + 1e-12)
    return torch.cat([1.0 - abnormal, abnormal * anomaly], dim=-1)


@dataclass
class DSANetOutput:
    """What one training forward returns (DESIGN §2.8)."""

    logits_det: Tensor  # l1 (B, T, 1)
    logits_align: Tensor  # l2 (B, T, C)
    text_features: Tensor  # t (C, D)
    logits_event: Tensor | None = None  # l3 (B, 1, C); None when DCSA is off
    logits_bkg: Tensor | None = None  # l4 (B, 1, C)
    sgnm: SGNMOutput | None = None  # only in training mode with SG-NM on


class DSANet(nn.Module):
    """DSANet over features (B, T, D) with true lengths (B,).

    `text_encoder` is any module whose call returns the class embeddings (C, D) (see
    `dsanet.text`); it is built, and its weights loaded, outside this constructor. Of `loss`
    only `use_dcsa` is read: it switches the event/background logits l3/l4 on.
    """

    def __init__(
        self, cfg: ModelConfig, loss: LossConfig, num_classes: int, text_encoder: nn.Module
    ) -> None:
        super().__init__()
        T, D = cfg.visual_length, cfg.visual_width
        for name, value in (("num_classes", num_classes), ("out_dim", D)):
            have = getattr(text_encoder, name, value)
            if have != value:
                raise ValueError(
                    f"text encoder {name}={have} but the model needs {value} "
                    f"(dataset classes / model.visual_width)"
                )
        self.cfg = cfg
        self.visual_length = T
        self.num_classes = num_classes
        self.heads = cfg.visual_heads
        self.sim_threshold = cfg.sim_threshold
        self.temperature = cfg.align_temperature
        self.pool_scale = cfg.pool_scale
        self.mask_padding = cfg.mask_padding
        self.use_dcsa = loss.use_dcsa

        self.frame_position_embeddings = nn.Embedding(T, D)
        self.temporal = TemporalTransformer(D, cfg.visual_layers, cfg.visual_heads, cfg.mlp_ratio)
        self.register_buffer("attn_mask", window_mask(T, cfg.attn_window), persistent=False)
        self.gc1 = GraphConvolution(D, D // 2)
        self.gc2 = GraphConvolution(D // 2, D // 2)
        self.gc3 = GraphConvolution(D, D // 2)
        self.gc4 = GraphConvolution(D // 2, D // 2)
        self.distance_adj = DistanceAdjacency(T, cfg.distance_scale)
        self.linear = nn.Linear(D, D)
        self.gelu = QuickGELU()
        self.mlp1 = quick_gelu_mlp(D, cfg.mlp_ratio)
        self.mlp2 = quick_gelu_mlp(D, cfg.mlp_ratio)
        self.classifier = nn.Linear(D, 1)
        self.text_encoder = text_encoder
        self.sgnm = (
            SGNM(
                D,
                cfg.num_prototypes,
                cfg.sgnm_heads,
                cfg.extractor_depth,
                cfg.decoder_depth,
                cfg.normal_ratio,
                select=cfg.sgnm_select,
                decoder_residual=cfg.decoder_residual,
                mlp_ratio=cfg.mlp_ratio,
            )
            if cfg.use_sgnm
            else None
        )
        nn.init.normal_(self.frame_position_embeddings.weight, std=0.01)

    # ------------------------------------------------------------------ pieces

    def encode_classes(self) -> Tensor:
        """Class embeddings t (C, D). Training calls it once per forward (the adapters train);
        evaluation calls it once per pass under no_grad and hands the result to `infer`, so no
        cached copy can go stale (Q-T1)."""
        return self.text_encoder()

    def encode_video(self, features: Tensor, lengths: Tensor, valid: Tensor | None) -> Tensor:
        """Temporal transformer + both graph paths: (B, T, D) -> V (B, T, D) (DESIGN §2.1-2.2).

        `valid` (B, T) masks padding (flag mask_padding) or is None (the reference).
        """
        x = features.float() + self.frame_position_embeddings.weight  # positions 0..T-1
        attn_mask = self.attn_mask
        if valid is not None:
            attn_mask = padded_window_mask(attn_mask, valid, self.heads)  # (B*heads, T, T)
        x = self.temporal(x, attn_mask)

        sim = similarity_adjacency(x, lengths, self.sim_threshold)  # (B, T, T)
        dist = self.distance_adj(valid)  # (T, T), or (B, T, T) with padding masked
        x1 = self.gelu(self.gc2(self.gelu(self.gc1(x, sim)), sim))
        x2 = self.gelu(self.gc4(self.gelu(self.gc3(x, dist)), dist))
        return self.linear(torch.cat([x1, x2], dim=-1))

    def align(self, V: Tensor, logits_det: Tensor, text: Tensor, valid: Tensor | None) -> Tensor:
        """l2 (B, T, C): cos(V, visually prompted class embeddings) / 0.07 (DESIGN §2.5)."""
        weights = logits_det if valid is None else logits_det * valid[..., None]  # raw logits
        prompt = F.normalize(weights.mT @ V, dim=-1)  # (B, 1, D)
        classes = text.unsqueeze(0) + prompt  # (B, C, D)
        classes = classes + self.mlp1(classes)
        return F.normalize(V, dim=-1) @ F.normalize(classes, dim=-1).mT / self.temperature

    def pool_event_background(
        self, V: Tensor, logits_det: Tensor, text: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """DCSA soft pooling (DESIGN §2.6): l3, l4 (B, 1, C) against the plain class embeddings."""
        p = torch.sigmoid(logits_det)  # (B, T, 1)
        weights = torch.cat([p, 1.0 - p], dim=-1)  # (B, T, 2): event, background
        weights = torch.expm1(self.pool_scale * weights)  # each in [0, e^s - 1]
        if valid is not None:
            weights = weights * valid[..., None]
        weights = F.normalize(weights, p=1, dim=1)  # each column on its own, over T
        pooled = F.normalize(weights.mT @ V, dim=-1)  # (B, 2, D)
        logits = pooled @ F.normalize(text, dim=-1).T / self.temperature  # (B, 2, C)
        return logits[:, :1], logits[:, 1:]

    def _heads(self, features: Tensor, lengths: Tensor, text: Tensor):
        T = features.shape[1]
        if T != self.visual_length:
            raise ValueError(
                f"features have T={T} snippets but model.visual_length={self.visual_length}: "
                f"pad or split the video first"
            )
        valid = length_mask(lengths, T) if self.mask_padding else None
        V = self.encode_video(features, lengths, valid)
        logits_det = self.classifier(V + self.mlp2(V))  # (B, T, 1)
        return V, logits_det, self.align(V, logits_det, text, valid), valid

    # ------------------------------------------------------------------ entry points

    def forward(
        self, features: Tensor, lengths: Tensor, text_features: Tensor | None = None
    ) -> DSANetOutput:
        """features (B, T, D), lengths (B,); `text_features` (C, D) skips the text encoder.

        SG-NM runs only in training mode.
        """
        text = self.encode_classes() if text_features is None else text_features
        V, logits_det, logits_align, valid = self._heads(features, lengths, text)
        out = DSANetOutput(logits_det, logits_align, text)
        if self.use_dcsa:
            out.logits_event, out.logits_bkg = self.pool_event_background(
                V, logits_det, text, valid
            )
        if self.sgnm is not None and self.training:
            out.sgnm = self.sgnm(V, logits_det, lengths)
        return out

    @torch.no_grad()
    def infer(
        self,
        chunks: Tensor,
        chunk_lengths: Tensor,
        num_snippets: int | None = None,
        text_features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One test video split into independent chunks (n, T, D) -> per-snippet l1 (T_v, 1) and
        l2 (T_v, C), flattened and cut to T_v = `num_snippets` (default: sum of chunk lengths).
        SG-NM and DCSA are skipped. Pass `text_features` from `encode_classes()` computed once
        per evaluation pass."""
        text = self.encode_classes() if text_features is None else text_features
        _, logits_det, logits_align, _ = self._heads(chunks, chunk_lengths, text)
        n = int(chunk_lengths.sum()) if num_snippets is None else num_snippets
        return logits_det.flatten(0, 1)[:n], logits_align.flatten(0, 1)[:n]

    # ------------------------------------------------------------------ checkpoints

    def _frozen_names(self) -> set[str]:
        return {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state dict without the frozen CLIP weights (Q-C1)."""
        frozen = self._frozen_names()
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what `trainable_state_dict` saved; every trainable key must be present."""
        own = self.state_dict()
        wrong = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if wrong:  # load_state_dict would raise a multi-line RuntimeError naming no fix
            raise ValueError(
                f"checkpoint shapes do not match this model (checkpoint vs model): "
                f"{', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}; check model/text "
                f"config (num_prototypes, visual_width, decoder_depth, text.mode) against the "
                f"config.yaml of the run that saved it"
            )
        result = self.load_state_dict(state, strict=False)
        frozen = self._frozen_names()
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise KeyError(
                f"checkpoint does not match this model: missing {missing[:8]}, unexpected "
                f"{result.unexpected_keys[:8]}; check model/text config (use_sgnm, text.mode, "
                f"text.adapt_layers, visual_layers) against the run that saved it"
            )


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(main, SG-NM) trainable parameters (DESIGN §4): SG-NM gets its own optimiser."""
    main: list[nn.Parameter] = []
    sgnm: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (sgnm if name.startswith("sgnm.") else main).append(p)
    return main, sgnm
