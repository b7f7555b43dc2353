"""Benchmark B7: search quality at an equal epoch budget, ours against stock Ray and random.

Five methods search the same space with the same trainer, budget and concurrency (2 trials at a
time), once per searcher seed, on one local Ray:

- ours: `tune/run.py` with TPE (told PRUNED) and persistent ASHA;
- stock: Ray's `OptunaSearch` (TPE) + `ASHAScheduler` + `ConcurrencyLimiter` around a function
  trainable that calls `dsanet.trainer.fit` and `tune.report`s each epoch, as Ray's docs show;
- random: `tune/run.py` with random search and no early stopping (every trial runs max_t);
- gp: `tune/run.py` with `searcher.kind: gp` and ASHA;
- promotion: `tune/run.py` with TPE and `scheduler.kind: asha-promotion`.

    python bench/bench_search_quality.py [--quick] [--seeds N] [--methods a,b] [--plot PNG]
                                         [--json FILE]

The data is synthetic xd-mini at scale 2 (its 0.2 validation split holds 63 videos), the
model the tests' tiny DSANet at the demo's T = 32. Epochs consumed are each study's
`reports.jsonl` lines in time order, the best validation AP so far is the maximum over them;
curves stop at the budget (the random study's epochs). Each method's chosen configuration (ours:
the best complete trial; stock: `ResultGrid.get_best_result()`) is retrained once on every
training video and tested. The rank agreement between epoch k and max_t comes from the random
studies, whose trials all run max_t epochs. `--json FILE` keeps each study's figures as it ends
and skips the studies it already holds, so an interrupted run continues. `--quick` is a small
smoke run of every method (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml
from bench_search import SCRATCH, attempts, read_reports, small_tree, tiny_overrides, utilisation
from common import machine  # bench/ is the script's folder, first on sys.path

from dsanet.config import flatten

REPO = Path(__file__).resolve().parents[1]
METHODS = ("random", "stock", "ours", "gp", "promotion")
LABELS = {
    "ours": "ours: TPE + ASHA",
    "stock": "stock Ray: OptunaSearch + ASHAScheduler",
    "random": "random + FIFO",
    "gp": "ours: GP + ASHA",
    "promotion": "ours: TPE + promotion ASHA",
}
COLOURS = {"ours": "tab:blue", "stock": "tab:red", "random": "tab:orange", "gp": "tab:green",
           "promotion": "tab:purple"}  # fmt: skip
GOAL = 0.70  # ours reaches stock's final best within this share of the budget (median seed)
SLOTS = 2


@dataclass(frozen=True)
class Size:
    scale: float  # xd-mini video counts
    max_t: int  # epochs of a full trial
    steps: int  # training steps of batch 8 per epoch
    reduction_factor: int
    random_trials: int  # the budget: random_trials * max_t epochs
    asha_trials: int  # enough for the early-stopping methods to use the budget
    startup_trials: int  # TPE's random start (ours, stock, promotion)
    gp_startup: int  # GPSampler's; under ASHA at most the trials that can complete
    grace_period: int = 1  # ASHA's first rung (epochs)

    @property
    def budget(self) -> int:
        return self.random_trials * self.max_t


FULL = Size(scale=2.0, max_t=4, steps=3, reduction_factor=2, random_trials=8, asha_trials=18,
            startup_trials=5, gp_startup=4)  # fmt: skip
QUICK = Size(scale=0.5, max_t=2, steps=2, reduction_factor=2, random_trials=2, asha_trials=4,
             startup_trials=2, gp_startup=1)  # fmt: skip
SEARCH = {
    "optim.lr": {"low": 1.0e-5, "high": 3.0e-3, "log": True},
    "model.num_prototypes": [4, 8, 16],
    "model.normal_ratio": {"low": 0.5, "high": 0.95},
    "text.adapt_layers": [0, 1],  # the tiny tower has 1 layer
    "text.adapter_weight": {"low": 0.05, "high": 0.8},
    "loss.w_align": {"low": 0.5, "high": 10.0, "log": True},
}


# ---------------------------------------------------------------------------- the studies


def write_space(folder: Path, method: str, seed: int, size: Size) -> Path:
    """One study's space file: the shared search block, the method's searcher and scheduler.
    The stock leg reads the same file for its base config and search block."""
    name = f"b7-{method}-s{seed}"
    overrides = tiny_overrides(small_tree(size.scale), size.max_t, size.steps)
    overrides.update({"model.visual_length": 32, "model.attn_window": 8})  # the demo's T
    asha = {"kind": "asha", "max_t": size.max_t, "grace_period": size.grace_period,
            "reduction_factor": size.reduction_factor}  # fmt: skip
    searcher = {"kind": "tpe", "seed": seed, "n_startup_trials": size.startup_trials}
    scheduler, trials = asha, size.asha_trials
    if method == "random":
        searcher, scheduler = {"kind": "random", "seed": seed}, {"kind": "none"}
        trials = size.random_trials
    elif method == "gp":
        searcher = {"kind": "gp", "seed": seed, "n_startup_trials": size.gp_startup}
    elif method == "promotion":
        scheduler = {**asha, "kind": "asha-promotion"}
    space = {
        "name": name,
        "base": "demo",
        "overrides": overrides,
        "search": SEARCH,
        "metric": "val_ap",
        "mode": "max",
        "searcher": searcher,
        "scheduler": scheduler,
        "num_samples": trials,
        "max_concurrent": SLOTS,
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"tracking_uri": "", "experiment": name},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


class FitTimer:
    """Times `Tuner.fit` (start, end) around any study run in this process."""

    def __init__(self) -> None:
        from ray import tune

        self.times: dict[str, float] = {}
        fit = tune.Tuner.fit

        def timed(tuner: Any, *args: Any, **kwargs: Any) -> Any:
            self.times["start"] = time.time()
            try:
                return fit(tuner, *args, **kwargs)
            finally:
                self.times["end"] = time.time()

        tune.Tuner.fit = timed


def run_ours(space: Path, folder: Path, log: TextIO) -> tuple[Path, Any]:
    """The study through `tune.driver.main` (what `tune/run.py` runs) on the Ray already up,
    its output to `log`; returns its folder and its chosen config (the best complete trial's)."""
    import optuna

    from tune.driver import main
    from tune.report import best_config
    from tune.searcher import storage_uri
    from tune.space import load_space

    spec = load_space(space)
    argv = ["--space", str(space), "--storage-path", str(folder), "--final-seeds", "0"]
    # One file for every study: the driver's log handlers keep the stream they were given.
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"{spec.name} exited with {code}; see {log.name}")
    root = folder / spec.name
    study = optuna.load_study(study_name=spec.name, storage=storage_uri(root))
    return root, best_config(study, spec)


def ray_param_space(search: dict[str, Any]) -> dict[str, Any]:
    """The search block as Ray Tune domains, as a Ray user writes it."""
    from ray import tune

    space = {}
    for name, rule in search.items():
        if isinstance(rule, list):
            space[name] = tune.choice(rule)
        elif rule.get("log"):
            space[name] = tune.loguniform(rule["low"], rule["high"])
        else:
            space[name] = tune.uniform(rule["low"], rule["high"])
    return space


def stock_trial(config: dict[str, Any], space: str, trials: str) -> None:
    """The stock leg's function trainable: fit the sampled config, `tune.report` each epoch.

    Each epoch also goes to `<trials>/<trial id>/reports.jsonl` (the same lines as ours) for
    the epoch count; no checkpoints, as Ray's ASHA example (stopping needs none)."""
    entered = time.time()
    from ray import tune

    from dsanet.trainer import fit
    from tune.space import load_space, trial_config
    from tune.trainable import append_report

    out = Path(trials) / tune.get_context().get_trial_id()
    cfg = trial_config(load_space(space), config).with_overrides({"train.out_dir": str(out)})
    marks = [{"entered": entered}]  # on the first line only, as ours writes it

    def report(record: dict[str, float], out_dir: Path) -> bool:
        append_report(out_dir, record, marks.pop() if marks else None)
        tune.report({"val_ap": record["val_ap"], "epoch": int(record["epoch"]) + 1})
        return False

    fit(cfg, report, resume=False, test=False)


def run_stock(space: Path, folder: Path, seed: int, size: Size) -> tuple[Path, Any]:
    """Stock Ray on the same space file, trainer, budget and concurrency; returns the study
    folder and the config of `ResultGrid.get_best_result()` (Ray's default: each trial's last
    result)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import load_space, trial_config

    spec = load_space(space)
    root = folder / spec.name
    (root / "trials").mkdir(parents=True)
    # TPE with the same seed and random start-up as ours; everything else at its default.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=size.startup_trials)
    searcher = ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=SLOTS)
    scheduler = ASHAScheduler(
        max_t=size.max_t, grace_period=size.grace_period, reduction_factor=size.reduction_factor
    )
    trainable = tune.with_parameters(stock_trial, space=str(space), trials=str(root / "trials"))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=ray_param_space(SEARCH),
        tune_config=tune.TuneConfig(
            metric="val_ap",
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=size.asha_trials,
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(root / "ray"), verbose=0),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{spec.name}: {len(grid.errors)} trial(s) failed: {grid.errors[0]}")
    return root, trial_config(spec, grid.get_best_result().config)


def test_chosen(cfg: Any, root: Path) -> dict[str, float]:
    """Retrain the chosen config once on every training video (the final stage's protocol,
    seed train.seed) and return its test metrics."""
    from dsanet.trainer import RESULT
    from tune.final import final_configs, fit_seed

    [(_, final)] = final_configs(cfg, root, 1).items()
    out = Path(fit_seed(final))
    test = json.loads((out / RESULT).read_text())["test"]
    return {"auc": float(test["auc"]), "ap": float(test["ap"])}


def study_figures(root: Path, fit_times: dict[str, float], max_t: int) -> dict[str, Any]:
    """From the trials' reports.jsonl: validation AP per epoch in time order, each trial's AP
    by epoch, and slot utilisation over Tuner.fit."""
    reports = read_reports(root)
    lines = sorted((line for trial in reports.values() for line in trial), key=lambda x: x["time"])
    per_trial = {
        trial: {int(line["epoch"]) + 1: line["metrics"]["val_ap"] for line in trial_lines}
        for trial, trial_lines in reports.items()
    }
    slots = utilisation(attempts(reports), SLOTS, fit_times["start"], fit_times["end"])
    return {
        "aps": [line["metrics"]["val_ap"] for line in lines],
        "full_trials": [
            [aps[e] for e in range(1, max_t + 1)]
            for aps in per_trial.values()
            if all(e in aps for e in range(1, max_t + 1))
        ],
        "trials": len(reports),
        "utilisation": slots["utilisation"],
        "without_drain": slots["without_drain"],
        "fit_wall": fit_times["end"] - fit_times["start"],
    }


def run_one(
    method: str, seed: int, size: Size, folder: Path, timer: FitTimer, log: TextIO
) -> dict[str, Any]:
    started = time.time()
    space = write_space(folder, method, seed, size)
    if method == "stock":
        root, chosen = run_stock(space, folder, seed, size)
    else:
        root, chosen = run_ours(space, folder, log)
    figures = study_figures(root, timer.times, size.max_t)
    figures["test"] = test_chosen(chosen, root) if chosen is not None else None
    figures["chosen"] = {k: flatten(chosen)[k] for k in SEARCH} if chosen else None
    figures["wall"] = time.time() - started
    return figures


def start_ray() -> Path:
    """One local Ray for every study: 2 CPUs, this repository and bench/ importable."""
    import ray

    bench = Path(__file__).resolve().parent
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(bench)])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # as tune/run.py sets it
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "1e9")
    temp = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))  # Unix sockets need short paths
    ray.init(
        address="local",
        num_cpus=SLOTS,
        include_dashboard=False,
        _temp_dir=str(temp),
        log_to_driver=False,
        logging_level="WARNING",
    )
    return temp


# ---------------------------------------------------------------------------- the figures


def best_so_far(aps: list[float], budget: int) -> list[float]:
    """The best AP after each of the first `budget` epochs (held flat past a study's last)."""
    values = np.nan_to_num(np.array(aps[:budget], dtype=float), nan=-np.inf)
    best = np.maximum.accumulate(values).tolist() if len(values) else []
    return best + best[-1:] * (budget - len(best))


def epochs_to_reach(best: list[float], target: float) -> int | None:
    return next((i + 1 for i, ap in enumerate(best) if ap >= target), None)


def rank_agreement(full_trials: list[list[float]]) -> dict[int, dict[str, float]]:
    """Between each epoch k and max_t over trials that ran every epoch: Spearman's rho, and the
    share of the top half at epoch k still in the top half at max_t."""
    from scipy.stats import spearmanr

    aps = np.nan_to_num(np.array(full_trials, dtype=float), nan=0.0)  # (trials, max_t)
    last, half = aps[:, -1], max(1, len(aps) // 2)
    top_last = set(np.argsort(-last, kind="stable")[:half])
    out = {}
    for k in range(1, aps.shape[1]):
        rho = spearmanr(aps[:, k - 1], last).statistic
        top_k = set(np.argsort(-aps[:, k - 1], kind="stable")[:half])
        out[k] = {"spearman": float(rho), "top_half_kept": len(top_k & top_last) / half}
    return out


def summarise(results: dict[str, dict[str, Any]], methods: list[str], seeds: int, size: Size):
    budget = size.budget
    curves = {
        m: [best_so_far(results[f"{m}/{s}"]["aps"], budget) for s in range(seeds)] for m in methods
    }
    summary: dict[str, Any] = {"budget": budget, "methods": {}}
    reference = curves.get("stock")
    for m in methods:
        finals = [c[-1] for c in curves[m]]
        tests = [results[f"{m}/{s}"]["test"] for s in range(seeds)]
        entry = {
            "final_best": finals,
            "epochs_used": [len(results[f"{m}/{s}"]["aps"]) for s in range(seeds)],
            "trials": [results[f"{m}/{s}"]["trials"] for s in range(seeds)],
            "test_auc": [t["auc"] if t else None for t in tests],
            "test_ap": [t["ap"] if t else None for t in tests],
            "utilisation": [results[f"{m}/{s}"]["utilisation"] for s in range(seeds)],
        }
        if reference is not None:
            reached = [epochs_to_reach(c, r[-1]) for c, r in zip(curves[m], reference, strict=True)]
            entry["epochs_to_stock_final"] = reached
            shares = [budget + 1 if e is None else e for e in reached]  # never: past the end
            entry["median_share_to_stock_final"] = float(np.median(shares)) / budget
        summary["methods"][m] = entry
    if "random" in methods:
        full = [t for s in range(seeds) for t in results[f"random/{s}"]["full_trials"]]
        summary["rank_agreement"] = {"trials": len(full), "by_epoch": rank_agreement(full)}
    ours = summary["methods"].get("ours", {})
    if "median_share_to_stock_final" in ours:
        summary["goal_met"] = ours["median_share_to_stock_final"] <= GOAL
    return curves, summary


def spread(values: list[float | None], digits: int = 3) -> str:
    """median [min-max] of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


def table(curves: dict[str, list[list[float]]], summary: dict[str, Any]) -> str:
    budget = summary["budget"]
    marks = sorted({max(1, round(budget * f)) for f in (0.125, 0.25, 0.5, 0.7, 1.0)})
    lines = [
        "| method | " + " | ".join(f"{m} ep" for m in marks) + " | epochs to stock's final "
        "best, by seed | test AUC | test AP | slot use |",
        "|---" * (len(marks) + 5) + "|",
    ]
    for m, runs in curves.items():
        entry = summary["methods"][m]
        cells = [spread([c[k - 1] for c in runs]) for k in marks]
        reached = ", ".join(
            "never" if e is None else str(e) for e in entry.get("epochs_to_stock_final", [])
        )
        lines.append(
            f"| {LABELS[m]} | " + " | ".join(cells) + f" | {reached or '-'} | "
            f"{spread(entry['test_auc'])} | {spread(entry['test_ap'])} | "
            f"{spread(entry['utilisation'], 2)} |"
        )
    return "\n".join(lines)


def rank_table(summary: dict[str, Any]) -> str:
    agreement = summary.get("rank_agreement")
    if not agreement:
        return ""
    rows = [f"rank agreement with the last epoch, {agreement['trials']} random-search trials:"]
    for k, entry in agreement["by_epoch"].items():
        rows.append(
            f"  epoch {k}: Spearman {entry['spearman']:.2f}, top half kept "
            f"{entry['top_half_kept']:.0%}"
        )
    return "\n".join(rows)


def plot(curves: dict[str, list[list[float]]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = summary["budget"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = np.arange(1, budget + 1)
    for m, runs in curves.items():
        data = np.array(runs)
        ax.step(x, np.median(data, axis=0), where="post", color=COLOURS[m], label=LABELS[m])
        low, high = np.min(data, axis=0), np.max(data, axis=0)
        ax.fill_between(x, low, high, step="post", color=COLOURS[m], alpha=0.12)
    ax.axvline(GOAL * budget, color="grey", ls="--", lw=1, label=f"{GOAL:.0%} of the budget")
    ax.set_xlim(1, budget)
    ax.set_xlabel("epochs consumed (all trials of a study)")
    ax.set_ylabel("best validation AP so far")
    seeds = len(next(iter(curves.values())))
    ax.set_title(f"B7: median over {seeds} searcher seeds, band = min-max")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def row(summary: dict[str, Any], size: Size, seeds: int, minutes: float, argv: list[str]) -> str:
    methods = summary["methods"]
    command = " ".join(["python bench/bench_search_quality.py", *argv])
    parts = []
    for m, entry in methods.items():
        share = entry.get("median_share_to_stock_final")
        reach = "" if share is None else f", stock's final best at {share:.0%} of the budget"
        parts.append(
            f"{m}: final best {spread(entry['final_best'])}{reach}, test AUC "
            f"{spread(entry['test_auc'])}"
        )
    verdict = ""
    if "goal_met" in summary:
        verdict = f"; goal (ours <= {GOAL:.0%} in the median seed) " + (
            "met" if summary["goal_met"] else "not met"
        )
    return (
        f"| B7 search quality (xd-mini x{size.scale:g}, tiny DSANet, budget {summary['budget']} "
        f"epochs, max_t {size.max_t}, ASHA from epoch {size.grace_period} with reduction factor "
        f"{size.reduction_factor}, {seeds} seed(s)) | `{command}` | {machine()} | "
        f"{datetime.date.today()} | "
        + "; ".join(parts)
        + f"{verdict}; {minutes:.0f} min; load {os.getloadavg()[0]:.1f} |"
    )


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run of every method (CI)")
    parser.add_argument("--seeds", type=int, help="searcher seeds per method (default 5)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    parser.add_argument(
        "--grace-period", type=int, default=1, help="ASHA's first rung in epochs (default 1)"
    )
    parser.add_argument("--json", type=Path, help="keep each study's figures here; continue")
    parser.add_argument("--keep", action="store_true", help="keep the study folders")
    args = parser.parse_args(argv)
    size = dataclasses.replace(QUICK if args.quick else FULL, grace_period=args.grace_period)
    if not 1 <= size.grace_period < size.max_t:
        parser.error(f"--grace-period: give 1 to {size.max_t - 1} (max_t is {size.max_t})")
    seeds = args.seeds or (1 if args.quick else 5)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    results: dict[str, Any] = {}
    if args.json and args.json.is_file():
        saved = json.loads(args.json.read_text())
        if {"grace_period": 1, **saved.get("size", {})} != asdict(size):
            parser.error(f"--json {args.json} holds studies of another size; give a new file")
        results = saved["studies"]
        print(f"continuing {args.json}: {len(results)} studies done")
    folder = SCRATCH / f"quality-{'quick' if args.quick else 'full'}-{os.getpid()}"
    folder.mkdir(parents=True)
    small_tree(size.scale)  # generated once, before any study times
    temp = start_ray()
    timer = FitTimer()
    log = (folder / "studies.log").open("a")
    started, finished = time.time(), False
    try:
        for seed in range(seeds):
            for method in methods:  # interleaved, so that every method sees the same load
                key = f"{method}/{seed}"
                if key in results:
                    continue
                results[key] = run_one(method, seed, size, folder, timer, log)
                r = results[key]
                print(
                    f"{key}: {len(r['aps'])} epochs in {r['trials']} trials, best "
                    f"{max(r['aps']):.3f}, test AUC {r['test']['auc'] if r['test'] else '-'}, "
                    f"slot use {r['utilisation']:.2f}, {r['wall']:.0f} s",
                    flush=True,
                )
                if args.json:
                    text = json.dumps({"size": asdict(size), "studies": results}, indent=1)
                    tmp = args.json.with_suffix(".tmp")
                    tmp.write_text(text)
                    tmp.replace(args.json)
        finished = True
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        log.flush()
        if args.keep or not finished:
            print(f"study folders and studies.log kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    curves, summary = summarise(results, methods, seeds, size)
    print(table(curves, summary))
    print(rank_table(summary))
    print(json.dumps(summary, indent=1))
    if args.plot:
        plot(curves, summary, args.plot)
        print(f"plot: {args.plot}")
    print(row(summary, size, seeds, (time.time() - started) / 60, argv))


if __name__ == "__main__":
    main()
