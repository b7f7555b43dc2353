"""The search driver behind `tune/run.py`: plan (`tune.plan`), run the Tuner, summarise.

Everything that can be wrong with a space, its data or the study folder is found before Ray
starts and printed as one `error: ...` (exit 2). A study lives in `<storage>/<name>/`: the Optuna
database (ASHA's rungs are rebuilt from it), the resolved base config, the trials' folders
(each trial resumes from its own), Ray's logs (`ray/<run>/`, never read back) and, by default,
MLflow's database. `--resume` continues it after any interruption, with a new Tuner.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from dsanet.config import ConfigError
from tune.layout import RAY_DIR, where
from tune.plan import JOIN_FIX, Plan, describe, prepare
from tune.space import SpaceError, SpaceSpec
from tune.summary import summarize

log = logging.getLogger(__name__)

# OSError: a file or folder the system refuses (permissions, a folder where a file belongs).
_ERRORS = (SpaceError, ConfigError, ValueError, KeyError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _quiet_logging()
    _ray_environment()  # before the plan imports Ray, which reads some of it at import
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
        "--final-seeds",
        type=int,
        help="retrain the best config on N seeds (0: skip); default: the space's final_seeds",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan")
    parser.add_argument("overrides", nargs="*", help="config overrides: section.field=value")
    return parser


def _quiet_logging() -> None:
    """INFO from this project's loggers only: third parties (open_clip's root `logging.info`,
    Optuna's "A new study created", MLflow's run links) show warnings and errors."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("tune", "dsanet"):
        logging.getLogger(name).setLevel(logging.INFO)
    # MLflow configures its loggers, with a handler of their own, when imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # if it was imported already
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # MLflow prints "View run ... at: <url>" for every run it ends on a tracking server.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _resume_command(argv: list[str]) -> str:
    kept = [a for a in argv if a not in ("--resume", "--dry-run")]
    return shlex.join(["python", "tune/run.py", *kept, "--resume"])


def _error(exc: BaseException) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- running


def run_study(plan: Plan) -> int:
    """Run or continue the study: 0 when every trial has finished and one completed."""
    _ray_environment()
    import ray

    owns_ray = not ray.is_initialized()  # tests and notebooks may hold a Ray already
    if owns_ray:
        try:  # first: a cluster that cannot be joined leaves no Optuna study to --resume
            ray.init(**_ray_args(plan.address), logging_level=logging.WARNING)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            return _error(ValueError(_join_failure(plan.address, exc)))
    try:
        missing = _missing_resources(plan.spec, ray.cluster_resources())
        if missing and plan.address is None:  # a local Ray never grows: trials would wait
            return _error(ValueError(f"this machine has {missing}; lower resources in the space"))
        if missing:
            log.warning("the cluster has %s now; trials wait until it grows", missing)
        return _open_and_search(plan)
    finally:
        if owns_ray:
            ray.shutdown()


def _open_and_search(plan: Plan) -> int:
    from tune.scheduler import build_scheduler
    from tune.searcher import OptunaSearcher, open_study
    from tune.tracking import MlflowView

    try:  # the last checks: the tracking server, then the Optuna study and its settings
        view = MlflowView(plan.root, plan.spec, plan.tracking_uri)
        study = open_study(plan.spec, plan.root)
        scheduler = build_scheduler(plan.spec, study)  # ASHA's rungs from the study's trials
    except (*_ERRORS, ConnectionError) as exc:
        return _error(exc)
    searcher = OptunaSearcher(plan.spec, plan.root, pruned=getattr(scheduler, "pruned", None))
    return _search(plan, study, searcher, scheduler, view)


def _join_failure(address: str | None, exc: BaseException) -> str:
    """One line for a Ray that cannot be started or joined: Ray's reason, then the fixes. A
    cluster refusing this driver's token looks the same to it as one not answering."""
    reason = str(exc).split(". ")[0].strip().rstrip(".")
    if address is None:
        return f"could not start a local Ray ({reason})"
    return (
        f"no Ray cluster could be joined at --address {address} ({reason}); {JOIN_FIX}. A "
        f"cluster with token authentication, as tune/cluster.yaml starts, also needs "
        f"RAY_AUTH_MODE=token and its ~/.ray/auth_token here"
    )


def _search(plan: Plan, study: Any, searcher: Any, scheduler: Any, view: Any) -> int:
    status = "FAILED"
    try:
        view.start()  # a resumed study's record is brought up to date first
        _fit(plan, study, searcher, scheduler, view)
        status, code = _outcome(plan, study, view)
        return code
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"interrupted; continue the study with\n  {plan.resume_command}", file=sys.stderr)
        return 130
    finally:
        view.finish(status)
        print(where(plan, view.ui_command()), flush=True)


def _outcome(plan: Plan, study: Any, view: Any) -> tuple[str, int]:
    """Summarise; then the final stage if the study is done: (MLflow status, exit code)."""
    from optuna.trial import TrialState

    from tune.report import write_study_artifacts
    from tune.searcher import finished_trials

    print(summarize(study, plan.spec), flush=True)
    write_study_artifacts(study, plan.spec, plan.root)
    done, size = len(finished_trials(study)), plan.spec.num_samples
    if done < size:  # Ctrl-C makes Tuner.fit return as if the study had finished
        print(f"interrupted: {done} of {size} trials finished; continue with")
        print(f"  {plan.resume_command}")
        return "KILLED", 1
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print(f"no trial completed: see {plan.ray_dir}/<ray id>/error.txt", file=sys.stderr)
        return "FAILED", 1
    _final_stage(plan, study, view)
    return "FINISHED", 0


def _fit(plan: Plan, study: Any, searcher: Any, scheduler: Any, view: Any) -> None:
    """Run the trials the study lacks in a new Tuner: RUNNING trials of an interrupted run
    first (the searcher adopts them, each continuing from its folder), then new ones. Ray's
    own experiment state is never loaded: it is pickled, and a study folder may come from
    someone else; the study folder holds all a resume needs."""
    from ray import tune

    from tune.searcher import finished_trials
    from tune.trainable import STUDY_KEY, run_trial

    spec = plan.spec
    remaining = spec.num_samples - len(finished_trials(study))
    if remaining <= 0:
        return
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, resources),
        param_space={STUDY_KEY: {"dir": str(plan.root), "max_t": spec.scheduler.max_t}},
        tune_config=tune.TuneConfig(
            search_alg=_limiter(searcher, scheduler, spec.max_concurrent),
            scheduler=scheduler,
            num_samples=remaining,
            reuse_actors=True,  # a worker starts in seconds here; reuse it across trials
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=plan.run,
            storage_path=str(plan.root / RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[view, _console(plan, scheduler)],
            verbose=0,  # tune/console.py prints the trials' progress
        ),
    )
    tuner.fit()


def _limiter(searcher: Any, scheduler: Any, max_concurrent: int) -> Any:
    """At most max_concurrent trials at a time; under promotion ASHA paused ones do not count,
    and a paused trial waiting for promotion goes before a new one."""
    from ray.tune.search import ConcurrencyLimiter

    from tune.promotion import PromotionASHA, PromotionLimiter

    if isinstance(scheduler, PromotionASHA):
        return PromotionLimiter(searcher, max_concurrent, scheduler)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


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
    return trial.trial_id  # ray/<run>/<ray id>/, where a failed trial's error.txt is


def _ray_environment() -> None:
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials use absolute paths
    # Ray's classic output engine, which prints nothing at verbose=0 (tune/console.py does).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray's "may be a performance bottleneck" warnings: slow steps of a small local study
    # (a callback writing to MLflow, the searcher's SQLite) are expected, not actionable.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "1e9")
    os.environ.setdefault("TUNE_WARN_SLOW_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")


def _ray_args(address: str | None) -> dict[str, Any]:
    if address is None:  # never join a cluster someone else started on this machine
        return {"address": "local", "include_dashboard": False}
    return {"address": address, "runtime_env": {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}}


def _console(plan: Plan, scheduler: Any) -> Any:
    from tune.console import Console
    from tune.scheduler import rung_epochs

    asha = plan.spec.scheduler.kind != "none"
    return Console(
        plan.spec,
        pruned=getattr(scheduler, "pruned", None),
        rungs=rung_epochs(plan.spec.scheduler) if asha else None,
        ray_dir=plan.ray_dir,
        paused=getattr(scheduler, "paused", None),
    )


def _final_stage(plan: Plan, study: Any, view: Any) -> None:
    from tune.report import best_config, best_trial

    config = best_config(study, plan.spec)
    if plan.final_seeds == 0 or config is None:
        print(
            "no final stage" + (": no trial completed" if config is None else " (--final-seeds 0)")
        )
        return
    from tune.final import run_final_stage

    print(f"final stage: best trial {best_trial(study).number} on {plan.final_seeds} seeds")
    run_final_stage(plan.spec, config, plan.root, view, plan.final_seeds)
