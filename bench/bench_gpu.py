"""Benchmark B6 (GPU): step time in fp32 vs bf16, achieved TFLOP/s, and trials packed per GPU.

One prepared run for a lent GPU (`python bench/bench_gpu.py`, about 6 minutes on one H100):
1. a full XD training step (B=96, T=256, 12-layer text tower, SG-NM on; forward + losses +
   backward + optimiser step) timed in fp32 and in bf16 autocast, interleaved, best of N, and
   the achieved rate against the count of about 4.8 TFLOP per step in DESIGN §7.2;
2. 1, 2, 4 and 8 worker processes training at once on the one GPU, each capped at its share of
   the memory (`torch.cuda.set_per_process_memory_fraction`, as tune/trainable.py does): total
   steps per second, converted to trials per hour for a 10-epoch XD trial of 412 steps, and
   the peak memory each worker used. A worker that runs out of memory under its cap says so.
`--quick` runs the same code on tiny shapes on the CPU (CI smoke test; no timing meaning).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_step import build, make_batch  # noqa: E402
from common import command, row  # noqa: E402

from dsanet.evaluate import autocast  # noqa: E402
from dsanet.losses import total_loss  # noqa: E402
from dsanet.model import parameter_groups  # noqa: E402
from dsanet.optim import build_optimizers  # noqa: E402

STEP_TFLOP = 4.8  # forward + backward of one XD step at B=96, T=256 (DESIGN §7.2)
TRIAL_STEPS = 10 * 412  # 10 epochs of 412 steps: one XD trial
QUICK = ["text.layers=1", "model.visual_length=64", "model.attn_window=16", "model.decoder_depth=1"]


def make_step(batch: int, overrides: list[str], device: torch.device, precision: str):
    """A closure running one optimiser step of DSANet on a fixed random batch."""
    cfg, spec, model = build(overrides, device)
    features, lengths, _, targets = make_batch(
        batch, cfg.model.visual_length, cfg.model.visual_width, spec, device
    )
    main, sgnm = parameter_groups(model)
    optim = build_optimizers(main, sgnm, cfg.optim, steps_per_epoch=100, epochs=10)

    def step() -> float:
        with autocast(device, precision):
            loss, _ = total_loss(model(features, lengths), targets, lengths, cfg.loss)
        optim.zero_grad()
        loss.backward()
        optim.step()
        return loss.detach()

    return step


def timed(step, device: torch.device, rounds: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    sync()
    return (time.perf_counter() - start) / rounds


def precision_rows(args, device: torch.device, overrides: list[str]) -> list[str]:
    steps = {p: make_step(args.batch, overrides, device, p) for p in ("fp32", "bf16")}
    for step in steps.values():  # warm-up: kernels, allocator, cuDNN/cuBLAS heuristics
        step()
    best = {p: float("inf") for p in steps}
    for r in range(args.repeats):
        for p in steps if r % 2 == 0 else list(steps)[::-1]:
            best[p] = min(best[p], timed(steps[p], device, args.rounds))
    flop_note = ""
    if not args.quick:
        rates = {p: STEP_TFLOP / s for p, s in best.items()}
        flop_note = f"; {rates['fp32']:.0f} TFLOP/s fp32, {rates['bf16']:.0f} TFLOP/s bf16"
    return [
        row(
            f"B6 step time, B={args.batch}, fp32 vs bf16 autocast",
            command("bench_gpu.py", None),
            str(device),
            f"fp32 {best['fp32']:.3f} s, bf16 {best['bf16']:.3f} s per step (best of "
            f"{args.repeats}x{args.rounds}, interleaved): {best['fp32'] / best['bf16']:.2f}x"
            f"{flop_note}",
        )
    ]


def worker(args) -> None:
    """One packed trial: steps for `--seconds`, then one JSON line with its count and memory."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.fraction, device)
    overrides = QUICK if args.quick else []
    try:
        step = make_step(args.batch, overrides, device, args.precision)
        step()  # warm-up, not counted
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            step()
            done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        print(json.dumps({"steps": done, "seconds": elapsed, "peak_gib": peak}), flush=True)
    except torch.OutOfMemoryError:
        print(json.dumps({"oom": True}), flush=True)


def packing_rows(args) -> list[str]:
    out = []
    counts = (1, 2) if args.quick else (1, 2, 4, 8)
    for n in counts:
        command_line = [
            sys.executable, str(Path(__file__).resolve()), "--worker",
            "--device", args.device, "--batch", str(args.batch),
            "--precision", args.precision, "--fraction", f"{0.95 / n:.4f}",
            "--seconds", str(args.seconds),
        ] + (["--quick"] if args.quick else [])  # fmt: skip
        procs = [
            subprocess.Popen(command_line, stdout=subprocess.PIPE, text=True) for _ in range(n)
        ]
        reports = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=args.seconds + 600)
            if proc.returncode != 0:
                raise SystemExit(f"a packed worker failed with exit code {proc.returncode}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        if any(r.get("oom") for r in reports):
            result = f"out of memory under a {0.95 / n:.0%} cap per trial"
        else:
            rate = sum(r["steps"] / r["seconds"] for r in reports)
            peak = max(r["peak_gib"] for r in reports)
            result = (
                f"{rate:.2f} steps/s in all = {rate * 3600 / TRIAL_STEPS:.2f} XD trials/hour; "
                f"peak {peak:.1f} GiB per trial"
            )
        out.append(
            row(
                f"B6 {n} trial(s) packed on one device, {args.precision}, B={args.batch}",
                command("bench_gpu.py", None),
                args.device,
                result,
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=96, help="B (XD trains with 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    parser.add_argument("--rounds", type=int, default=5, help="steps per timed round")
    parser.add_argument("--precision", default="bf16", help="of the packed trials")
    parser.add_argument("--seconds", type=float, default=40.0, help="per packed run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.batch, args.repeats, args.rounds, args.seconds = "cpu", 2, 1, 1, 2.0
    if args.worker:
        worker(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; B6 needs a GPU (or --quick on the CPU)")
    for line in precision_rows(args, device, QUICK if args.quick else []):
        print(line, flush=True)
    for line in packing_rows(args):
        print(line, flush=True)


if __name__ == "__main__":
    main()
