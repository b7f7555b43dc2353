"""CLIP class-prompt encoders over a frozen open_clip text tower (DESIGN §2.4, §8).

adapter (DSANet), coop (VadCLIP's learnable context), frozen and manual (templated) encoders;
each returns the class embeddings t (C, D). Weights are loaded in `dsanet.text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsanet.config import TextConfig


class FrozenTextTower(nn.Module):
    """The frozen CLIP text transformer (no visual tower); stays in eval mode."""

    def __init__(
        self,
        token_embedding: nn.Embedding,
        positional_embedding: nn.Parameter,
        blocks: nn.ModuleList,
        ln_final: nn.LayerNorm,
        text_projection: nn.Parameter,
        attn_mask: Tensor,
    ) -> None:
        super().__init__()
        self.token_embedding = token_embedding
        self.positional_embedding = positional_embedding  # (77, W)
        self.blocks = blocks  # open_clip 3.x residual blocks, batch-first
        self.ln_final = ln_final
        self.text_projection = text_projection  # (W, E)
        self.register_buffer("attn_mask", attn_mask, persistent=False)  # causal, -inf above diag
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_open_clip(cls, model: nn.Module, layers: int | None = None) -> FrozenTextTower:
        """Share the text modules of an open_clip CLIP; `layers` keeps only the first blocks."""
        if (
            getattr(model, "text_pool_type", None) != "argmax"
            or getattr(model, "attn_mask", None) is None
            or not isinstance(getattr(model, "text_projection", None), nn.Parameter)
        ):
            raise ValueError(
                f"text.arch: {type(model).__name__} is not a CLIP with a causal, argmax-pooled "
                f"text transformer and a text_projection matrix; use e.g. ViT-B-16-quickgelu"
            )
        blocks = model.transformer.resblocks
        if layers is not None:
            if not 1 <= layers <= len(blocks):
                raise ValueError(f"text.layers={layers}: must be in [1, {len(blocks)}]")
            blocks = nn.ModuleList(list(blocks)[:layers])
        return cls(
            model.token_embedding,
            model.positional_embedding,
            blocks,
            model.ln_final,
            model.text_projection,
            model.attn_mask,
        )

    @property
    def width(self) -> int:
        return self.positional_embedding.shape[1]

    @property
    def out_dim(self) -> int:
        return self.text_projection.shape[1]

    def train(self, mode: bool = True) -> FrozenTextTower:
        return super().train(False)

    def embed(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N, L, W) token + position embeddings."""
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def causal_mask(self, L: int) -> Tensor:
        return self.attn_mask[:L, :L]

    def transform(self, x: Tensor) -> Tensor:
        """All blocks; the causal mask must be passed explicitly to open_clip blocks."""
        mask = self.causal_mask(x.shape[1])
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return x

    def pool(self, x: Tensor, eot: Tensor) -> Tensor:
        """ln_final at the EOT positions: (N, L, W) -> (N, W)."""
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])


# ---------------------------------------------------------------------------- class encoders


def tokenize_prompts(
    tokenizer: Any, class_prompts: Sequence[Sequence[str]], template: str = "{}"
) -> tuple[Tensor, Tensor]:
    """Descriptions of every class -> tokens (N, 77) and their class index (N,)."""
    texts = [template.format(d) for descriptions in class_prompts for d in descriptions]
    index = [c for c, descriptions in enumerate(class_prompts) for _ in descriptions]
    if not texts or any(len(d) == 0 for d in class_prompts):
        raise ValueError("class prompts need at least one description per class")
    return tokenizer(texts).long(), torch.tensor(index)


class LeakyLinear(nn.Linear):
    """LeakyReLU_0.01(x W) without bias: the reference's adapters and projection."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__(width, out, bias=False)
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(super().forward(x), 0.01)


class ClassTextEncoder(nn.Module):
    """Fixed class prompts -> class embeddings t (C, D): descriptions averaged per class, then
    L2-normalised if `normalize`. Subclasses implement `encode() -> (N, D)`."""

    def __init__(self, tower: FrozenTextTower, class_index: Tensor, normalize: bool) -> None:
        super().__init__()
        self.tower = tower
        self.normalize = normalize
        onehot = F.one_hot(class_index).float().T  # (C, N)
        self.register_buffer("averaging", onehot / onehot.sum(1, keepdim=True), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.averaging.shape[0]

    @property
    def out_dim(self) -> int:
        return self.tower.out_dim

    def encode(self) -> Tensor:
        raise NotImplementedError

    def forward(self) -> Tensor:
        classes = self.averaging @ self.encode()  # (C, D)
        return F.normalize(classes, dim=-1) if self.normalize else classes


def _cut(tokens: Tensor, last: Tensor, truncate: bool) -> Tensor:
    """Drop the positions after the last EOT of the batch: exact under the causal mask."""
    return tokens[:, : int(last.max()) + 1] if truncate else tokens


class AdapterTextEncoder(ClassTextEncoder):
    """DSANet (DESIGN §2.4): adapters after the first L blocks with norm-matched mixing t_w, EOT
    pooling, and a trainable LeakyReLU(x W) projection replacing CLIP's text_projection."""

    def __init__(
        self,
        tower: FrozenTextTower,
        tokens: Tensor,
        class_index: Tensor,
        adapt_layers: int,
        adapter_weight: float,
        normalize: bool = True,
        truncate: bool = True,
    ) -> None:
        super().__init__(tower, class_index, normalize)
        if adapt_layers > len(tower.blocks):
            raise ValueError(
                f"text.adapt_layers={adapt_layers} exceeds the {len(tower.blocks)} text blocks"
            )
        eot = tokens.argmax(dim=-1)
        self.register_buffer("tokens", _cut(tokens, eot, truncate), persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.adapter_weight = adapter_weight
        self.adapters = nn.ModuleList(
            LeakyLinear(tower.width, tower.width) for _ in range(adapt_layers)
        )
        self.projection = LeakyLinear(tower.width, tower.width)

    @property
    def out_dim(self) -> int:
        return self.tower.width

    def encode(self) -> Tensor:
        x = self.tower.embed(self.tokens)  # (N, L, W)
        mask = self.tower.causal_mask(x.shape[1])
        for k, block in enumerate(self.tower.blocks):
            x = block(x, attn_mask=mask)
            if k < len(self.adapters):
                a = self.adapters[k](x)
                a = a * x.norm(dim=-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) + 1e-6)
                x = self.adapter_weight * a + (1 - self.adapter_weight) * x
        return self.projection(self.tower.pool(x, self.eot))


class PromptTextEncoder(ClassTextEncoder):
    """VadCLIP's CoOp-style prompt (DESIGN §8): a learnable (77, W) context indexed by absolute
    position; SOT, `prefix` context rows, the class words, `postfix` rows, EOT; frozen CLIP
    with its text_projection."""

    def __init__(
        self,
        tower: FrozenTextTower,
        tokens: Tensor,
        class_index: Tensor,
        prefix: int,
        postfix: int,
        normalize: bool = True,
        truncate: bool = True,
    ) -> None:
        super().__init__(tower, class_index, normalize)
        L = tokens.shape[1]
        eot = tokens.argmax(dim=-1, keepdim=True)  # (N, 1)
        end = prefix + eot + postfix  # where the EOT embedding goes
        if int(end.max()) >= L:
            raise ValueError(
                f"text.prompt_prefix={prefix} + text.prompt_postfix={postfix} plus the longest "
                f"description ({int(eot.max()) - 1} tokens) do not fit the {L}-token context"
            )
        pos = torch.arange(L)[None]  # (1, L)
        words = (pos == 0) | ((pos > prefix) & (pos < prefix + eot)) | (pos == end)  # (N, L)
        source = torch.where(pos == end, eot, (pos - prefix).clamp(min=0))
        source = torch.where(pos == 0, 0, source)
        ids = torch.where(words, tokens.gather(1, source), 0)
        self.register_buffer("prompt_ids", _cut(ids, end, truncate), persistent=False)
        self.register_buffer("from_word", _cut(words, end, truncate), persistent=False)
        self.register_buffer("eot", end.squeeze(1), persistent=False)
        self.context = nn.Parameter(torch.randn(L, tower.width) * 0.01)

    def encode(self) -> Tensor:
        L = self.prompt_ids.shape[1]
        words = self.tower.token_embedding(self.prompt_ids)  # (N, L, W)
        x = torch.where(self.from_word[..., None], words, self.context[:L])
        x = self.tower.transform(x + self.tower.positional_embedding[:L])
        return self.tower.pool(x, self.eot) @ self.tower.text_projection


class FrozenTextEncoder(ClassTextEncoder):
    """Plain CLIP encode_text of the (optionally templated) descriptions; nothing trains."""

    def __init__(
        self,
        tower: FrozenTextTower,
        tokens: Tensor,
        class_index: Tensor,
        normalize: bool = True,
        truncate: bool = True,
    ) -> None:
        super().__init__(tower, class_index, normalize)
        eot = tokens.argmax(dim=-1)
        self.register_buffer("tokens", _cut(tokens, eot, truncate), persistent=False)
        self.register_buffer("eot", eot, persistent=False)

    @torch.no_grad()
    def encode(self) -> Tensor:
        x = self.tower.transform(self.tower.embed(self.tokens))
        return self.tower.pool(x, self.eot) @ self.tower.text_projection


def text_encoder_from_tower(
    cfg: TextConfig, tower: FrozenTextTower, tokenizer: Any, class_prompts: Sequence[Sequence[str]]
) -> ClassTextEncoder:
    """The text.mode encoder over an already loaded tower (tests share one tower this way)."""
    template = cfg.template if cfg.mode == "manual" else "{}"
    tokens, index = tokenize_prompts(tokenizer, class_prompts, template)
    if cfg.mode == "adapter":
        return AdapterTextEncoder(
            tower, tokens, index, cfg.adapt_layers, cfg.adapter_weight, cfg.normalize
        )
    if cfg.mode == "coop":
        return PromptTextEncoder(
            tower, tokens, index, cfg.prompt_prefix, cfg.prompt_postfix, cfg.normalize
        )
    if cfg.mode in ("frozen", "manual"):
        return FrozenTextEncoder(tower, tokens, index, cfg.normalize)
    raise ValueError(f"text.mode={cfg.mode!r}: use adapter, coop, frozen or manual")
