"""Benchmark B1: one training step (forward + losses + backward), ours vs the reference's structure.

Both run on the same DSANet weights and batch: ours through `DSANet.forward` and
`losses.total_loss`, the naive one through `bench/naive_step.py`. The losses and every parameter
gradient are checked equal first; then the two are timed interleaved, best of N:
`python bench/bench_step.py [--batch B] [--repeats N] [--device cuda]`; `--quick` runs tiny
shapes once, as a CI smoke test.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import naive_step  # noqa: E402
import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from common import command, row  # noqa: E402

from dsanet.config import load_config  # noqa: E402
from dsanet.datasets import load_spec  # noqa: E402
from dsanet.losses import total_loss  # noqa: E402
from dsanet.model import DSANet  # noqa: E402
from dsanet.text import build_text_encoder  # noqa: E402

# Label strings as the XD list spells them; about half the rows are normal, as in XD.
LABELS = ["A", "A", "A", "B1-0-0", "B2-0-0", "B4-0-0", "B5-0-0", "B6-0-0", "G-0-0", "B1-B2-0"]


def build(overrides: list[str], device: torch.device):
    cfg = load_config("xd", ["text.weights=", *overrides])
    spec = load_spec(cfg.data.dataset)
    torch.manual_seed(0)
    encoder = build_text_encoder(cfg.text, spec.prompts)
    model = DSANet(cfg.model, cfg.loss, spec.num_classes, encoder).to(device).train()
    return cfg, spec, model


def make_batch(B: int, T: int, D: int, spec, device: torch.device, seed: int = 0):
    """Features (B, T, D) zero-padded past random lengths, label strings and their multi-hot."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(B) < 0.5, T, rng.integers(1, T, B))  # long videos fill T
    features = rng.normal(size=(B, T, D)).astype(np.float32)
    features[np.arange(T)[None, :] >= lengths[:, None]] = 0.0
    labels = [LABELS[i] for i in rng.integers(0, len(LABELS), B)]
    targets = np.zeros((B, spec.num_classes), dtype=np.float32)
    for i, label in enumerate(labels):
        targets[i, list(spec.parse_label(label))] = 1.0
    return (
        torch.from_numpy(features).to(device),
        torch.from_numpy(lengths).to(device),
        labels,
        torch.from_numpy(targets).to(device),
    )


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="B (the XD setting is 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    parser.add_argument("--text-layers", type=int, default=12, help="CLIP text blocks (random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round (CI)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    overrides = [f"text.layers={args.text_layers}"]
    B, repeats = args.batch, args.repeats
    if args.quick:
        overrides = ["text.layers=1", "model.visual_length=64", "model.attn_window=16"]
        overrides.append("model.decoder_depth=1")
        B, repeats = 2, 1
    cfg, spec, model = build(overrides, device)
    T, D = cfg.model.visual_length, cfg.model.visual_width
    features, lengths, label_strings, targets = make_batch(B, T, D, spec, device)
    tokenizer = open_clip.get_tokenizer(cfg.text.arch)

    def ours() -> dict[str, float]:
        loss, terms = total_loss(model(features, lengths), targets, lengths, cfg.loss)
        loss.backward()
        return terms

    def naive() -> dict[str, float]:
        terms = naive_step.step_losses(
            model,
            tokenizer,
            spec.prompts,
            spec.class_labels,
            features,
            lengths,
            label_strings,
            cfg.loss,
        )
        terms["total"].backward()
        return {k: v.item() for k, v in terms.items()}  # the reference logs each with .item()

    # Same losses and gradients first (this also warms both paths up).
    model.zero_grad(set_to_none=True)
    ours_terms, ours_grads = ours(), gradients(model)
    model.zero_grad(set_to_none=True)
    naive_terms, naive_grads = naive(), gradients(model)
    loss_error = max(abs(ours_terms[k] - naive_terms[k]) for k in naive_terms)
    grad_error = max(
        float((ours_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12))
        for n, g in naive_grads.items()
    )
    assert ours_grads.keys() == naive_grads.keys(), "the two steps train different parameters"
    assert loss_error < 1e-4, f"losses differ by {loss_error:.2e}: {ours_terms} vs {naive_terms}"
    assert grad_error < 1e-3, f"gradients differ by {grad_error:.2e} (relative)"

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for r in range(repeats):
        order = [("ours", ours), ("naive", naive)]
        for name, step in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    shape = (
        f"B={B}, T={T}, {cfg.text.layers}-layer text tower, "
        f"{cfg.model.decoder_depth}-block SG-NM decoder"
    )
    print(
        row(
            f"B1 training step, forward+losses+backward ({shape})",
            command("bench_step.py", argv),
            args.device,
            f"ours {best['ours']:.3f} s, naive {best['naive']:.3f} s (best of {repeats}, "
            f"interleaved): {best['naive'] / best['ours']:.2f}x; losses equal (largest "
            f"difference {loss_error:.1e}, total {ours_terms['total']:.4f}), gradients equal "
            f"(largest relative difference {grad_error:.1e})",
        )
    )


if __name__ == "__main__":
    main()
