"""A naive DSANet training step with the official code's structure, for bench_step.py only.

It reads the weights of a `dsanet.model.DSANet` (adapter text mode, no padding masks, SG-NM
with the reference's selection and decoder) and recomputes the same losses the way the
official training script does: label vectors grown string by string, every class prompt
tokenised and encoded at the full 77 tokens each step, sequence-first temporal attention, a
per-sample loop for the similarity graph, the distance graph rebuilt with scipy on the CPU and
copied over every forward, and per-sample top-k loops that grow their outputs with torch.cat.
Nothing here is used by the library.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist, squareform
from torch import Tensor, nn


def label_vectors(labels: Sequence[str], class_labels: Sequence[str], device) -> Tensor:
    """Multi-hot (B, C) built per string and grown row by row, as the reference does."""
    rows = torch.zeros(0)
    for text in labels:
        row = torch.zeros(len(class_labels))
        for token in text.split("-"):
            if token in class_labels:
                row[class_labels.index(token)] = 1
        rows = torch.cat([rows, row.unsqueeze(0)], dim=0)
    return rows.to(device)


def class_features(model: nn.Module, tokenizer, prompts: Sequence[Sequence[str]]) -> Tensor:
    """t (C, D): each class tokenised and encoded separately, at the full context length."""
    encoder = model.text_encoder
    tower = encoder.tower
    device = tower.positional_embedding.device
    features = []
    for descriptions in prompts:
        tokens = tokenizer(list(descriptions)).to(device)  # (n, 77)
        x = tower.token_embedding(tokens) + tower.positional_embedding  # (n, 77, W)
        mask = tower.attn_mask
        for i, block in enumerate(tower.blocks):
            x = block(x, attn_mask=mask)
            if i < len(encoder.adapters):
                adapted = encoder.adapters[i](x)
                adapted = (
                    adapted
                    * x.norm(dim=-1, keepdim=True)
                    / (adapted.norm(dim=-1, keepdim=True) + 1e-6)
                )
                x = encoder.adapter_weight * adapted + (1 - encoder.adapter_weight) * x
        x = tower.ln_final(x)  # every position, then the EOT one is picked
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        mean = encoder.projection(x).mean(dim=0)
        features.append(mean / mean.norm())
    return torch.stack(features, dim=0)


def temporal(model: nn.Module, x: Tensor) -> Tensor:
    """Sequence-first (T, B, D) blocks through the functional multi-head attention."""
    for block in model.temporal.resblocks:
        attn = block.attn
        mask = model.attn_mask.to(device=x.device)
        h = block.ln_1(x)
        out = F.multi_head_attention_forward(
            h,
            h,
            h,
            attn.embed_dim,
            attn.num_heads,
            attn.in_proj_weight,
            attn.in_proj_bias,
            None,
            None,
            False,
            0.0,
            attn.out_proj.weight,
            attn.out_proj.bias,
            training=True,
            need_weights=False,
            attn_mask=mask,
        )[0]
        x = x + out
        x = x + block.mlp(block.ln_2(x))
    return x


def similarity_graph(x: Tensor, lengths: Tensor, threshold: float) -> Tensor:
    """Cosine graph filled in one sample at a time on its top-left len x len block."""
    products = x.matmul(x.permute(0, 2, 1))
    norms = torch.norm(x, p=2, dim=2, keepdim=True)
    products = products / (norms.matmul(norms.permute(0, 2, 1)) + 1e-20)
    out = torch.zeros_like(products)
    for i in range(len(lengths)):
        block = products[i, : lengths[i], : lengths[i]]
        block = F.threshold(block, threshold, 0)
        out[i, : lengths[i], : lengths[i]] = torch.softmax(block, dim=1)
    return out


def distance_graph(batch: int, length: int, device) -> Tensor:
    """exp(-|i - j| / e), rebuilt on the CPU with scipy, repeated per sample, then copied."""
    positions = np.arange(length).reshape(-1, 1)
    dist = torch.from_numpy(squareform(pdist(positions, metric="cityblock").astype(np.float32)))
    dist = torch.exp(-dist / torch.exp(torch.tensor(1.0)))
    return dist.unsqueeze(0).repeat(batch, 1, 1).to(device)


def graph_conv(layer: nn.Module, x: Tensor, adj: Tensor) -> Tensor:
    out = adj.matmul(x.matmul(layer.weight))
    if layer.residual is not None:
        return out + layer.residual(x.permute(0, 2, 1)).permute(0, 2, 1)
    return out + x


def encode_video(model: nn.Module, features: Tensor, lengths: Tensor) -> Tensor:
    features = features.to(torch.float)
    B, T, _ = features.shape
    positions = torch.arange(T, device=features.device).unsqueeze(0).expand(B, -1)
    embedded = model.frame_position_embeddings(positions).permute(1, 0, 2)
    x = temporal(model, features.permute(1, 0, 2) + embedded).permute(1, 0, 2)
    sim = similarity_graph(x, lengths, model.sim_threshold)
    dist = distance_graph(B, T, features.device)
    h1 = model.gelu(graph_conv(model.gc1, x, sim))
    h2 = model.gelu(graph_conv(model.gc3, x, dist))
    x1 = model.gelu(graph_conv(model.gc2, h1, sim))
    x2 = model.gelu(graph_conv(model.gc4, h2, dist))
    return model.linear(torch.cat((x1, x2), 2))


def aggregation_block(block: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Prototypes (B, K, D) attend to the selected snippets (B, M, D), attention written out."""
    attn = block.attn
    B, K, D = x.shape
    M = y.shape[1]
    heads = attn.heads
    qx, ky = block.norm1(x), block.norm1(y)
    q = attn.q(qx).reshape(B, K, 1, heads, D // heads).permute(2, 0, 3, 1, 4)[0]
    kv = attn.kv(ky).reshape(B, M, 2, heads, D // heads).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    weights = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(B, K, D))
    return x + block.mlp(block.norm2(x))


def prototype_block(block: nn.Module, x: Tensor, prototypes: Tensor) -> Tensor:
    attn = block.attn
    B, T, D = x.shape
    K = prototypes.shape[1]
    heads = attn.heads
    q = attn.q(block.norm1(x)).reshape(B, T, 1, heads, D // heads).permute(2, 0, 3, 1, 4)[0]
    kv = attn.kv(block.norm1(prototypes)).reshape(B, K, 2, heads, D // heads)
    kv = kv.permute(2, 0, 3, 1, 4)
    q = F.normalize(q, dim=-1)
    k = F.normalize(kv[0], dim=-1)
    weights = F.relu((q @ k.transpose(-2, -1)) * attn.learn_scale)
    y = attn.proj((weights @ kv[1]).transpose(1, 2).reshape(B, T, D))
    x = x + y if block.residual else y
    return x + block.mlp(block.norm2(x))


def sgnm(module: nn.Module, V: Tensor, logits_det: Tensor) -> tuple[Tensor, Tensor]:
    B, T, D = V.shape
    with torch.no_grad():
        scores = torch.sigmoid(logits_det.squeeze(-1))
        keep = int(T * module.normal_ratio)
        order = torch.topk(scores, k=T, largest=False, dim=1).indices  # a full sort, then a cut
        normal = torch.gather(V, 1, order[:, :keep].unsqueeze(-1).expand(-1, -1, D))
    prototypes = module.prototypes.unsqueeze(0).expand(B, -1, -1)
    for block in module.extractor:
        prototypes = aggregation_block(block, prototypes, normal)
    # All pairwise distances through a broadcast (B, M, K, D) cosine, then the nearest prototype.
    distance = 1.0 - F.cosine_similarity(normal.unsqueeze(2), prototypes.unsqueeze(1), dim=-1)
    gather = torch.min(distance, dim=2)[0].mean()
    reconstructed = V
    for layer in module.bottleneck:
        reconstructed = layer(reconstructed)
    for block in module.decoder:
        reconstructed = prototype_block(block, reconstructed, prototypes)
    return reconstructed, gather


def forward(model: nn.Module, features: Tensor, lengths: Tensor, text: Tensor) -> dict[str, Tensor]:
    """The reference forward: l1, l2, l3, l4 and the SG-NM outputs."""
    V = encode_video(model, features, lengths)
    logits1 = model.classifier(V + model.mlp2(V))
    prompt = logits1.permute(0, 2, 1) @ V
    prompt = prompt / prompt.norm(dim=-1, keepdim=True)
    prompt = prompt.expand(prompt.shape[0], text.shape[0], prompt.shape[2])
    classes = text.unsqueeze(0).expand(prompt.shape[0], text.shape[0], text.shape[1]) + prompt
    classes = classes + model.mlp1(classes)
    V_norm = V / V.norm(dim=-1, keepdim=True)
    classes_norm = (classes / classes.norm(dim=-1, keepdim=True)).permute(0, 2, 1)
    logits2 = V_norm @ classes_norm / model.temperature

    probs = torch.sigmoid(logits1)
    event = F.normalize((model.pool_scale * probs).exp() - 1, p=1, dim=1)
    background = F.normalize((model.pool_scale * (1.0 - probs)).exp() - 1, p=1, dim=1)
    event_feat = torch.matmul(event.permute(0, 2, 1), V)
    background_feat = torch.matmul(background.permute(0, 2, 1), V)
    plain = text.unsqueeze(0).expand(event_feat.shape[0], text.shape[0], text.shape[1])
    plain = (plain / plain.norm(dim=-1, keepdim=True)).permute(0, 2, 1)
    event_norm = event_feat / event_feat.norm(dim=-1, keepdim=True)
    background_norm = background_feat / background_feat.norm(dim=-1, keepdim=True)
    logits3 = event_norm @ plain / model.temperature
    logits4 = background_norm @ plain / model.temperature
    reconstructed, gather = sgnm(model.sgnm, V, logits1)
    return {
        "logits1": logits1,
        "logits2": logits2,
        "logits3": logits3,
        "logits4": logits4,
        "reconstructed": reconstructed,
        "gather": gather,
        "V": V,
    }


# ---------------------------------------------------------------------------- losses


def mil_bce(logits: Tensor, labels: Tensor, lengths: Tensor) -> Tensor:
    target = 1 - labels[:, 0].reshape(labels.shape[0])
    probs = torch.sigmoid(logits).reshape(logits.shape[0], logits.shape[1])
    pooled = torch.zeros(0, device=logits.device)
    for i in range(probs.shape[0]):
        top = torch.topk(probs[i, 0 : lengths[i]], k=int(lengths[i] / 16 + 1), largest=True)[0]
        pooled = torch.cat((pooled, torch.mean(top).view(1)))
    return F.binary_cross_entropy(pooled, target)


def mil_align(logits: Tensor, labels: Tensor, lengths: Tensor) -> Tensor:
    labels = labels / torch.sum(labels, dim=1, keepdim=True)
    pooled = torch.zeros(0, device=logits.device)
    for i in range(logits.shape[0]):
        top = torch.topk(logits[i, 0 : lengths[i]], k=int(lengths[i] / 16 + 1), dim=0)[0]
        pooled = torch.cat([pooled, torch.mean(top, 0, keepdim=True)], dim=0)
    return -torch.mean(torch.sum(labels * F.log_softmax(pooled, dim=1), dim=1), dim=0)


def smoothed_align(logits: Tensor, target: Tensor, lengths: Tensor) -> Tensor:
    """L4 / L5: a top-1 over the length-1 time axis per sample, grown with torch.cat."""
    pooled = torch.zeros(0, device=logits.device)
    for i in range(logits.shape[0]):
        top = torch.topk(logits[i, 0 : lengths[i]], k=1, dim=0)[0]
        pooled = torch.cat([pooled, torch.mean(top, 0, keepdim=True)], dim=0)
    return -torch.mean(torch.sum(target * F.log_softmax(pooled, dim=1), dim=1), dim=0)


def event_target(labels: Tensor, epsilon: float) -> Tensor:
    C = labels.shape[1]
    return (1 - epsilon) * labels / labels.sum(dim=1, keepdim=True).clamp(min=1e-6) + epsilon / C


def background_target(labels: Tensor, epsilon: float, off_mass: float) -> Tensor:
    C = labels.shape[1]
    base = torch.full(labels.shape, off_mass, device=labels.device)
    base[:, 0] = 1
    return (1 - epsilon) * base / base.sum(dim=1, keepdim=True).clamp(min=1e-6) + epsilon / C


def separation(text: Tensor) -> Tensor:
    total = torch.zeros(1, device=text.device)
    normal = text[0] / text[0].norm(dim=-1, keepdim=True)
    for j in range(1, text.shape[0]):
        total += torch.abs(normal @ (text[j] / text[j].norm(dim=-1, keepdim=True)))
    return total / (text.shape[0] - 1)


def consistency(logits1: Tensor, V: Tensor, reconstructed: Tensor, lengths: Tensor) -> Tensor:
    error = (1.0 - F.cosine_similarity(V, reconstructed, dim=-1)) / 2.0
    probs = torch.sigmoid(logits1.squeeze(-1))
    mask = torch.arange(logits1.shape[1], device=logits1.device)[None, :] < lengths[:, None]
    return F.mse_loss(probs[mask], error[mask])


def step_losses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[str]],
    class_labels: Sequence[str],
    features: Tensor,
    lengths: Tensor,
    label_strings: Sequence[str],
    loss_cfg,
) -> dict[str, Tensor]:
    """Every loss term of one training step and their weighted "total", reference style."""
    labels = label_vectors(label_strings, class_labels, features.device)
    text = class_features(model, tokenizer, prompts)
    out = forward(model, features, lengths, text)
    terms = {
        "mil": mil_bce(out["logits1"], labels, lengths),
        "align": mil_align(out["logits2"], labels, lengths),
        "sep": separation(text).squeeze(0),
        "event": smoothed_align(
            out["logits3"], event_target(labels, loss_cfg.label_smoothing), lengths
        ),
        "bkg": smoothed_align(
            out["logits4"],
            background_target(labels, loss_cfg.label_smoothing, loss_cfg.bkg_off_mass),
            lengths,
        ),
        "cons": consistency(out["logits1"], out["V"], out["reconstructed"], lengths),
        "gather": out["gather"],
    }
    total = (
        terms["mil"]
        + terms["align"] * loss_cfg.w_align
        + terms["sep"]
        + terms["event"]
        + terms["bkg"]
        + terms["cons"]
        + terms["gather"]
    )
    return {**terms, "total": total}
