"""Benchmark B4b: where a search trial's start-up time goes, phase by phase.

Replays what `tune.trainable.run_trial` does before its first training step in a fresh Python
process (a new Ray worker's first trial: interpreter, imports, config, data attach, text
encoder, model, optimiser), then twice more in the same process (a reused worker's next trial,
with dsanet.text's kept tower and, side by side, rebuilding it as before), on the demo config
over synthetic xd-mini with its feature cache already built:

    python bench/bench_startup.py [--repeats N] [--quick]

Prints one table per mode and one markdown row for bench/RESULTS.md. `--quick` uses a
quarter-size tree and one run (CI smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]

SCRATCH = Path(os.environ.get("DSANET_BENCH_SCRATCH", "/work/scratch/bench5"))
GOAL_S = 2.0

# The child: one trial's start-up, timed phase by phase; the same steps as run_trial and
# Trainer.__init__. It prints {"cold": {phase: s}, "warm": {phase: s}} as its last line.
CHILD = """
import time
t0 = time.time()
import json, sys
study, out = sys.argv[1], sys.argv[2]
times, mark = {}, [time.perf_counter()]
def lap(name):
    now = time.perf_counter()
    times[name] = times.get(name, 0.0) + now - mark[0]
    mark[0] = now
import ray
lap("import ray (worker runtime)")
import tune.trainable as trainable
lap("import tune.trainable (ray.tune)")
import torch
lap("import torch")
from dsanet import trainer
from dsanet.model import DSANet, parameter_groups
from dsanet.optim import build_optimizers
from dsanet.text import build_text_encoder
lap("import dsanet.trainer (rest)")
torch.set_num_threads(1)  # a trial's 1 CPU

def trial(seed, lr):
    from pathlib import Path
    config = {"_study": {"dir": study, "max_t": 1}, "optim.lr": lr, "train.seed": seed}
    cfg = trainable.read_trial_config(config, Path(out))
    lap("config")
    bundle = trainable._bundle(cfg)
    lap("data attach")
    trainer.seed_everything(cfg.train.seed, cfg.train.deterministic)
    if "open_clip" not in sys.modules:
        import open_clip
        lap("import open_clip")
    encoder = build_text_encoder(cfg.text, bundle.spec.prompts)
    lap("text encoder")
    model = DSANet(cfg.model, cfg.loss, bundle.spec.num_classes, encoder)
    lap("model")
    batches = trainer.epoch_batches(
        bundle.train_rows, bundle.train.targets, bundle.spec.sampling,
        cfg.train.batch_size, cfg.train.seed, 0,
    )[: cfg.train.max_steps_per_epoch or None]
    optim = build_optimizers(*parameter_groups(model), cfg.optim, len(batches), cfg.train.epochs)
    lap("optimiser")
    batch = next(trainer.iterate_batches(
        bundle.train.features, bundle.train.lengths, bundle.train.targets, batches[:1]
    ))
    lengths = torch.from_numpy(batch.lengths)
    out_ = model(torch.from_numpy(batch.features), lengths)
    loss, _ = trainer.total_loss(out_, torch.from_numpy(batch.targets), lengths, cfg.loss)
    optim.zero_grad()
    loss.backward()
    optim.step()
    lap("first step (not start-up)")

def again(lr, rebuild):
    times.clear()
    if rebuild:  # what a reused worker did before dsanet.text kept its last tower
        from dsanet import text
        text._last_tower.clear()
        text._tokenizer.cache_clear()
    mark[0] = time.perf_counter()
    trial(0, lr)  # the same train.seed, as in a search that does not vary it
    return dict(times)

trial(0, 1e-4)
cold = dict(times)
warm = again(3e-4, rebuild=False)
rebuilt = again(2e-4, rebuild=True)
print(json.dumps({"t0": t0, "cold": cold, "warm": warm, "rebuilt": rebuilt}))
"""
NOT_STARTUP = "first step (not start-up)"


def prepare(root: Path, scale: float) -> Path:
    """A synthetic xd-mini tree, its feature cache and a study folder with the demo base."""
    from dsanet import synth
    from dsanet.config import load_config
    from dsanet.loading import load_data
    from tune.layout import BASE_FILE

    data = root / f"xd-mini-x{scale:g}"
    if not (data / synth.MARKER).is_file():
        synth.generate("xd-mini", data, seed=0, scale=scale)
    cfg = load_config(
        "demo",
        {
            "data.list_dir": str(data / synth.LISTS),
            "data.feature_root": str(data / synth.FEATURES),
            "data.cache_dir": str(data / "cache"),
        },
    )
    load_data(cfg.data, cfg.model.visual_length, cfg.model.visual_width)  # the driver's job
    study = root / f"startup-study-x{scale:g}"
    study.mkdir(parents=True, exist_ok=True)
    (study / BASE_FILE).write_text(cfg.to_yaml())
    return study


def run_child(study: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(study), str(study / "trial")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"start-up child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cold"] = {"interpreter": result.pop("t0") - spawned, **result["cold"]}
    return result


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run.get(name, 0.0) for run in runs) for name in runs[0]}


def table(phases: dict[str, float]) -> str:
    startup = sum(v for k, v in phases.items() if k != NOT_STARTUP)
    rows = [f"  {name:<34} {seconds:7.3f} s" for name, seconds in phases.items()]
    return "\n".join([*rows, f"  {'start-up total':<34} {startup:7.3f} s"])


def startup_total(phases: dict[str, float]) -> float:
    return sum(v for k, v in phases.items() if k != NOT_STARTUP)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes; medians kept")
    parser.add_argument("--quick", action="store_true", help="quarter-size data, one run (CI)")
    args = parser.parse_args(argv)
    repeats, scale = (1, 0.25) if args.quick else (args.repeats, 1.0)
    study = prepare(SCRATCH, scale)
    runs = [run_child(study) for _ in range(repeats)]
    cold = median_phases([r["cold"] for r in runs])
    warm = median_phases([r["warm"] for r in runs])
    rebuilt = median_phases([r["rebuilt"] for r in runs])
    print(f"new worker, first trial (median of {repeats} fresh processes):\n{table(cold)}")
    print(f"reused worker, next trial:\n{table(warm)}")
    print(f"reused worker, text tower and tokenizer rebuilt (as before):\n{table(rebuilt)}")
    load = os.getloadavg()[0]
    command = " ".join(["python bench/bench_startup.py", *(sys.argv[1:] if argv is None else argv)])
    imports = sum(v for k, v in cold.items() if k.startswith("import") or k == "interpreter")
    print(
        f"| B4 trial start-up (demo config, xd-mini x{scale:g}) | `{command}` | {machine()} "
        f"| {datetime.date.today()} | new worker {startup_total(cold):.2f} s to the first "
        f"step (imports {imports:.2f} s, data attach {cold['data attach']:.2f} s, text encoder "
        f"{cold['text encoder']:.2f} s, model {cold['model']:.2f} s); reused worker "
        f"{startup_total(warm):.2f} s (rebuilding the text tower: {startup_total(rebuilt):.2f} s); "
        f"goal <= {GOAL_S:g} s; load {load:.1f} |"
    )


if __name__ == "__main__":
    main()
