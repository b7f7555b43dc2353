"""Benchmark B5: search efficiency, Optuna TPE + ASHA against random search without early stopping.

Both run through the real driver (`tune/run.py`, `--final-seeds 0`) on synthetic xd-mini with the
tests' tiny DSANet, the same search block and the same total epoch budget (random: every trial
runs max_t epochs; TPE + ASHA: more trials, its curve cut at that budget), one study per method
and searcher seed:

    python bench/bench_efficiency.py [--quick] [--seeds N] [--plot PNG]

Epochs consumed are counted from the trials' `reports.jsonl` in report order; the validation AP
of each epoch comes from the Optuna study. Prints the best validation AP against epochs consumed
(a table; a PNG with --plot), how many epochs TPE + ASHA needed to reach random search's final
best, and one markdown row for bench/RESULTS.md. `--quick` runs one small seed (CI smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from bench_search import SCRATCH, run_study, small_tree, tiny_overrides
from common import machine  # bench/ is the script's folder, first on sys.path

from dsanet.yamlio import load_yaml_file

GOAL = 0.40  # ours reaches random's final best within this share of the budget


@dataclass(frozen=True)
class Size:
    scale: float  # xd-mini video counts
    max_t: int  # epochs of a full trial
    steps: int  # training steps per epoch
    random_trials: int  # budget = random_trials * max_t epochs
    ours_trials: int  # enough for TPE + ASHA to use the budget
    startup_trials: int  # TPE's random start
    reduction_factor: int


FULL = Size(scale=0.5, max_t=9, steps=3, random_trials=6, ours_trials=18, startup_trials=5,
            reduction_factor=3)  # fmt: skip
QUICK = Size(scale=0.25, max_t=3, steps=2, random_trials=2, ours_trials=4, startup_trials=2,
             reduction_factor=3)  # fmt: skip
SEARCH = {
    "optim.lr": {"low": 1.0e-5, "high": 3.0e-3, "log": True},
    "model.num_prototypes": [4, 8, 16],
    "model.normal_ratio": {"low": 0.5, "high": 0.95},
    "text.adapt_layers": [0, 1],  # the tiny tower has 1 layer
    "text.adapter_weight": {"low": 0.05, "high": 0.8},
    "loss.w_align": {"low": 0.5, "high": 10.0, "log": True},
}


def write_space(folder: Path, method: str, seed: int, size: Size) -> Path:
    """One study's space: the same search block; tpe + asha or random + none."""
    ours = method == "tpe+asha"
    name = f"b5-{'ours' if ours else 'random'}-s{seed}"
    scheduler = {"kind": "none"}
    if ours:
        scheduler = {"kind": "asha", "max_t": size.max_t, "grace_period": 1}
        scheduler["reduction_factor"] = size.reduction_factor
    space = {
        "name": name,
        "base": "demo",
        "overrides": tiny_overrides(small_tree(size.scale), size.max_t, size.steps),
        "search": SEARCH,
        "metric": "val_ap",
        "mode": "max",
        "searcher": {
            "kind": "tpe" if ours else "random",
            "seed": seed,
            "n_startup_trials": size.startup_trials,
        },
        "scheduler": scheduler,
        "num_samples": size.ours_trials if ours else size.random_trials,
        "max_concurrent": 2,
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"tracking_uri": "", "experiment": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def curve(root: Path, name: str) -> list[float]:
    """Best validation AP so far after each epoch consumed, epochs in the order reported."""
    import optuna

    from tune.layout import REPORTS_FILE, StudyFolder
    from tune.searcher import epoch_records, storage_uri

    study = optuna.load_study(study_name=name, storage=storage_uri(root))
    events = []  # (report time, val AP)
    for trial in study.get_trials(deepcopy=False):
        records = epoch_records(trial)
        path = StudyFolder(root).trial_dir(trial.number) / REPORTS_FILE
        for line in map(json.loads, path.read_text().splitlines()):
            values = records.get(line["epoch"] + 1, {}).get("values", [float("nan")])
            events.append((line["time"], values[0]))
    aps = np.array([ap for _, ap in sorted(events)], dtype=float)
    return np.fmax.accumulate(np.nan_to_num(aps, nan=-np.inf)).tolist()


def epochs_to_reach(best: list[float], target: float) -> int | None:
    hits = [i + 1 for i, ap in enumerate(best) if ap >= target]
    return hits[0] if hits else None


def plot(results: dict[str, list[list[float]]], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"tpe+asha": "tab:blue", "random": "tab:orange"}
    for method, curves in results.items():
        for i, best in enumerate(curves):
            label = f"{method} (searcher seeds 0-{len(curves) - 1})" if i == 0 else None
            x = np.arange(1, len(best) + 1)
            ax.step(x, best, where="post", color=colours[method], alpha=0.8, label=label)
    finals = [c[-1] for c in results["random"]]
    ax.axhline(np.mean(finals), color="tab:orange", ls=":", lw=1, label="random: mean final best")
    ax.axvline(GOAL * budget, color="grey", ls="--", lw=1, label=f"{GOAL:.0%} of the budget")
    ax.set_xlim(0, budget)
    ax.set_xlabel("epochs consumed (all trials)")
    ax.set_ylabel("best validation AP so far")
    ax.set_title("xd-mini, tiny DSANet: TPE + ASHA vs random search (no early stopping)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict[str, list[list[float]]], budget: int) -> str:
    marks = sorted({max(1, round(budget * f)) for f in (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)})
    header = "| epochs consumed | " + " | ".join(str(m) for m in marks) + " |"
    lines = [header, "|---" * (len(marks) + 1) + "|"]
    for method, curves in results.items():
        for seed, best in enumerate(curves):
            cells = [f"{best[min(m, len(best)) - 1]:.3f}" if best else "-" for m in marks]
            lines.append(f"| {method}, seed {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small seed (CI smoke test)")
    parser.add_argument("--seeds", type=int, help="searcher seeds per method (default 3)")
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    parser.add_argument("--keep", action="store_true", help="keep the study folders")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    seeds = args.seeds or (1 if args.quick else 3)
    budget = size.random_trials * size.max_t
    folder = SCRATCH / f"efficiency-{'quick' if args.quick else 'full'}-{os.getpid()}"
    folder.mkdir(parents=True)
    results: dict[str, list[list[float]]] = {"tpe+asha": [], "random": []}
    walls: dict[str, list[float]] = {"tpe+asha": [], "random": []}
    used: dict[str, list[int]] = {"tpe+asha": [], "random": []}  # epochs, past the budget too
    try:
        for seed in range(seeds):
            for method in ("random", "tpe+asha"):  # interleaved: both see the same load
                space = write_space(folder, method, seed, size)
                name = load_yaml_file(space)["name"]
                times = run_study(space, folder, folder / f"{name}.log", timeout=1500)
                best = curve(folder / name, name)
                results[method].append(best[:budget])
                walls[method].append(times["driver"])
                used[method].append(len(best))
                print(f"{name}: {len(best)} epochs, best {best[-1]:.3f}, {times['driver']:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    summary = summarise(results, budget)
    summary["epochs_run"] = used
    print(table(results, budget))
    print(json.dumps(summary, indent=1))
    if args.plot:
        plot(results, budget, args.plot)
        print(f"plot: {args.plot}")
    print(row(summary, size, seeds, walls, argv))


def summarise(results: dict[str, list[list[float]]], budget: int) -> dict[str, Any]:
    """Per seed: random's final best, the epochs TPE + ASHA took to reach it (None: never)."""
    per_seed = []
    for ours, random in zip(results["tpe+asha"], results["random"], strict=True):
        reached = epochs_to_reach(ours, random[-1])
        per_seed.append(
            {
                "random_final": random[-1],
                "ours_final": ours[-1],
                "ours_epochs_to_random_final": reached,
                "share_of_budget": None if reached is None else reached / budget,
            }
        )
    shares = [s["share_of_budget"] for s in per_seed]
    met = sum(1 for s in shares if s is not None and s <= GOAL)
    return {"budget": budget, "seeds": per_seed, "seeds_meeting_goal": met}


def row(summary: dict[str, Any], size: Size, seeds: int, walls: dict, argv: list | None) -> str:
    shares = [
        "never" if s["share_of_budget"] is None else f"{s['share_of_budget']:.0%}"
        for s in summary["seeds"]
    ]
    finals = {
        m: np.mean([s[f"{k}_final"] for s in summary["seeds"]])
        for m, k in (("ours", "ours"), ("random", "random"))
    }
    command = " ".join(
        ["python bench/bench_efficiency.py", *(sys.argv[1:] if argv is None else argv)]
    )
    minutes = sum(sum(w) for w in walls.values()) / 60
    verdict = "met" if summary["seeds_meeting_goal"] == seeds else "not met"
    return (
        f"| B5 search efficiency (xd-mini x{size.scale:g}, tiny DSANet, {summary['budget']} "
        f"epochs, {seeds} seed(s)) | `{command}` | {machine()} | {datetime.date.today()} "
        f"| TPE + ASHA reached random's final best after {', '.join(shares)} of the budget "
        f"(seeds 0-{seeds - 1}); mean final best {finals['ours']:.3f} vs random "
        f"{finals['random']:.3f}; goal <= {GOAL:.0%} in every seed {verdict} "
        f"({summary['seeds_meeting_goal']}/{seeds}); {minutes:.0f} min; "
        f"load {os.getloadavg()[0]:.1f} |"
    )


if __name__ == "__main__":
    main()
