"""Benchmark B2: one full test-set evaluation (forward + frame AUC/AP + segment mAP) as a fraction
of one training epoch, at XD shapes.

Reads a synthetic tree written by `python -m dsanet synth --preset xd-full --scale S --out DIR`.
The evaluation is `dsanet.evaluate.predict_test` + `test_metrics` over the tree's test set,
scaled up by 1/S to the 800 test videos. A training step is timed through the real
`Trainer.run_epoch` at two batch sizes; step time is linear in B (a + b B, the text encoder
being the per-step part), which gives the epoch of the official setting: 412 steps of B=96
(the 39,540 training rows). `python bench/bench_eval.py --root DIR [--batches 8 16]
[--steps N] [--repeats N] [--device cuda]`; `--quick` runs tiny shapes once, as a CI smoke
test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import command, row  # noqa: E402

from dsanet.config import load_config  # noqa: E402
from dsanet.evaluate import predict_test, test_metrics  # noqa: E402
from dsanet.loading import load_data  # noqa: E402
from dsanet.metrics import AP, MAP_AVG  # noqa: E402
from dsanet.trainer import Trainer  # noqa: E402

# The official XD setting (DESIGN §1.2, §1.7).
TRAIN_ROWS, TEST_VIDEOS, BATCH = 39_540, 800, 96


def time_evaluation(trainer: Trainer, repeats: int) -> tuple[float, float, dict[str, float]]:
    """Best (forward seconds, metrics seconds) of `repeats` full test-set passes."""
    forward, scoring = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        predictions = predict_test(trainer.model, trainer.bundle.test, trainer.device)
        middle = time.perf_counter()
        scores = test_metrics(predictions, trainer.bundle, trainer.cfg.eval)
        forward.append(middle - start)
        scoring.append(time.perf_counter() - middle)
    return min(forward), min(scoring), scores


def time_step(cfg, bundle, batch: int, steps: int, warm_up: bool) -> float:
    """Seconds per training step (data, forward, losses, backward, optimiser) at batch `batch`:
    an epoch of `steps` steps, after a warm-up epoch if `warm_up`."""
    trainer = Trainer(
        cfg.with_overrides({"train.batch_size": batch, "train.max_steps_per_epoch": steps}),
        bundle,
    )
    if warm_up:
        trainer.run_epoch()
    return trainer.run_epoch()["seconds"] / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a synthetic xd-full tree (any --scale)")
    parser.add_argument("--batches", type=int, nargs=2, default=[8, 16], help="two B to time")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per batch size")
    parser.add_argument("--repeats", type=int, default=2, help="evaluation passes; best kept")
    parser.add_argument("--text-layers", type=int, default=12, help="CLIP text blocks (random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny tree and model, once (CI)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        overrides = [f"text.layers={args.text_layers}"]
        batches, steps, repeats, root = args.batches, args.steps, args.repeats, args.root
        if args.quick:
            from dsanet.synth import generate

            root = Path(tmp) / "tree"
            generate("xd-full", root, seed=0, scale=0.003)
            overrides = ["text.layers=1", "model.visual_length=64", "model.attn_window=16"]
            overrides.append("model.decoder_depth=1")
            batches, steps, repeats = [2, 4], 1, 1
        elif root is None:
            parser.error("--root is required (or --quick)")
        scale = json.loads((root / "synth.json").read_text())["scale"]
        cfg = load_config(
            "xd",
            [
                f"data.list_dir={root / 'lists'}",
                f"data.feature_root={root / 'features'}",
                "data.protocol=final",  # no selection pass inside the timed epochs
                "text.weights=",
                f"train.device={args.device}",
                f"train.out_dir={Path(tmp) / 'run'}",
                *overrides,
            ],
        )
        (Path(tmp) / "run").mkdir()
        bundle = load_data(cfg.data, cfg.model.visual_length, cfg.model.visual_width)
        per_step = {b: time_step(cfg, bundle, b, steps, not args.quick) for b in batches}
        trainer = Trainer(cfg, bundle)
        forward, scoring, scores = time_evaluation(trainer, repeats)

    (b1, t1), (b2, t2) = per_step.items()
    slope = max(0.0, (t2 - t1) / (b2 - b1))  # noise on a loaded host must not make it negative
    step96 = max(0.0, t1 - slope * b1) + slope * BATCH
    epoch = math.ceil(TRAIN_ROWS / BATCH) * step96
    test_videos = len(bundle.test.videos)
    evaluation = (forward + scoring) * TEST_VIDEOS / test_videos
    steps_text = ", ".join(f"B={b}: {t:.2f} s" for b, t in per_step.items())
    print(
        row(
            f"B2 test-set evaluation vs training epoch (T={cfg.model.visual_length}, "
            f"{cfg.text.layers}-layer text tower, {cfg.model.decoder_depth}-block SG-NM decoder)",
            command("bench_eval.py", argv),
            args.device,
            f"evaluation of {test_videos} test videos (scale {scale}): forward {forward:.2f} s + "
            f"AUC/AP/mAP {scoring:.2f} s (best of {repeats}), {evaluation:.1f} s for "
            f"{TEST_VIDEOS}; training step {steps_text} (over {steps}), so {step96:.2f} s at "
            f"B={BATCH} and {epoch:.0f} s per {math.ceil(TRAIN_ROWS / BATCH)}-step epoch; "
            f"evaluation = {100 * evaluation / epoch:.2f}% of an epoch (test AP "
            f"{scores[AP]:.3f}, mAP {scores[MAP_AVG]:.2f})",
        )
    )


if __name__ == "__main__":
    main()
