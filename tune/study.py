"""The search driver behind `tune/run.py`: validate, prepare the data, run the Tuner, summarise.

Everything that can be wrong with a space, its data or the study folder is found before Ray
starts and printed as one `error: ...` (exit 2). A study lives in `<storage>/<name>/`: the Optuna
database, ASHA's rungs, the resolved base config, the trials' folders, Ray's experiment (`ray/`)
and, by default, MLflow's database. `--resume` continues it after any interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dsanet.config import ConfigError, ExperimentConfig, flatten, from_dict
from tune.space import SpaceError, SpaceSpec, load_space

log = logging.getLogger(__name__)

RAY_DIR = "ray"  # Ray Tune's experiment folder inside the study folder
DATA_DIR = "data"  # the generated synthetic benchmark, for spaces with `synthetic:`
MLFLOW_DB = "mlflow.db"
TOP_TRIALS = 5
PROBE_BYTES = 1 << 20  # written to the study folder before Ray starts: a full disk fails here
_ERRORS = (SpaceError, ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError)


@dataclass(frozen=True)
class Plan:
    """A validated study: what `run_study` does, and what `--dry-run` prints."""

    spec: SpaceSpec  # its base holds the study's data paths
    root: Path  # <storage>/<name>
    resume: bool  # the folder holds this study already
    address: str | None
    final_seeds: int
    tracking_uri: str
    data_note: str
    resume_command: str  # how to continue this study after an interruption

    @property
    def ray_dir(self) -> Path:
        return self.root / RAY_DIR


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plan = prepare(args, resume_command=_resume_command(argv))
    except _ERRORS as exc:
        return _error(exc)
    print(describe(plan), flush=True)
    return 0 if args.dry_run else run_study(plan)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune/run.py",
        description="Hyperparameter search over DSANet configs (Ray Tune + Optuna + ASHA).",
    )
    parser.add_argument("--space", required=True, help="search-space YAML, or a shipped name")
    parser.add_argument("--resume", action="store_true", help="continue the study's folder")
    parser.add_argument(
        "--address", help="join a Ray cluster: auto or ray://HOST:PORT (default: a local Ray)"
    )
    parser.add_argument("--num-samples", type=int, help="override the space's num_samples")
    parser.add_argument("--storage-path", help="override the space's storage_path")
    parser.add_argument(
        "--final-seeds", type=int, default=3, help="retrain the best config on N seeds (0: skip)"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    parser.add_argument("overrides", nargs="*", help="config overrides: section.field=value")
    return parser


def _resume_command(argv: list[str]) -> str:
    kept = [a for a in argv if a not in ("--resume", "--dry-run")]
    return shlex.join(["python", "tune/run.py", *kept, "--resume"])


def _error(exc: BaseException) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- validation


def prepare(args: argparse.Namespace, resume_command: str = "") -> Plan:
    """Check everything before Ray starts; generate synthetic data and the feature cache."""
    spec = load_space(args.space, args.overrides)
    if args.final_seeds < 0:
        raise ValueError(f"--final-seeds {args.final_seeds}: give 0 (skip) or more seeds")
    if args.resume and (args.address or "").startswith("ray://"):
        raise ValueError(
            "--resume over Ray Client (ray://) is not supported: run the driver on the cluster "
            "(ray submit or ray job submit) with --address auto"
        )
    storage = Path(args.storage_path).expanduser().resolve() if args.storage_path else None
    root = (storage or Path(spec.storage_path)) / spec.name
    _check_storage(root, dry_run=args.dry_run)
    resume = _check_folder(root, args.resume)
    spec = dataclasses.replace(spec, num_samples=_study_size(spec, root, args.num_samples))
    base, data_note = _data(spec, root, dry_run=args.dry_run)
    spec = dataclasses.replace(spec, base=base)
    _check_features(spec, dry_run=args.dry_run)
    if not args.dry_run:
        _write_base(root, base)
    uri = spec.mlflow.tracking_uri or f"sqlite:///{root / MLFLOW_DB}"
    return Plan(spec, root, resume, args.address, args.final_seeds, uri, data_note, resume_command)


def _check_storage(root: Path, dry_run: bool) -> None:
    """The study folder is, or can be made, a writable folder with room for a probe file."""
    fix = "set storage_path in the space (or --storage-path) to a writable folder with free space"
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        kind = "a folder you cannot write to" if existing.is_dir() else "not a folder"
        raise ValueError(f"storage path {root}: {existing} is {kind}; {fix}")
    if dry_run:
        return
    probe = existing / f".dsanet-write-probe-{os.getpid()}"  # creates no folder of the study
    try:
        with open(probe, "wb") as file:
            file.write(bytes(PROBE_BYTES))
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:  # ENOSPC, EDQUOT, EFBIG, EROFS, EACCES: the study could not save
        raise ValueError(f"storage path {root} cannot be written ({exc.strerror}); {fix}") from exc
    finally:
        probe.unlink(missing_ok=True)


def _check_folder(root: Path, resume: bool) -> bool:
    """Whether the study folder holds this study already; refuse to mix without --resume."""
    from tune.searcher import STUDY_DB

    exists = (root / STUDY_DB).is_file() or (root / RAY_DIR).is_dir()
    if exists and not resume:
        raise FileExistsError(
            f"{root} holds a study already; pass --resume to continue it, or choose another "
            f"name or --storage-path"
        )
    if resume and not exists:
        log.info("nothing to resume in %s: starting the study", root)
    return exists


def _study_size(spec: SpaceSpec, root: Path, requested: int | None) -> int:
    """The number of trials: fixed by the study once it started, else the space's or -n's."""
    from tune.searcher import planned_trials

    planned = planned_trials(root, spec.name)
    if planned is not None and requested not in (None, planned):
        raise ValueError(
            f"--num-samples {requested}: the study in {root} was started with {planned} "
            f"trials and keeps that size on --resume; start a new study to run more"
        )
    size = requested or planned or spec.num_samples
    if size < max(1, len(spec.points_to_evaluate)):
        raise ValueError(
            f"--num-samples {size}: give at least {max(1, len(spec.points_to_evaluate))} "
            f"(the space's points_to_evaluate run first)"
        )
    return size


def _data(spec: SpaceSpec, root: Path, dry_run: bool) -> tuple[ExperimentConfig, str]:
    """The base config with the synthetic benchmark's paths (generated once per study)."""
    if spec.synthetic is None:
        return spec.base, f"features under {spec.base.data.feature_root or '(not set)'}"
    from dsanet import synth

    preset, seed, out = spec.synthetic.preset, spec.synthetic.seed, root / DATA_DIR
    marker = out / synth.MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        if (made.get("preset"), made.get("seed")) != (preset, seed):
            raise ValueError(
                f"{out} holds synthetic {made.get('preset')} seed {made.get('seed')}, but the "
                f"space asks for {preset} seed {seed}; use another --storage-path"
            )
    elif not dry_run:  # generate() writes a temporary tree and renames it when complete
        print(f"generating synthetic {preset} (seed {seed}) in {out} ...", flush=True)
        synth.generate(preset, out, seed=seed)
    ready = "" if marker.is_file() else "to be generated "
    note = f"synthetic {preset} (seed {seed}) {ready}in {out}"
    paths = {"data.feature_root": out / synth.FEATURES, "data.list_dir": out / synth.LISTS}
    return spec.base.with_overrides({k: str(v) for k, v in paths.items()}), note


def _check_features(spec: SpaceSpec, dry_run: bool) -> None:
    """Fail on missing features now; outside a dry run, build the shared cache once here."""
    from dsanet.datasets import load_spec
    from dsanet.loading import load_data, resolve_paths

    data = spec.base.data
    if dry_run:
        if spec.synthetic is None:
            resolve_paths(data, load_spec(data.dataset))
        return
    lengths = {spec.base.model.visual_length}  # one cache per sequence length a trial may use
    for p in spec.params:
        if p.name == "model.visual_length" and p.kind == "categorical":
            lengths |= set(p.choices)
    for length in sorted(lengths):
        load_data(data, length, spec.base.model.visual_width)


def _write_base(root: Path, base: ExperimentConfig) -> None:
    """The resolved base config every trial starts from; a resume must not change it."""
    from tune.trainable import BASE_FILE

    path = root / BASE_FILE
    if path.is_file():
        old = flatten(from_dict(yaml.safe_load(path.read_text()), str(path)))
        changed = sorted(k for k, v in flatten(base).items() if old.get(k) != v)
        if changed:
            raise ValueError(
                f"{root} was started with another base config ({', '.join(changed)} differ); "
                f"resume with the same space and overrides, or use another --storage-path"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(base.to_yaml())
    os.replace(tmp, path)


def describe(plan: Plan) -> str:
    spec, s, r = plan.spec, plan.spec.scheduler, plan.spec.resources
    goal = ", ".join(f"{m} ({d})" for m, d in zip(spec.metric, spec.mode, strict=True))
    scheduler = f"none: every trial runs {s.max_t} epochs"
    if s.kind == "asha":
        from tune.scheduler import rung_epochs

        rungs = ", ".join(f"{m:g}" for m in rung_epochs(s))
        scheduler = (
            f"ASHA on {spec.metric[0]}: max_t {s.max_t} epochs, rungs at epochs {rungs}, "
            f"reduction factor {s.reduction_factor:g}"
        )
    searcher = spec.searcher.kind + (
        f" (seed {spec.searcher.seed}, {spec.searcher.n_startup_trials} random start-up trials)"
    )
    return "\n".join(
        [
            f"study {spec.name}: {spec.num_samples} trials, {spec.max_concurrent} at a time, "
            f"{r.cpu:g} CPU / {r.gpu:g} GPU each, a failed trial retried up to "
            f"{spec.max_failures} time(s)",
            f"  objective   {goal}",
            f"  searcher    {searcher}; {len(spec.points_to_evaluate)} starting point(s)",
            f"  scheduler   {scheduler}",
            *(
                f"  search      {p.name} {p.kind}{' log' * p.log} {p.describe()}"
                for p in spec.params
            ),
            f"  folder      {plan.root} ({'resume' if plan.resume else 'new'})",
            f"  data        {plan.data_note}",
            f"  mlflow      {_redact(plan.tracking_uri)} (experiment {spec.mlflow.experiment})",
            f"  ray         {plan.address or 'a local Ray on this machine'}",
            f"  final       {plan.final_seeds} seed(s) of the best config (protocol final)",
        ]
    )


# ---------------------------------------------------------------------------- running


def run_study(plan: Plan) -> int:
    """Run or continue the study: 0 when every trial has finished and one completed."""
    _ray_environment()
    import ray

    from tune.scheduler import build_scheduler
    from tune.searcher import OptunaSearcher, open_study
    from tune.tracking import MlflowTracker

    try:  # the last checks: Optuna's and ASHA's saved state, and the tracking server
        study = open_study(plan.spec, plan.root)
        scheduler = build_scheduler(plan.spec, plan.root)
        tracker = MlflowTracker(plan.root, plan.spec, plan.tracking_uri)
    except (*_ERRORS, ConnectionError) as exc:
        return _error(exc)
    searcher = OptunaSearcher(plan.spec, plan.root, pruned=getattr(scheduler, "pruned", None))
    owns_ray = not ray.is_initialized()  # tests and notebooks may hold a Ray already
    if owns_ray:
        ray.init(**_ray_args(plan.address))
    try:
        missing = _missing_resources(plan.spec, ray.cluster_resources())
        if missing and plan.address is None:  # a local Ray never grows: trials would wait
            return _error(ValueError(f"this machine has {missing}; lower resources in the space"))
        if missing:
            log.warning("the cluster has %s now; trials wait until it grows", missing)
        return _search(plan, study, searcher, scheduler, tracker)
    finally:
        if owns_ray:
            ray.shutdown()


def _search(plan: Plan, study: Any, searcher: Any, scheduler: Any, tracker: Any) -> int:
    status = "FAILED"
    try:
        tracker.start_parent(resumed=plan.resume)
        _fit(plan, study, searcher, scheduler, tracker)
        status, code = _outcome(plan, study, tracker)
        return code
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"interrupted; continue the study with\n  {plan.resume_command}", file=sys.stderr)
        return 130
    finally:
        tracker.finish_parent(status)
        print(where(plan, tracker.ui_command()), flush=True)


def _outcome(plan: Plan, study: Any, tracker: Any) -> tuple[str, int]:
    """Summarise; then the final stage if the study is done: (MLflow status, exit code)."""
    from optuna.trial import TrialState

    from tune.report import write_study_artifacts
    from tune.searcher import finished_trials

    print(summarize(study, plan.spec), flush=True)
    write_study_artifacts(study, tracker, plan.root)
    done, size = len(finished_trials(study)), plan.spec.num_samples
    if done < size:  # Ctrl-C makes Tuner.fit return as if the study had finished
        print(f"interrupted: {done} of {size} trials finished; continue with")
        print(f"  {plan.resume_command}")
        return "KILLED", 1
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print(f"no trial completed: see {plan.ray_dir}/<ray id>/error.txt", file=sys.stderr)
        return "FAILED", 1
    _final_stage(plan, study, tracker)
    return "FINISHED", 0


def _fit(plan: Plan, study: Any, searcher: Any, scheduler: Any, tracker: Any) -> None:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from tune.searcher import finished_trials
    from tune.trainable import STUDY_KEY, SlimFinishedCheckpoints, run_trial

    spec = plan.spec
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_resources(run_trial, resources)
    param_space = {STUDY_KEY: {"dir": str(plan.root), "max_t": spec.scheduler.max_t}}
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
    reporter = _progress_reporter(spec)
    callbacks = [SlimFinishedCheckpoints(), tracker]  # slimming first: the tracker links to it
    if plan.resume and _restorable(plan.ray_dir):
        # Errored trials were told FAIL to Optuna after Ray's retries: they stay errored.
        tuner = tune.Tuner.restore(
            str(plan.ray_dir), trainable, resume_unfinished=True, param_space=param_space
        )
        _use_this_run(tuner, search_alg, scheduler, callbacks, reporter)
    else:  # new, or killed before Ray saved a trial: Optuna knows what is left
        remaining = spec.num_samples - len(finished_trials(study))
        if remaining <= 0:
            return
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=remaining,
                reuse_actors=True,  # a worker starts in seconds here; reuse it across trials
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=RAY_DIR,
                storage_path=str(plan.root),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
                progress_reporter=reporter,
                verbose=1,
            ),
        )
    tuner.fit()


def _restorable(ray_dir: Path) -> bool:
    """Whether Ray saved a readable experiment state with trials in it.

    Tuner.restore raises IndexError on a state saved before the first trial, and a kill can cut
    the newest state file; then the study restarts Ray's side from Optuna's record.
    """
    states = sorted(ray_dir.glob("experiment_state-*.json"))  # Ray restores the newest name
    if not states or not (ray_dir / "tuner.pkl").is_file():
        return False
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (OSError, ValueError, KeyError) as exc:
        log.warning(
            "unreadable Ray state %s (%s): restarting from Optuna's record", states[-1], exc
        )
        return False
    return bool(trials)


def _use_this_run(
    tuner: Any, search_alg: Any, scheduler: Any, callbacks: list, reporter: Any
) -> None:
    """Make a restored Tuner use this run's searcher, scheduler, tracker and progress table.

    Tuner.restore runs with the TuneConfig and RunConfig pickled when the study first started:
    a scheduler without the rungs reloaded here and an MLflow tracker whose parent run this
    process did not open. Ray has no public way to replace them, hence the private fields.
    """
    internal = tuner._local_tuner
    internal._tune_config.search_alg = search_alg
    internal._tune_config.scheduler = scheduler
    internal._run_config.callbacks = callbacks
    internal._run_config.progress_reporter = reporter


def _missing_resources(spec: SpaceSpec, have: dict[str, float]) -> str:
    """'' if the cluster can run one trial, else what it lacks, in words."""
    need = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu}
    short = [
        f"{have.get(k, 0):g} {k}s for trials of {v:g}"
        for k, v in need.items()
        if v > have.get(k, 0)
    ]
    return ", ".join(short)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # <study>/ray/<id> next to <study>/trials/<id>


def _ray_environment() -> None:
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials use absolute paths
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table shows chosen columns
    # With num_to_keep=1 Ray snapshots its state after every checkpoint: wanted, not a problem.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _ray_args(address: str | None) -> dict[str, Any]:
    if address is None:  # never join a cluster someone else started on this machine
        return {"address": "local", "include_dashboard": False}
    return {"address": address, "runtime_env": {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}}


def _progress_reporter(spec: SpaceSpec) -> Any:
    from ray.tune import CLIReporter

    from tune.searcher import STEP_KEY

    split = "val" if spec.base.data.protocol == "validation" else "test"
    best = f"best_{split}_{spec.base.train.select_metric}"
    metrics = {STEP_KEY: "epochs", **{m: m for m in spec.metric}, best: best}
    return CLIReporter(
        metric_columns={**metrics, "loss_total": "loss"},
        parameter_columns=_short_names([p.name for p in spec.params]),
        metric=spec.metric[0],
        mode=spec.mode[0],
        sort_by_metric=True,
        max_report_frequency=30,
    )


def _final_stage(plan: Plan, study: Any, tracker: Any) -> None:
    from tune.report import best_config, best_trial

    config = best_config(study, plan.spec)
    if plan.final_seeds == 0 or config is None:
        print(
            "no final stage" + (": no trial completed" if config is None else " (--final-seeds 0)")
        )
        return
    from tune.final import run_final_stage

    print(f"final stage: best trial {best_trial(study).number} on {plan.final_seeds} seeds")
    run_final_stage(plan.spec, config, plan.root, tracker, plan.final_seeds)


# ---------------------------------------------------------------------------- summary


def summarize(study: Any, spec: SpaceSpec) -> str:
    """Trial counts, then the top trials: status, epochs, objectives, the parameters that vary."""
    from tune.searcher import RAY_TRIAL_ATTR, epoch_records

    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    head = f"\nstudy {spec.name}: {len(trials)} of {spec.num_samples} trials ({counts})"
    top = ranked_trials(study, spec)[:TOP_TRIALS]
    if not top:
        return head
    varying = [p.name for p in spec.params if len({repr(t.params.get(p.name)) for t in trials}) > 1]
    header = ["trial", "ray id", "status", "epochs", *spec.metric, *_short_names(varying).values()]
    rows = [
        [
            str(t.number),
            str(t.user_attrs.get(RAY_TRIAL_ATTR, "")),
            t.state.name.lower(),
            str(len(epoch_records(t))),
            *(f"{v:.4f}" for v in _shown_values(t, len(spec.metric))),
            *(_format(t.params.get(name)) for name in varying),
        ]
        for t in top
    ]
    order = "Pareto front first" if len(spec.metric) > 1 else f"best {spec.metric[0]} first"
    return "\n".join(
        [head, f"top trials ({order}; pruned scores are early):", _table(header, rows)]
    )


def ranked_trials(study: Any, spec: SpaceSpec) -> list[Any]:
    """Complete trials best first (a multi-objective Pareto front first, by the first
    objective), then pruned ones by their last score."""
    from optuna.trial import TrialState

    sign = -1.0 if spec.mode[0] == "max" else 1.0
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials} if len(spec.metric) > 1 and complete else set()
    complete.sort(key=lambda t: (t.number not in front, sign * t.values[0]))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    pruned.sort(key=lambda t: sign * _shown_values(t, len(spec.metric))[0])
    return complete + pruned


def where(plan: Plan, view: str) -> str:
    from tune.searcher import storage_uri
    from tune.trainable import REPORTS_FILE, TRIALS_DIR

    trials, experiment = plan.root / TRIALS_DIR, plan.spec.mlflow.experiment
    return "\n".join(
        [
            "\nwhere things are:",
            f"  ray results  {plan.ray_dir}  (Tune experiment; continue with --resume)",
            f"  checkpoints  {plan.ray_dir}/<ray id>/checkpoint_*  (each trial's last epoch)",
            f"  trials       {trials}/<ray id>/  (config.yaml, best.pt, {REPORTS_FILE})",
            f"  optuna       {storage_uri(plan.root)}  (study {plan.spec.name})",
            f"  mlflow       {_redact(plan.tracking_uri)}  (experiment {experiment})",
            f"  view runs    {view}",
        ]
    )


def _shown_values(trial: Any, count: int) -> list[float]:
    """The told values of a complete trial; the last epoch's of any other."""
    from tune.searcher import epoch_records

    if trial.state.name == "COMPLETE":
        return list(trial.values)
    epochs = epoch_records(trial)
    return list(epochs[max(epochs)]["values"]) if epochs else [float("nan")] * count


def _short_names(names: Sequence[str]) -> dict[str, str]:
    """Dotted names by their last part where that is unambiguous."""
    leaves = [n.split(".")[-1] for n in names]
    return {
        n: leaf if leaves.count(leaf) == 1 else n for n, leaf in zip(names, leaves, strict=True)
    }


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)


def _redact(uri: str) -> str:
    """A URI without its credentials (scheme://user:secret@host)."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", uri)
