"""Final stage: retrain the best config from scratch on every training video with N seeds,
test each model once, and write mean ± std to `final/summary.json` (the MLflow view shows it on
the study's parent run, and each seed as a nested run).

Seeds run as Ray tasks with the space's per-trial resources when Ray is initialised, else one
after another in this process. A seed whose `result.json` exists is not trained again. Each
seed appends every epoch to its `reports.jsonl` as it trains, and the driver has the MLflow view
write what the seeds did while it waits for them, so their runs show each epoch as it ends.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dsanet.config import ExperimentConfig
from dsanet.files import json_text, write_atomic
from dsanet.metrics import AP, AUC, MAP_AVG, MAP_AVG_CORRECTED
from dsanet.plots import write_test_plots
from dsanet.runs import load_run
from dsanet.trainer import BEST, CHECKPOINT, RESULT, fit
from tune.layout import StudyFolder
from tune.space import SpaceSpec
from tune.tracking import MlflowView
from tune.trainable import append_report, quiet_random_weights, worker_logging

log = logging.getLogger(__name__)

SUMMARY_METRICS = (AUC, AP, MAP_AVG, MAP_AVG_CORRECTED)
WATCH_S = 5.0  # how often the driver has the view write the seeds' progress to MLflow


def final_configs(
    best_config: ExperimentConfig, study_dir: Path, seeds: int
) -> dict[int, ExperimentConfig]:
    """Seed -> retrain config: protocol final (every training video, the last epoch), seeds
    train.seed, train.seed + 1, ..., each in `<study_dir>/final/seed_<seed>`."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: the final stage needs at least 1 seed (default 3)")
    base = best_config.train.seed
    return {
        seed: best_config.with_overrides(
            {
                "data.protocol": "final",
                "data.val_fraction": 0.0,
                "train.seed": seed,
                "train.out_dir": str(StudyFolder(Path(study_dir).resolve()).seed_dir(seed)),
            }
        )
        for seed in range(base, base + seeds)
    }


def run_final_stage(
    spec: SpaceSpec,
    best_config: ExperimentConfig,
    study_dir: Path,
    view: MlflowView,
    seeds: int = 3,
) -> dict[str, float]:
    """Retrain and test; the summary (`final_<metric>_mean`, `final_<metric>_std`, sample std
    over seeds) goes to `final/summary.json`, the test plots of the first seed to
    `report/best/`, and MLflow shows them."""
    configs = final_configs(best_config, study_dir, seeds)
    results = train_seeds(configs, spec, view)
    summary = seed_summary([results[s]["test"] for s in configs])
    path, text = StudyFolder(study_dir).final_summary, json_text(summary)
    if not path.is_file() or path.read_text() != text:  # its time stamps the parent's metrics
        write_atomic(path, text)
    quiet_random_weights()  # the plots build a model in this process too
    first = load_run(configs[min(configs)].train.out_dir)
    write_test_plots(first, StudyFolder(study_dir).report_dir("best"))
    print(format_table({s: results[s]["test"] for s in configs}, summary))
    view.sync()
    return summary


def train_seeds(
    configs: Mapping[int, ExperimentConfig], spec: SpaceSpec, view: MlflowView
) -> dict[int, dict]:
    """Fit every seed that has no result.json yet; return each seed's result.json.

    Every seed runs to its end even when another fails: the view marks a failed seed FAILED,
    and the first failure is raised once all have ended."""
    todo = {s: c for s, c in configs.items() if not (Path(c.train.out_dir) / RESULT).is_file()}
    for seed in configs.keys() - todo.keys():
        log.info("final stage: seed %d already trained (%s), not retrained", seed, RESULT)
    ray = sys.modules.get("ray")  # not imported means not initialised
    failures: list[BaseException] = []
    if todo and ray is not None and ray.is_initialized():
        task = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(_fit_in_worker)
        running = {task.remote(cfg): seed for seed, cfg in todo.items()}
        while running:
            ended, _ = ray.wait(list(running), timeout=WATCH_S)
            for ref in ended:
                seed = running.pop(ref)
                _settle(seed, lambda ref=ref: ray.get(ref), view, failures)
            view.sync_seeds()
    else:
        for seed, cfg in todo.items():
            _settle(seed, lambda cfg=cfg: fit_seed(cfg, view.sync_seeds), view, failures)
            view.sync_seeds()
    if failures:
        raise failures[0]
    return {
        seed: json.loads((Path(cfg.train.out_dir) / RESULT).read_text())
        for seed, cfg in configs.items()
    }


def _settle(seed: int, outcome: Callable[[], Any], view: MlflowView, failures: list) -> None:
    """Wait for one seed's `outcome`; a failure is told to the view and kept in `failures`."""
    try:
        outcome()
    except Exception as exc:  # the seed's error (a Ray task's is re-raised by ray.get)
        log.error("final stage: seed %d failed: %s", seed, exc)
        view.seed_failed(seed, f"{type(exc).__name__}: {exc}")
        failures.append(exc)


def _fit_in_worker(cfg: ExperimentConfig) -> str:
    """`fit_seed` as a Ray task: the worker prints this project's warnings once, as trials do."""
    worker_logging()
    return fit_seed(cfg)


def fit_seed(cfg: ExperimentConfig, after_epoch: Callable[[], Any] | None = None) -> str:
    """One retrain (a Ray task or a plain call); resumes from its last.pt if interrupted.

    Each epoch goes to the seed's reports.jsonl as it ends, then `after_epoch` is called.
    Once its result.json is written the seed is never trained again, so last.pt (optimiser
    state included, 3.5x the weights) goes; best.pt holds the last epoch's weights.
    """

    def report(record: dict[str, float], out_dir: Path) -> bool:
        append_report(out_dir, record)
        if after_epoch is not None:
            after_epoch()
        return False  # the final stage trains every epoch

    log.info("final stage: training seed %d in %s", cfg.train.seed, cfg.train.out_dir)
    out = fit(cfg, report).out_dir
    if (out / RESULT).is_file() and (out / BEST).is_file():
        (out / CHECKPOINT).unlink(missing_ok=True)
    return str(out)


def seed_summary(tests: list[Mapping[str, float]]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of the summary metrics."""
    summary: dict[str, float] = {}
    for key in SUMMARY_METRICS:
        values = np.array([t[key] for t in tests if key in t], dtype=np.float64)
        if len(values) == 0:
            continue
        summary[f"final_{key}_mean"] = float(values.mean())
        summary[f"final_{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary


def format_table(tests: Mapping[int, Mapping[str, float]], summary: Mapping[str, float]) -> str:
    """Per-seed test metrics and mean ± std (all fractions in [0, 1], mAP too)."""
    keys = [k for k in SUMMARY_METRICS if f"final_{k}_mean" in summary]
    lines = [
        f"Final stage: best config retrained on every training video, {len(tests)} seed(s), "
        "test set",
        f"{'seed':>10}" + "".join(f"{k:>20}" for k in keys),
    ]
    for seed, test in tests.items():
        lines.append(f"{seed:>10}" + "".join(f"{test[k]:>20.4f}" for k in keys))
    cells = [f"{summary[f'final_{k}_mean']:.4f} ± {summary[f'final_{k}_std']:.4f}" for k in keys]
    lines.append(f"{'mean ± std':>10}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)
