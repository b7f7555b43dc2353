"""A validated study plan: every check of the space, its data and the study folder, made before
Ray starts; the synthetic data and the shared feature cache are built here too."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dsanet.config import ExperimentConfig, flatten
from dsanet.errors import brief, redact
from dsanet.files import write_atomic
from tune.layout import BASE_FILE, RAY_DIR, STUDY_DB, StudyFolder, read_base
from tune.space import FINAL_SEEDS_LIMIT, TRIALS_LIMIT, SpaceSpec, load_space

log = logging.getLogger(__name__)

PROBE_BYTES = 1 << 20  # written to the study folder before Ray starts: a full disk fails here
ADDRESS_TIMEOUT_S = 5.0  # for a cluster address to accept a TCP connection
JOIN_FIX = (
    "start one (ray start --head, or ray up tune/cluster.yaml), fix --address or RAY_ADDRESS, "
    "or leave out --address to run on this machine"
)


# What selects a trial's epoch, and where test metrics come from, under each data.protocol.
PROTOCOL_NOTES = {
    "validation": (
        "trials select on a held-out split of the training videos and never read the test "
        "set; only the final stage tests, once per seed"
    ),
    "final": "trials keep their last epoch and never read the test set; only the final stage tests",
    "reference": (
        "OPTIMISTIC: trials select their epoch on the TEST set, as the official code does; "
        "results are comparable with the paper only, not an honest estimate"
    ),
}


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
    # This driver run's name: Ray Tune logs it under ray/<run>/ (each run is a new Tuner).
    run: str = dataclasses.field(
        default_factory=lambda: f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )

    @property
    def folder(self) -> StudyFolder:
        return StudyFolder(self.root)

    @property
    def ray_dir(self) -> Path:
        """Ray Tune's folder of this driver run: a failed trial's `<ray id>/error.txt`."""
        return self.folder.ray_dir / self.run


def prepare(args: argparse.Namespace, resume_command: str = "") -> Plan:
    """Check everything before Ray starts; generate synthetic data and the feature cache."""
    spec = load_space(args.space, args.overrides)
    seeds = spec.final_seeds if args.final_seeds is None else args.final_seeds
    if not 0 <= seeds <= FINAL_SEEDS_LIMIT:
        raise ValueError(f"--final-seeds {seeds}: give 0 (skip) to {FINAL_SEEDS_LIMIT} seeds")
    if args.resume and (args.address or "").startswith("ray://"):
        raise ValueError(
            "--resume over Ray Client (ray://) is not supported: run the driver on the cluster "
            "(ray submit or ray job submit) with --address auto"
        )
    _check_address(args.address)
    storage = Path(args.storage_path).expanduser().resolve() if args.storage_path else None
    root = (storage or Path(spec.storage_path)) / spec.name
    _check_storage(root, dry_run=args.dry_run)
    resume = _check_folder(root, args.resume)
    _check_stores(root, spec)
    spec = dataclasses.replace(spec, num_samples=_study_size(spec, root, args.num_samples))
    base, data_note = _data(spec, root, dry_run=args.dry_run)
    spec = dataclasses.replace(spec, base=base)
    _check_features(spec, dry_run=args.dry_run)
    if not args.dry_run:
        _write_base(root, base)
    uri = spec.mlflow.tracking_uri or StudyFolder(root).mlflow_uri
    return Plan(spec, root, resume, args.address, seeds, uri, data_note, resume_command)


def _check_address(address: str | None) -> None:
    """A cluster named by HOST:PORT (directly, or through RAY_ADDRESS with `auto`) must accept a
    connection: Ray itself retries an address where nothing listens for minutes."""
    if address is None:
        return
    target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if address == "auto" and not target:
        return  # Ray looks for a cluster on this machine itself
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        via = f"RAY_ADDRESS={brief(target)} (with --address auto)" if address == "auto" else ""
        raise ValueError(
            f"--address {brief(address)}{': ' + via if via else ''} is not an address: give "
            f"auto, HOST:PORT or ray://HOST:PORT (port 1-65535), or leave out --address to run "
            f"on this machine"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S):
            pass
    except OSError as exc:
        via = " (RAY_ADDRESS)" if address == "auto" else ""
        raise ValueError(
            f"no Ray cluster answers at {host}:{port}{via} ({exc.strerror or exc}); {JOIN_FIX}"
        ) from exc


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
    folder = StudyFolder(root)
    exists = folder.optuna_db.exists() or folder.ray_dir.exists()
    if exists and not resume:
        raise FileExistsError(
            f"{root} holds a study already; pass --resume to continue it, or choose another "
            f"name or --storage-path"
        )
    # A study stopped before its Optuna database was made has only its base config: that one
    # may be resumed (or run again without --resume); a folder with neither is no study.
    if resume and not exists and not folder.base_yaml.is_file():
        raise FileNotFoundError(
            f"--resume: {root} holds no study ({STUDY_DB}, {RAY_DIR}/ or {BASE_FILE}); run "
            f"without --resume to start it, or fix the space's name or --storage-path"
        )
    return exists


# Tables an existing store of the study folder must have (beside others).
_STORE_TABLES = {
    "the Optuna study": {"studies", "trials", "study_user_attributes"},
    "the MLflow tracking store": {"experiments", "runs"},
}


def _check_stores(root: Path, spec: SpaceSpec) -> None:
    """An existing Optuna or MLflow SQLite store must be one of ours; it is opened read-only, so
    a dry run writes nothing and a foreign file is never changed."""
    folder = StudyFolder(root)
    stores = {folder.optuna_db: "the Optuna study"}
    uri = spec.mlflow.tracking_uri or folder.mlflow_uri
    if uri.startswith("sqlite:///"):
        stores[Path(uri.removeprefix("sqlite:///")).expanduser()] = "the MLflow tracking store"
    for path, what in stores.items():
        if not path.exists():
            continue
        with _read_only(path) as db:
            tables = {name for (name,) in db.execute(_TABLES).fetchall()}
        missing = sorted(_STORE_TABLES[what] - tables)
        if tables and missing:  # no table at all: an empty store its program fills in
            raise ValueError(
                f"{path} is an SQLite database, but not {what} (no table {', '.join(missing)}): "
                f"another program's file? {_STORE_FIX}"
            )


_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"
_STORE_FIX = "move the file away, or choose another name or --storage-path"


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to the SQLite file `path` that cannot write; any failure is one error."""
    if not path.is_file():
        raise ValueError(f"{path} is not a file; {_STORE_FIX}")
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            yield db
    except sqlite3.Error as exc:
        raise ValueError(f"{path} is not a readable SQLite database ({exc}); {_STORE_FIX}") from exc


def planned_trials(study_dir: Path, name: str) -> int | None:
    """How many trials the study `name` in `study_dir` was started with (None: no study yet).

    Read with plain SQL on a read-only connection: Optuna's storage creates its tables when it
    opens a file, and a dry run must not write.
    """
    from tune.searcher import SIZE_ATTR

    path = StudyFolder(study_dir).optuna_db
    if not path.is_file():
        return None
    with _read_only(path) as db:
        if "study_user_attributes" not in {n for (n,) in db.execute(_TABLES).fetchall()}:
            return None  # an empty store: Optuna has not made its tables yet
        row = db.execute(
            "SELECT a.value_json FROM study_user_attributes a JOIN studies s "
            "ON a.study_id = s.study_id WHERE s.study_name = ? AND a.key = ?",
            (name, SIZE_ATTR),
        ).fetchone()
    try:
        size = json.loads(row[0]) if row else None
    except ValueError:
        return None
    return size if isinstance(size, int) and size > 0 else None


def _study_size(spec: SpaceSpec, root: Path, requested: int | None) -> int:
    """The number of trials: fixed by the study once it started, else the space's or -n's."""
    if requested is not None and not 1 <= requested <= TRIALS_LIMIT:
        raise ValueError(
            f"--num-samples {requested}: give 1 to {TRIALS_LIMIT} trials, or leave it out to "
            f"use the space's num_samples ({spec.num_samples})"
        )
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

    preset, seed, out = spec.synthetic.preset, spec.synthetic.seed, StudyFolder(root).data_dir
    marker = out / synth.MARKER
    if marker.is_file():
        try:
            made = json.loads(marker.read_text(encoding="utf-8"))
            found = (made.get("preset"), made.get("seed"))
        except (ValueError, AttributeError) as exc:  # JSON, UTF-8, or not an object
            raise ValueError(
                f"{marker} is damaged; delete {out} to generate the synthetic data again"
            ) from exc
        if found != (preset, seed):
            raise ValueError(
                f"{out} holds synthetic {brief(found[0])} seed {brief(found[1])}, but the "
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
    """Fail on missing features now; outside a dry run, build the shared cache once here.

    The test split's lists and ground truth are checked too, but its features are not read:
    only the final stage tests.
    """
    from dsanet.datasets import load_spec
    from dsanet.loading import load_data, read_test_inputs, resolve_paths

    data = spec.base.data
    if dry_run:
        if spec.synthetic is None:
            resolve_paths(data, load_spec(data.dataset))
        return
    lengths = {spec.base.model.visual_length}  # one cache per sequence length a trial may use
    for p in spec.params:
        if p.name == "model.visual_length" and p.kind == "categorical":
            lengths |= set(p.choices)
    read_test_inputs(data)
    for length in sorted(lengths):
        load_data(data, length, spec.base.model.visual_width, test=data.protocol == "reference")


def _write_base(root: Path, base: ExperimentConfig) -> None:
    """The resolved base config every trial starts from; a resume must not change it."""
    folder = StudyFolder(root)
    if folder.base_yaml.is_file():
        old = flatten(read_base(folder))
        changed = sorted(k for k, v in flatten(base).items() if old.get(k) != v)
        if changed:
            raise ValueError(
                f"{root} was started with another base config ({', '.join(changed)} differ); "
                f"resume with the same space and overrides, or use another --storage-path"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(folder.base_yaml, base.to_yaml())


def describe(plan: Plan) -> str:
    spec, s, r = plan.spec, plan.spec.scheduler, plan.spec.resources
    goal = ", ".join(f"{m} ({d})" for m, d in zip(spec.metric, spec.mode, strict=True))
    scheduler = f"none: every trial runs {s.max_t} epochs"
    if s.kind != "none":
        from tune.scheduler import rung_epochs

        rungs = ", ".join(f"{m:g}" for m in rung_epochs(s))
        scheduler = (
            f"ASHA on {spec.metric[0]}: max_t {s.max_t} epochs, rungs at epochs {rungs}, "
            f"reduction factor {s.reduction_factor:g}"
        )
        if s.kind == "asha-promotion":
            scheduler += "; a trial below a rung's cut is paused, and resumed if promoted"
    searcher = spec.searcher.kind + (
        f" (seed {spec.searcher.seed}, {spec.searcher.n_startup_trials} random start-up trials)"
    )
    conditional = [p.name for p in spec.params if p.condition]
    if spec.searcher.kind == "gp" and conditional:
        searcher += f"; conditional {', '.join(conditional)} sampled at random"
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
            f"  protocol    {spec.base.data.protocol}: {PROTOCOL_NOTES[spec.base.data.protocol]}",
            *_text_weights_line(spec),
            f"  mlflow      {redact(plan.tracking_uri)} (experiment {spec.mlflow.experiment})",
            f"  ray         {plan.address or 'a local Ray on this machine'}",
            f"  final       {plan.final_seeds} seed(s) of the best config (protocol final)",
        ]
    )


def _text_weights_line(spec: SpaceSpec) -> list[str]:
    """The plan's one warning of a random CLIP text tower; trials, seeds and plots keep quiet
    about it (`tune.trainable.quiet_random_weights`)."""
    searched = any(p.name == "text.weights" for p in spec.params)
    if spec.base.text.weights and not searched:
        return []
    which = "text.weights is searched" if searched else "text.weights is empty"
    return [
        f"  text        WARNING {which}: a trial without weights gets a RANDOM CLIP text tower; "
        f"fine for the demo and tests, for real runs set text.weights=openai or a checkpoint"
    ]
