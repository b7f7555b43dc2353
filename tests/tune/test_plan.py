"""The checks made before Ray starts, in-process: a bad study folder, store or count is one short
`error:` message, and nothing in the folder is written or changed (a dry run writes nothing)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import ray
from conftest import one_error
from ray_fixtures import write_space

from tune.driver import main
from tune.plan import planned_trials
from tune.searcher import SIZE_ATTR


def run(space: Path, *args: str) -> int:
    return main(["--space", str(space), "--final-seeds", "0", *args])


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _foreign_sqlite(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
        db.execute("INSERT INTO invoices (amount) VALUES (12.5)")


def _random_bytes(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * 64)


STORES = {
    "foreign optuna.db": ("optuna.db", _foreign_sqlite, "not the Optuna study"),
    "random-bytes optuna.db": ("optuna.db", _random_bytes, "not a readable SQLite database"),
    "foreign mlflow.db": ("mlflow.db", _foreign_sqlite, "not the MLflow tracking store"),
    "random-bytes mlflow.db": ("mlflow.db", _random_bytes, "not a readable SQLite database"),
}


@pytest.mark.parametrize("case", list(STORES))
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_store_that_is_not_ours_is_refused_and_left_alone(
    tmp_path, xd_small, capsys, case, dry_run
):
    name, make, message = STORES[case]
    space = write_space(tmp_path, xd_small)
    root = tmp_path / "studies" / "t"
    make(root / name)
    if name == "mlflow.db":  # a started study: its base config is there
        (root / "base.yaml").write_text("{}\n")
    before = files_of(root)
    status = run(space, "--resume", *(["--dry-run"] if dry_run else []))
    one_error(capsys, status, str(root / name), message, "--storage-path")
    assert files_of(root) == before
    assert not ray.is_initialized()


def test_resume_dry_run_of_a_real_study_writes_nothing(tmp_path, xd_small, capsys):
    space = write_space(tmp_path, xd_small)
    root = tmp_path / "studies" / "t"
    root.mkdir(parents=True)
    storage = f"sqlite:///{root / 'optuna.db'}"
    study = optuna.create_study(study_name="t", storage=storage, direction="maximize")
    study.set_user_attr(SIZE_ATTR, 5)
    before = files_of(root)
    assert run(space, "--resume", "--dry-run") == 0
    assert "study t: 5 trials" in capsys.readouterr().out  # the size it was started with
    assert files_of(root) == before and planned_trials(root, "t") == 5
    assert planned_trials(root, "other") is None


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num-samples", "0"], "--num-samples 0: give 1 to 100000 trials"),
        (["--num-samples", "-3"], "--num-samples -3: give 1 to"),
        (["--num-samples", "10000000000"], "--num-samples 10000000000: give 1 to"),
        (["--final-seeds", "-1"], "--final-seeds -1: give 0 (skip) to 100 seeds"),
        (["--final-seeds", "100000000"], "--final-seeds 100000000: give 0"),
        (["--address", "garbage"], "--address 'garbage' is not an address"),
        (["--address", "127.0.0.1:99999"], "(port 1-65535)"),
        (["--address", "ray://:"], "give auto, HOST:PORT or ray://HOST:PORT"),
    ],
)
def test_bad_counts_and_addresses(tmp_path, xd_small, capsys, args, needle):
    status = main(["--space", str(write_space(tmp_path, xd_small)), "--dry-run", *args])
    one_error(capsys, status, needle)
    assert not (tmp_path / "studies").exists()


@pytest.mark.parametrize(("args", "seeds"), [((), 2), (("--final-seeds", "0"), 0)])
def test_final_seeds_from_the_space_unless_the_command_line_gives_them(
    tmp_path, xd_small, capsys, args, seeds
):
    space = write_space(tmp_path, xd_small, final_seeds=2)
    assert main(["--space", str(space), "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert f"final       {seeds} seed(s) of the best config" in out
    # the demo base has no text weights: the plan says so, once (trials and seeds keep quiet)
    assert out.count("RANDOM CLIP text tower") == 1


@pytest.mark.parametrize("made", [False, True])
def test_resume_of_a_folder_that_holds_no_study(tmp_path, xd_small, capsys, made):
    space = write_space(tmp_path, xd_small)
    root = tmp_path / "studies" / "t"
    if made:
        root.mkdir(parents=True)
        (root / "notes.txt").write_text("mine\n")
    status = run(space, "--resume")
    one_error(capsys, status, "--resume", str(root), "holds no study", "without --resume")
    assert files_of(root) == ({"notes.txt": b"mine\n"} if made else {}) or not root.exists()
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "text, needle",
    [("model: {num_prototypes: 4\n", "not valid YAML"), ("[1, 2]\n", "mapping")],
)
def test_a_broken_base_config_in_the_study_folder(tmp_path, xd_small, capsys, text, needle):
    space = write_space(tmp_path, xd_small)
    root = tmp_path / "studies" / "t"
    root.mkdir(parents=True)
    (root / "base.yaml").write_text(text)
    status = run(space, "--resume")
    one_error(capsys, status, str(root / "base.yaml"), needle)
    assert (root / "base.yaml").read_text() == text


DAMAGED = {
    "data/synth.json": b"[1, 2]",
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_state_file_of_the_study(tmp_path, xd_small, capsys, name):
    space = write_space(tmp_path, xd_small)
    if name.startswith("data/"):
        import yaml

        tree = yaml.safe_load(space.read_text())
        tree["synthetic"] = {"preset": "xd-mini", "seed": 0}
        space.write_text(yaml.safe_dump(tree, sort_keys=False))
    root = tmp_path / "studies" / "t"
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(DAMAGED[name])
    (root / "base.yaml").write_text("{}\n")
    before = files_of(root)
    status = run(space, "--resume", "--dry-run")
    one_error(capsys, status, str(root / name), "delete")
    assert files_of(root) == before
