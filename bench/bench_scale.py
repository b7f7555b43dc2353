"""Benchmark B8: a study of thousands of trials, and which costs grow with its size.

    python bench/bench_scale.py [--quick] [--trials N] [--json OUT]

Three legs run one after the other, each in a fresh Python with its own local Ray (64 fake GPUs,
trials of gpu 1 / cpu 0.1, 16 at a time) and its own `mlflow server` on 127.0.0.1:
- `tune-pg`: the real search (tune.driver: OptunaSearcher, persistent ASHA, the MLflow view,
  tune.trainable.run_trial) over a space derived from search_spaces/demo.yaml; each worker's
  `dsanet.trainer.fit` is the simulated trainer of bench/sim_trainer.py (Ray's
  worker_process_setup_hook), with MLflow on PostgreSQL;
- `stock-pg`: stock Ray, as its docs show it (a function trainable calling tune.report,
  OptunaSearch, ASHAScheduler, MLflowLoggerCallback) on the same simulated curve, same
  concurrency and trial count, MLflow on PostgreSQL;
- `tune-sqlite`: the real search again, MLflow on SQLite.

Each leg reports wall time against the ideal (Σ epoch sleeps / slots), the driver's CPU seconds
per trial, the wall overhead per trial ((wall - ideal) / trials) in the first and the last tenth
of the trials, the latency of the searcher's and MLflow's calls, the size of every store, and
checks that every trial is in Optuna and in MLflow exactly once with every epoch.
PostgreSQL runs from tests/tune/postgres.py, the MLflow server from tests/tune/conftest.py.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dsanet.yamlio import load_yaml_file

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRATCH = Path(os.environ.get("DSANET_BENCH_SCRATCH", "/work/scratch/bench7"))
SLOTS = 16
GOAL_OVERHEAD_MS = 15.0  # per trial, over stock Ray's
GOAL_GROWTH = 1.5  # last tenth / first tenth of the trials
EXPERIMENT = "scale"


# ---------------------------------------------------------------------------- the space


def stock_space() -> dict[str, Any]:
    """The demo space's parameters as a stock Ray user writes them (ray.tune samplers)."""
    from ray import tune

    return {
        "optim.lr": tune.loguniform(1e-5, 1e-3),
        "model.num_prototypes": tune.choice([4, 8, 16]),
        "model.normal_ratio": tune.uniform(0.5, 0.95),
        "text.adapt_layers": tune.choice([0, 1, 2]),
        "text.adapter_weight": tune.uniform(0.05, 0.8),
        "loss.w_align": tune.loguniform(0.5, 10.0),
    }


def scale_space(folder: Path, trials: int, tracking_uri: str) -> Path:
    """search_spaces/demo.yaml with N trials, 16 at a time on gpu 1 / cpu 0.1, no final stage."""
    space = load_yaml_file(REPO / "search_spaces" / "demo.yaml")
    space["overrides"] = {**space.get("overrides", {}), "train.device": "auto"}
    space.update(
        name="scale",
        num_samples=trials,
        max_concurrent=SLOTS,
        resources={"cpu": 0.1, "gpu": 1},
        final_seeds=0,
        mlflow={"tracking_uri": tracking_uri, "experiment": EXPERIMENT},
        storage_path=str(folder / "studies"),
    )
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- timing hooks

CALLS: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)  # (at, seconds)


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap `owner.name` so each call's duration is recorded under `label`."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            CALLS[label].append((time.time(), time.perf_counter() - start))

    setattr(owner, name, wrapper)


def instrument_common() -> None:
    """Optuna's ask/tell and per-epoch writes, MLflow's HTTP requests, ASHA's decisions; the
    driver's quiet logging (warnings of third parties only, no MLflow run links)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow.utils.rest_utils as rest
    import optuna
    from ray.tune.schedulers import AsyncHyperBandScheduler

    timed(optuna.study.Study, "ask", "optuna.ask")
    timed(optuna.study.Study, "tell", "optuna.tell")
    timed(optuna.trial.Trial, "report", "optuna.report")
    timed(optuna.trial.Trial, "set_user_attr", "optuna.set_user_attr")
    original = rest.http_request

    def http_request(host_creds: Any, endpoint: str, method: str, *args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(host_creds, endpoint, method, *args, **kw)
        finally:
            name = endpoint.rsplit("/mlflow/", 1)[-1]
            CALLS["mlflow.http"].append((time.time(), time.perf_counter() - start))
            CALLS[f"mlflow.http {method} {name}"].append((time.time(), time.perf_counter() - start))

    rest.http_request = http_request
    timed(AsyncHyperBandScheduler, "on_trial_result", "asha.on_trial_result")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def call_stats(trials: int) -> dict[str, Any]:
    """Per label: calls, mean and p95 in ms, and the mean of the first and last tenth of calls."""
    out = {}
    for label, calls in sorted(CALLS.items()):
        seconds = [s for _, s in sorted(calls)]
        tenth = max(1, len(seconds) // 10)
        out[label] = {
            "calls": len(seconds),
            "per_trial": len(seconds) / trials,
            "mean_ms": 1000 * statistics.fmean(seconds),
            "p95_ms": 1000 * _quantile(seconds, 0.95),
            "first_tenth_ms": 1000 * statistics.fmean(seconds[:tenth]),
            "last_tenth_ms": 1000 * statistics.fmean(seconds[-tenth:]),
            "total_s": sum(seconds),
        }
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------- Ray


def start_ray(folder: Path, hook: str | None) -> Path:
    """A local Ray of this leg: 2 CPUs (the machine's), 64 fake GPUs, bench/ importable."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH)])
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # Unix sockets need short paths
    runtime_env = {"worker_process_setup_hook": hook} if hook else None
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=64,
        include_dashboard=False,
        _temp_dir=str(temp),
        runtime_env=runtime_env,
        logging_level="WARNING",
    )
    return temp


def timed_tuner_fit(times: dict[str, float]) -> None:
    from ray import tune

    fit = tune.Tuner.fit

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        times["fit_start"] = time.time()
        try:
            return fit(self, *args, **kwargs)
        finally:
            times["fit_end"] = time.time()

    tune.Tuner.fit = wrapper


# ---------------------------------------------------------------------------- leg: tune/


def leg_tune(folder: Path, trials: int, uri: str) -> dict[str, Any]:
    """The real search on the simulated trainer; returns its figures and checks."""
    import ray

    from tune.driver import run_study
    from tune.plan import prepare

    space = scale_space(folder, trials, uri)
    args = argparse.Namespace(
        space=str(space), overrides=[], final_seeds=0, resume=False, address=None,
        storage_path=None, num_samples=None, dry_run=False,
    )  # fmt: skip
    plan = prepare(args)  # before Ray, as the driver: the synthetic data and its cache
    temp = start_ray(folder, "sim_trainer.install")
    instrument_common()
    from tune.searcher import OptunaSearcher
    from tune.tracking import MlflowView

    for hook in ("suggest", "on_trial_result", "on_trial_complete", "_frozen"):
        timed(OptunaSearcher, hook, f"searcher.{hook}")
    for hook in ("on_trial_start", "on_trial_result", "on_trial_complete"):
        timed(MlflowView, hook, f"mlflow_callback.{hook}")
    times: dict[str, float] = {}
    timed_tuner_fit(times)
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.time()
    try:
        code = run_study(plan)
    finally:
        cpu1, end = resource.getrusage(resource.RUSAGE_SELF), time.time()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    root = plan.root
    epochs = tune_epochs(root)
    figures = {
        "exit": code,
        "driver_wall": end - start,
        "driver_cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        **times,
        **overhead(epochs, times["fit_start"], times["fit_end"]),
        "calls": call_stats(trials),
        "checks": check_tune(root, trials, epochs, uri),
        "stores": {
            "optuna.db": _size(root / "optuna.db"),
            "trials/": _size(root / "trials"),
            "ray/": _size(root / "ray"),
            "study folder (without data/)": _size(root) - _size(root / "data"),
        },
    }
    return figures


def tune_epochs(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's reports.jsonl lines, by Optuna number (its folder's name)."""
    found = {}
    for path in (root / "trials").glob("*/reports.jsonl"):
        found[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return found


def check_tune(root: Path, trials: int, epochs: dict, uri: str) -> dict[str, Any]:
    """Every trial once in Optuna (finished, epochs 1..k told once) and in MLflow (one run,
    val_ap at steps 0..k-1 once each, k as in its reports.jsonl)."""
    import optuna

    from tune.searcher import FINISHED, STUDY_ID_ATTR, epoch_records

    study = optuna.load_study(study_name="scale", storage=f"sqlite:///{root / 'optuna.db'}")
    got = study.get_trials(deepcopy=False)
    problems = []
    by_number: dict[int, int] = {}
    for t in got:
        k = len(epoch_records(t))
        lines = [line["epoch"] for line in epochs.get(str(t.number), [])]
        if t.state not in FINISHED:
            problems.append(f"optuna trial {t.number} is {t.state.name}")
        if sorted(epoch_records(t)) != list(range(1, k + 1)):
            problems.append(f"optuna trial {t.number} epochs {sorted(epoch_records(t))}")
        if sorted(t.intermediate_values) != list(range(1, k + 1)):
            problems.append(f"optuna trial {t.number} intermediate values")
        if lines != list(range(k)):
            problems.append(f"trial {t.number} reports {lines} for {k} epochs")
        by_number[t.number] = k
    runs = mlflow_trial_steps(uri, study.user_attrs[STUDY_ID_ATTR])
    for number, k in by_number.items():
        steps = runs.get(number)
        if steps is None:
            problems.append(f"no MLflow run for trial {number}")
        elif steps["runs"] != 1 or steps["steps"] != list(range(k)):
            problems.append(f"MLflow trial {number}: {steps['runs']} runs, steps {steps['steps']}")
    extra = set(runs) - set(by_number)
    if extra:
        problems.append(f"MLflow runs of unknown trials {sorted(extra)[:5]}")
    return {
        "optuna_trials": len(got),
        "mlflow_runs": sum(r["runs"] for r in runs.values()),
        "epochs": sum(by_number.values()),
        "expected_trials": trials,
        "exactly_once": not problems and len(got) == trials,
        "problems": problems[:20],
    }


def mlflow_trial_steps(uri: str, study_id: str) -> dict[int, dict[str, Any]]:
    """{Optuna number: {"runs": runs of that trial, "steps": val_ap steps, in order, duplicates
    kept}} of the study's child runs, through MLflow's client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    query = f"tags.`dsanet.study` = '{study_id}'"
    found: dict[int, dict[str, Any]] = {}
    for run in _all_runs(client, experiment, query):
        number = run.data.tags.get("dsanet.optuna_trial")
        if number is None:
            continue  # the parent
        entry = found.setdefault(int(number), {"runs": 0, "steps": []})
        entry["runs"] += 1
        history = client.get_metric_history(run.info.run_id, "val_ap")
        entry["steps"] = sorted(m.step for m in history)
    return found


def _all_runs(client: Any, experiment: str, query: str = "") -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


# ---------------------------------------------------------------------------- leg: stock Ray


def stock_trainable(config: dict[str, Any]) -> None:
    """Ray's documented function trainable: train, `tune.report` each epoch."""
    from ray import tune
    from sim_trainer import epoch_record

    context = tune.get_context()
    log, best = Path(config["_log"]), float("-inf")
    entered = time.time()
    for epoch in range(config["_max_t"]):
        record, ap = epoch_record(config, epoch, best)
        best = max(best, ap)
        line = {"trial": context.get_trial_name(), "epoch": epoch, "time": time.time(),
                "seconds": record["seconds"], "pid": os.getpid()}  # fmt: skip
        if epoch == 0:
            line["entered"] = entered
        with open(log, "a") as handle:  # one short append per epoch, as run_trial's report line
            handle.write(json.dumps(line) + "\n")
        tune.report(record)


def leg_stock(folder: Path, trials: int, uri: str) -> dict[str, Any]:
    import optuna
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    spec = load_yaml_file(REPO / "search_spaces" / "demo.yaml")
    sched = spec["scheduler"]
    temp = start_ray(folder, None)
    instrument_common()
    for hook in ("suggest", "on_trial_result", "on_trial_complete"):
        timed(OptunaSearch, hook, f"searcher.{hook}")
    for hook in ("on_trial_start", "on_trial_result", "on_trial_complete"):
        timed(MLflowLoggerCallback, hook, f"mlflow_callback.{hook}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = folder / "stock_epochs.jsonl"
    param_space = {
        **stock_space(),
        "_log": str(log),
        "_max_t": sched["max_t"],
    }
    searcher = OptunaSearch(metric="val_ap", mode="max", seed=0)
    tuner = tune.Tuner(
        tune.with_resources(stock_trainable, {"cpu": 0.1, "gpu": 1}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=SLOTS),
            scheduler=ASHAScheduler(
                metric="val_ap",
                mode="max",
                max_t=sched["max_t"],
                grace_period=sched["grace_period"],
                reduction_factor=sched["reduction_factor"],
            ),
            num_samples=trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="stock",
            storage_path=str(folder / "ray"),
            callbacks=[MLflowLoggerCallback(tracking_uri=uri, experiment_name=EXPERIMENT)],
            verbose=0,
        ),
    )
    times: dict[str, float] = {}
    timed_tuner_fit(times)
    cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.time()
    try:
        results = tuner.fit()
    finally:
        cpu1, end = resource.getrusage(resource.RUSAGE_SELF), time.time()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    epochs: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        epochs.setdefault(line["trial"], []).append(line)
    return {
        "exit": 0 if not results.errors else 1,
        "driver_wall": end - start,
        "driver_cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        **times,
        **overhead(epochs, times["fit_start"], times["fit_end"]),
        "calls": call_stats(trials),
        "checks": check_stock(searcher, trials, epochs, uri),
        "stores": {"ray/": _size(folder / "ray"), "epoch log": _size(log)},
    }


def check_stock(searcher: Any, trials: int, epochs: dict, uri: str) -> dict[str, Any]:
    """Every trial once in Optuna's in-memory study (its intermediate values) and in MLflow
    (one run named after the Ray trial, val_ap at steps 1..k once each)."""
    from mlflow import MlflowClient

    problems = []
    study = searcher._ot_study  # OptunaSearch keeps its study here; read only
    told = collections.Counter(len(t.intermediate_values) for t in study.trials)
    ran = collections.Counter(len(v) for v in epochs.values())
    # OptunaSearch reports epochs from on_trial_result, which Ray skips for the result on
    # which the scheduler stops a trial: such a trial lacks its last epoch in Optuna.
    short = sum((ran - told).values())
    if sum(told.values()) != len(epochs) or told != ran:
        problems.append(
            f"Optuna holds {sum(told.values())} trials for {len(epochs)} run; epochs per trial "
            f"differ ({short} trials lack epochs)"
        )
    unfinished = [t.number for t in study.trials if not t.state.is_finished()]
    if unfinished:
        problems.append(f"Optuna trials not finished: {unfinished[:5]}")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = collections.Counter()
    for run in _all_runs(client, experiment):
        name = run.data.tags.get("trial_name", run.info.run_name)
        runs[name] += 1
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_ap"))
        expected = list(range(1, len(epochs.get(name, [])) + 1))
        if steps != expected:
            problems.append(f"MLflow run {name}: steps {steps}, expected {expected}")
    if set(runs) != set(epochs) or any(n != 1 for n in runs.values()):
        problems.append(f"MLflow has {sum(runs.values())} runs for {len(epochs)} trials")
    return {
        "optuna_trials": len(study.trials),
        "mlflow_runs": sum(runs.values()),
        "epochs": sum(len(v) for v in epochs.values()),
        "optuna_epochs": sum(len(t.intermediate_values) for t in study.trials),
        "expected_trials": trials,
        "exactly_once": not problems and len(study.trials) == trials,
        "problems": problems[:20],
    }


# ---------------------------------------------------------------------------- figures


def overhead(epochs: dict[str, list[dict]], start: float, end: float) -> dict[str, Any]:
    """Wall against the ideal (Σ epoch sleeps / slots), and the wall overhead per trial in each
    tenth of the trials (by their end): (span - their sleeps / slots) / trials. The first tenth
    holds the workers' start (16 Pythons importing their libraries); growth compares the last
    tenth with the second, the first one after that warm-up."""
    trials = sorted(epochs.values(), key=lambda lines: lines[-1]["time"])
    if len(trials) < 20:
        raise ValueError(f"{len(trials)} trials ran: too few to split into tenths")
    slept = sum(line["seconds"] for lines in trials for line in lines)
    ideal = slept / SLOTS
    wall = end - start
    tenth = max(1, len(trials) // 10)

    def window(part: list[list[dict]], since: float) -> float:
        span = part[-1][-1]["time"] - since
        sleeps = sum(line["seconds"] for lines in part for line in lines)
        return 1000 * (span - sleeps / SLOTS) / len(part)

    by_tenth = [
        window(trials[i : i + tenth], trials[i - 1][-1]["time"] if i else start)
        for i in range(0, tenth * 10, tenth)
    ]
    first, last = by_tenth[1], window(trials[-tenth:], trials[-tenth - 1][-1]["time"])
    return {
        **concurrency(trials),
        "trials_run": len(trials),
        "epochs_run": sum(len(lines) for lines in trials),
        "slept_s": slept,
        "fit_wall_s": wall,
        "ideal_s": ideal,
        "overhead_ms_per_trial": 1000 * (wall - ideal) / len(trials),
        "startup_tenth_ms": by_tenth[0],
        "second_tenth_ms": first,
        "last_tenth_ms": last,
        "growth": last / first if first > 0 else float("nan"),
        "by_tenth_ms": by_tenth,
    }


def concurrency(trials: list[list[dict]]) -> dict[str, float]:
    """How many trials were in their trainable at once (entry to last report): the most, and
    the time average; and how long a trial was in it."""
    spans = [(lines[0].get("entered", lines[0]["time"]), lines[-1]["time"]) for lines in trials]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = most = area = 0.0
    last = events[0][0]
    for at, step in events:
        area += now * (at - last)
        last, now = at, now + step
        most = max(most, now)
    return {
        "max_concurrent": most,
        "mean_concurrent": area / max(events[-1][0] - events[0][0], 1e-9),
        "trial_busy_s": statistics.fmean(b - a for a, b in spans),
    }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------------------- growing costs


def growth(sizes: list[int], folder: Path) -> dict[str, Any]:
    """Per-call costs of the search's hooks against the study's size, without Ray: a study of
    n finished trials (bulk-added with the searcher's distributions, epoch records and Ray ids)
    in tune's SQLite store, and the same trials in stock OptunaSearch's in-memory study.

    Timed at each size: the searcher's `_frozen` (every result and end reads a trial through
    it), a whole `suggest` (TPE ask with constant liar) and an epoch's `on_trial_result` and an
    ASHA stop's `on_trial_complete`; the MLflow view's read of one trial; the view's winner
    scan over its trials; stock OptunaSearch's suggest; Ray's ASHA rung decision.
    """
    import random

    import optuna
    from optuna.trial import TrialState, create_trial
    from ray.tune.search.optuna import OptunaSearch

    from tune.searcher import EPOCHS_ATTR, RAY_TRIAL_ATTR, OptunaSearcher, open_study
    from tune.space import load_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = scale_space(folder, max(sizes), "")
    spec = load_space(space)
    root = folder / "growth"
    study = open_study(spec, root)
    probe = OptunaSearcher(spec, root, pruned=lambda _: True)
    probe.suggest("probe")
    distributions = study.get_trials(deepcopy=False)[0].distributions
    probe.on_trial_complete("probe", error=True)
    rng = random.Random(0)
    stock = OptunaSearch(
        space=stock_space(),
        metric="val_ap",
        mode="max",
        seed=0,
    )

    def made(i: int) -> Any:
        params = {}
        for name, dist in distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                params[name] = rng.choice(dist.choices)
            elif dist.log:
                params[name] = 10 ** rng.uniform(math.log10(dist.low), math.log10(dist.high))
            else:
                params[name] = rng.uniform(dist.low, dist.high)
        k = rng.choice([1, 1, 2, 4])
        curve = [sim_curve(params, e)[0] for e in range(k)]
        epochs = {
            str(e + 1): {"values": [v], "select": v, "time": 0.0} for e, v in enumerate(curve)
        }
        return create_trial(
            state=TrialState.COMPLETE if k == 4 else TrialState.PRUNED,
            value=max(curve) if k == 4 else None,
            params=params,
            distributions=distributions,
            intermediate_values={e + 1: v for e, v in enumerate(curve)},
            user_attrs={EPOCHS_ATTR: epochs, RAY_TRIAL_ATTR: f"g{i}"},
        )

    out: dict[str, Any] = {}
    have = len(study.trials)
    for n in sizes:
        batch = [made(i) for i in range(have, n)]
        study.add_trials(batch)
        stock._ot_study.add_trials(batch)
        have = n
        out[str(n)] = figures = _costs_at(n, spec, root, study, stock)
        print(f"n={n}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in figures.items()), flush=True)
    return out


def _costs_at(n: int, spec: Any, root: Path, study: Any, stock: Any) -> dict[str, float]:
    """The per-call costs of `growth` on a study of n trials."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.schedulers.async_hyperband import _Bracket

    from tune.report import best_of
    from tune.searcher import STEP_KEY, OptunaSearcher
    from tune.tracking import Standings

    searcher = OptunaSearcher(spec, root, pruned=lambda _: True)
    figures: dict[str, float] = {}
    figures["open_study (once per driver)"] = _ms(lambda: searcher.study)
    figures["searcher._frozen"] = _mean_ms(10, searcher._frozen, n // 2)
    suggest, result, complete = [], [], []
    row = {STEP_KEY: 1, "val_ap": 0.5, "best_val_ap": 0.5, "reported_at": 0.0}
    for name in [f"new{n}-{i}" for i in range(5)]:
        suggest.append(_ms(searcher.suggest, name))
        result.append(_ms(searcher.on_trial_result, name, row))
        complete.append(_ms(searcher.on_trial_complete, name, row))
    # The first ask of a driver loads every finished trial into Optuna's storage cache; the
    # later asks are what each new trial costs.
    figures["searcher.suggest, first of a driver"] = suggest[0]
    figures["searcher.suggest"] = statistics.fmean(suggest[1:])
    figures["searcher.on_trial_result"] = statistics.fmean(result)
    figures["searcher.on_trial_complete"] = statistics.fmean(complete)
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'optuna.db'}")
    sid = storage.get_study_id_from_name(spec.name)

    def view_read() -> None:  # MlflowView._frozen: one trial by number
        storage.get_trial(storage.get_trial_id_from_study_id_trial_number(sid, n // 2))

    figures["view._frozen (get_trial)"] = _mean_ms(10, view_read)
    trials = study.get_trials(deepcopy=False)
    complete_trials = [t for t in trials if t.state == TrialState.COMPLETE]

    def scan() -> None:  # what MlflowView._winner did with its trials on every end before
        collections.Counter(t.state for t in trials)
        best = best_of(complete_trials, [True])
        sum(t.datetime_complete <= best.datetime_complete for t in complete_trials)

    figures["view winner, full scan (before)"] = _mean_ms(10, scan)
    standings, ends = Standings([True]), iter(trials[-10:])

    def build() -> None:  # the driver's first sync reads every trial once
        for t in trials[:-10]:
            standings.update(t)

    def trial_end() -> None:  # a trial's sync, then what MlflowView._winner reads
        standings.update(next(ends))
        standings.place()

    figures["view standings build (once per driver)"] = _ms(build)
    figures["view standings per trial end"] = _mean_ms(10, trial_end)
    stock_suggest = [_ms(stock.suggest, f"stock{n}-{i}") for i in range(5)]
    figures["stock OptunaSearch.suggest, first"] = stock_suggest[0]
    figures["stock OptunaSearch.suggest"] = statistics.fmean(stock_suggest[1:])
    bracket = _Bracket(1, 4, 2, 0)
    for t in trials:
        bracket.on_result(_Stub(str(t.number)), 1, t.intermediate_values.get(1, 0.5))
    figures["asha rung cutoff"] = _mean_ms(20, bracket.cutoff, bracket._rungs[-1][1])
    return figures


class _Stub:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def sim_curve(params: dict[str, Any], epoch: int) -> tuple[float, float]:
    sys.path.insert(0, str(BENCH))
    from sim_trainer import curve

    return curve(params, epoch)


def _ms(call: Any, *args: Any) -> float:
    start = time.perf_counter()
    call(*args)
    return 1000 * (time.perf_counter() - start)


def _mean_ms(times: int, call: Any, *args: Any) -> float:
    return statistics.fmean(_ms(call, *args) for _ in range(times))


# ---------------------------------------------------------------------------- orchestration


def _helpers() -> tuple[Any, Any]:
    """tests/tune/postgres.py's Postgres and tests/tune/conftest.py's MlflowServer."""
    sys.path.insert(0, str(REPO / "tests" / "tune"))
    import postgres

    path = REPO / "tests" / "tune" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_bench_tune_conftest", path)
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return postgres, conftest.MlflowServer


def _cpu_of(pid: int) -> float:
    """CPU seconds of a process and its reaped children, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its live descendants (PostgreSQL's backends)."""
    children = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += _cpu_of(current)
        todo += children.get(current, [])
    return total


def run_leg(leg: str, folder: Path, trials: int, backend: str, postgres: Any, server_cls: Any,
            pg: Any) -> dict[str, Any]:  # fmt: skip
    """One leg in a fresh Python against its own mlflow server on `backend`."""
    folder.mkdir(parents=True)
    if backend == "postgresql":
        store = pg.create_database(leg.replace("-", "_"))
        server = server_cls(folder / "mlflow-server", backend=store)
    else:
        server = server_cls(folder / "mlflow-server")
    server.start()
    out = folder / "leg.json"
    load = os.getloadavg()
    began = time.time()
    try:
        cpu_before = _tree_cpu(server.process.pid)
        pg_before = _tree_cpu(pg.pid) if backend == "postgresql" else 0.0
        leg_process = subprocess.Popen(
            [sys.executable, __file__, "--leg", leg, "--trials", str(trials), "--folder",
             str(folder), "--uri", server.uri, "--json", str(out)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH)]),
                 "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        try:
            code = leg_process.wait()
        finally:  # interrupted: Ctrl-C ends the study, whose leg then stops its Ray
            if leg_process.poll() is None:
                leg_process.send_signal(signal.SIGINT)
                try:
                    leg_process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    leg_process.kill()
                    leg_process.wait()
        server_cpu = _tree_cpu(server.process.pid) - cpu_before
        pg_cpu = (_tree_cpu(pg.pid) - pg_before) if backend == "postgresql" else 0.0
    finally:
        server.stop()
    if code != 0 or not out.is_file():
        raise RuntimeError(f"leg {leg} exited with {code}")
    figures = json.loads(out.read_text())
    figures.update(
        leg=leg,
        backend=backend,
        load_before=load,
        load_after=os.getloadavg(),
        leg_wall=time.time() - began,
        mlflow_server_cpu=server_cpu,
        postgres_cpu=pg_cpu,
    )
    if backend == "postgresql":
        figures["stores"]["mlflow (postgresql)"] = pg.size_bytes(leg.replace("-", "_"))
    else:
        figures["stores"]["mlflow (sqlite)"] = _size(server.db)
    figures["stores"]["mlflow artifacts"] = _size(server.artifacts)
    return figures


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def verdicts(legs: dict[str, dict]) -> list[str]:
    lines = []
    stock = legs.get("stock-pg")
    for name, f in legs.items():
        c = f["checks"]
        lines.append(
            f"{name}: {f['trials_run']} trials, {f['epochs_run']} epochs; Tuner.fit "
            f"{f['fit_wall_s']:.0f} s vs ideal {f['ideal_s']:.1f} s; trials at once "
            f"{f.get('mean_concurrent', float('nan')):.1f} on average (at most "
            f"{f.get('max_concurrent', float('nan')):.0f}); overhead "
            f"{f['overhead_ms_per_trial']:.0f} ms/trial (2nd tenth {f['second_tenth_ms']:.0f}, "
            f"last tenth {f['last_tenth_ms']:.0f}: x{f['growth']:.2f}); driver CPU "
            f"{1000 * f['driver_cpu'] / f['trials_run']:.0f} ms/trial; mlflow server CPU "
            f"{1000 * f['mlflow_server_cpu'] / f['trials_run']:.0f} ms/trial; exactly once: "
            f"{c['exactly_once']} ({c['optuna_trials']} in Optuna, {c['mlflow_runs']} MLflow "
            f"runs) {'; '.join(c['problems'][:3])}"
        )
        if stock and name != "stock-pg":
            extra = f["overhead_ms_per_trial"] - stock["overhead_ms_per_trial"]
            met = "met" if extra <= GOAL_OVERHEAD_MS else "missed"
            lines.append(
                f"  goal overhead <= stock + {GOAL_OVERHEAD_MS:.0f} ms: {met} "
                f"({extra:+.0f} ms/trial over stock)"
            )
        met = "met" if f["growth"] <= GOAL_GROWTH else "missed"
        lines.append(f"  goal growth <= {GOAL_GROWTH}: {met} (x{f['growth']:.2f})")
    return lines


def describe_calls(legs: dict[str, dict]) -> list[str]:
    lines = []
    for name, f in legs.items():
        lines.append(f"{name}: calls (count, mean ms, p95 ms, first tenth -> last tenth ms)")
        for label, s in f["calls"].items():
            if label.startswith("mlflow.http ") and s["per_trial"] < 0.5:
                continue
            lines.append(
                f"  {label:<44} {s['calls']:>7} {s['mean_ms']:8.2f} {s['p95_ms']:8.2f} "
                f"{s['first_tenth_ms']:8.2f} -> {s['last_tenth_ms']:8.2f}"
            )
        sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in f["stores"].items())
        lines.append(f"  stores: {sizes}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 trials (CI smoke test)")
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--legs", default="tune-pg,stock-pg,tune-sqlite")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--growth", help="only the per-call costs at these study sizes, e.g. 1000,5000,10000"
    )
    parser.add_argument("--leg", help=argparse.SUPPRESS)  # one leg, in its own Python
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    trials = 50 if args.quick and args.trials == 10_000 else args.trials
    if args.leg:
        run = leg_stock if args.leg.startswith("stock") else leg_tune
        figures = run(Path(args.folder), trials, args.uri)
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
        return 0
    if args.growth:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="growth-", dir=SCRATCH))
        try:
            figures = growth([int(n) for n in args.growth.split(",")], folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return 0
    # SIGTERM (a test's timeout) unwinds like Ctrl-C: every server and leg is stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    postgres, server_cls = _helpers()
    problem = postgres.unavailable()
    if problem:
        print(f"error: PostgreSQL cannot be started: {problem}", file=sys.stderr)
        return 2
    SCRATCH.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"scale-{trials}-", dir=SCRATCH))
    print(f"uptime before: {_uptime()}", flush=True)
    legs: dict[str, dict] = {}
    pg = postgres.Postgres()
    try:
        pg.start()
        for leg in args.legs.split(","):
            backend = "sqlite" if leg.endswith("sqlite") else "postgresql"
            legs[leg] = run_leg(leg, folder / leg, trials, backend, postgres, server_cls, pg)
            print(f"leg {leg} done in {legs[leg]['leg_wall']:.0f} s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(legs, indent=1, default=str))
    finally:
        pg.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"uptime after: {_uptime()}")
    print("\n".join(describe_calls(legs)))
    print("\n".join(verdicts(legs)))
    ok = all(f["checks"]["exactly_once"] and f["exit"] == 0 for f in legs.values())
    command = " ".join(["python bench/bench_scale.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"| B8 scale ({trials} trials, {SLOTS} slots) | `{command}` | exactly once: {ok} |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
