"""The study folder's layout: every file and folder name under `<storage>/<name>/` (DESIGN §10).

Modules ask a `StudyFolder` for a path instead of joining names of their own, so the layout is
read and changed in one place. The names are what existing study folders hold on disk: a changed
name would keep `--resume` from finding a study's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dsanet.config import ConfigError, ExperimentConfig, from_dict
from dsanet.errors import redact
from dsanet.yamlio import load_yaml_file

if TYPE_CHECKING:
    from tune.plan import Plan

# ---------------------------------------------------------------------------- the study folder
BASE_FILE = "base.yaml"  # the study's resolved base config, written once by the driver
DATA_DIR = "data"  # the generated synthetic benchmark, for spaces with `synthetic:`
STUDY_DB = "optuna.db"  # the Optuna study (SQLite)
MLFLOW_DB = "mlflow.db"  # the default MLflow tracking store (SQLite)
MLFLOW_ARTIFACTS = "mlartifacts"  # the default store's artifact root, next to its file
RAY_DIR = "ray"  # ray/<run>/: Ray Tune's log of each driver run (never read back)
TRIALS_DIR = "trials"  # trials/<optuna number>/ is a trial's train.out_dir
FINAL_DIR = "final"  # final/seed_<n>/: the final-stage retrains
FINAL_SUMMARY = "summary.json"  # final/summary.json: mean and std over the seeds
REPORT_DIR = "report"  # report/<part>/: the files logged to the parent MLflow run
REPORT_PARTS = ("space", "study", "best")  # the space, the search, the best model

# ---------------------------------------------------------------------------- a trial's folder
# One line per reported epoch: when, by which process on which node, and what the trainer
# measured (the MLflow view logs it); the first line after a (re)start also says when the
# trainable was entered (bench/bench_search.py).
REPORTS_FILE = "reports.jsonl"
# dsanet.trainer's CHECKPOINT and BEST (not imported: the driver never imports torch). A trial
# resumes from its own last.pt, so the study folder must be shared by every host of a cluster.
STATE_FILES = ("last.pt", "best.pt")
RUN_CONFIG = "config.yaml"  # dsanet.trainer's CONFIG
RESULT_FILE = "result.json"  # dsanet.trainer's RESULT


@dataclass(frozen=True)
class StudyFolder:
    """The paths of one study folder, `<storage>/<name>/`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def base_yaml(self) -> Path:
        return self.root / BASE_FILE

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def optuna_db(self) -> Path:
        return self.root / STUDY_DB

    @property
    def optuna_uri(self) -> str:
        """Optuna's storage URL of the study (absolute, so any working directory finds it)."""
        return f"sqlite:///{self.root.resolve() / STUDY_DB}"

    @property
    def mlflow_db(self) -> Path:
        return self.root / MLFLOW_DB

    @property
    def mlflow_uri(self) -> str:
        """The default tracking URI: MLflow's SQLite store in the study folder."""
        return f"sqlite:///{self.mlflow_db}"

    @property
    def ray_dir(self) -> Path:
        return self.root / RAY_DIR

    @property
    def trials_dir(self) -> Path:
        return self.root / TRIALS_DIR

    def trial_dir(self, number: int) -> Path:
        """The folder of Optuna trial `number`, whichever Ray trial runs it (a resumed study
        runs an interrupted trial again under a new Ray id)."""
        return self.root / TRIALS_DIR / str(int(number))

    @property
    def final_dir(self) -> Path:
        return self.root / FINAL_DIR

    def seed_dir(self, seed: int) -> Path:
        return self.root / FINAL_DIR / f"seed_{seed}"

    @property
    def final_summary(self) -> Path:
        return self.root / FINAL_DIR / FINAL_SUMMARY

    def report_dir(self, part: str) -> Path:
        """`report/<part>/`, part one of REPORT_PARTS (not created here)."""
        if part not in REPORT_PARTS:
            raise ValueError(f"report part {part!r}: one of {', '.join(REPORT_PARTS)}")
        return self.root / REPORT_DIR / part


def read_base(folder: StudyFolder) -> ExperimentConfig:
    """The resolved base config the driver wrote to `base.yaml`."""
    return read_config(folder.base_yaml)


def read_config(path: Path) -> ExperimentConfig:
    """A resolved config this project wrote (`base.yaml`, a run's `config.yaml`)."""
    return from_dict(load_yaml_file(path, ConfigError), str(path))


def where(plan: Plan, view: str) -> str:
    """Where a study's results are, printed when the driver ends; `view` shows the runs."""
    folder, experiment = StudyFolder(plan.root), plan.spec.mlflow.experiment
    return "\n".join(
        [
            "\nwhere things are:",
            f"  trials       {folder.trials_dir}/<trial>/  (config.yaml, best.pt, {REPORTS_FILE})",
            f"  ray logs     {plan.ray_dir}/<ray id>/  (this run's; error.txt of a failed trial)",
            f"  optuna       {folder.optuna_uri}  (study {plan.spec.name})",
            f"  mlflow       {redact(plan.tracking_uri)}  (experiment {experiment})",
            f"  view runs    {view}",
        ]
    )
