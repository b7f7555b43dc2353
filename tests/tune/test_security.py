"""Security properties of the code that ships: YAML is only safe-loaded, checkpoints are loaded
with weights_only=True, what the project starts listens on 127.0.0.1 where it can choose, and
no environment variable reaches MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from ray_fixtures import (
    REPO,
    start_study,
    study_trials,
    tiny_overrides,
    write_space,
)

SOURCES = sorted(p for folder in ("dsanet", "tune", "bench") for p in (REPO / folder).rglob("*.py"))
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}
UNSAFE_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}


def _attribute_uses(name: str) -> list[tuple[Path, int, str]]:
    """(file, line, attribute) of every `<name>.<attribute>` in the shipped sources."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == name
            ):
                found.append((path.relative_to(REPO), node.lineno, node.attr))
    return found


def test_sources_are_found():
    assert len(SOURCES) > 30 and REPO / "tune" / "driver.py" in SOURCES


def test_yaml_is_parsed_only_by_the_strict_loader():
    """dsanet/yamlio.py is the one place that parses YAML (aliases, duplicate keys, oversize
    input refused); everything else calls its functions."""
    yamlio = REPO / "dsanet" / "yamlio.py"
    uses = _attribute_uses("yaml")
    unsafe = [u for u in uses if u[2] in UNSAFE_YAML | UNSAFE_LOADERS]
    assert not unsafe, f"parse YAML with dsanet.yamlio: {unsafe}"
    parsing = {"safe_load", "safe_load_all", "compose", "parse", "scan"}
    elsewhere = [u for u in uses if u[2] in parsing and REPO / u[0] != yamlio]
    assert not elsewhere, f"parse YAML with dsanet.yamlio: {elsewhere}"
    callers = [p for p in SOURCES if "load_yaml_file" in p.read_text() and p != yamlio]
    assert len(callers) >= 5, callers  # config, datasets, space, plan, trainable, ...
    for path in SOURCES:  # no `from yaml import load` either
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                assert not {a.name for a in node.names} & (UNSAFE_YAML | UNSAFE_LOADERS), path


def test_no_pickle_is_loaded_but_by_the_restricted_reader():
    """Untrusted files are never unpickled: numpy never gets allow_pickle=True, and the only
    unpickler is dsanet/npyio.py's, which builds nothing but lists, strings and numbers."""
    npyio = REPO / "dsanet" / "npyio.py"
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                flags = {k.arg: k.value for k in node.keywords}
                allowed = flags.get("allow_pickle")
                if node.func.attr != "save" and allowed is not None:  # np.save only writes
                    assert isinstance(allowed, ast.Constant) and allowed.value is False, where
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler"):
                if isinstance(node.value, ast.Name) and node.value.id in ("pickle", "cloudpickle"):
                    assert path == npyio, f"{where} unpickles"


def test_every_torch_load_passes_weights_only_true():
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flags = {k.arg: k.value for k in node.keywords}
                safe = (
                    isinstance(flags.get("weights_only"), ast.Constant)
                    and flags["weights_only"].value is True
                )
                calls.append((path.relative_to(REPO), node.lineno, safe))
    assert calls, "no torch.load found: the check looks in the wrong place"
    assert all(safe for *_, safe in calls), [c for c in calls if not c[2]]


def test_what_the_search_starts_listens_locally():
    """The driver's own Ray has no dashboard (an HTTP server); its gRPC ports are Ray's choice
    (all interfaces, behind Ray's token authentication). The tracking hint runs `mlflow ui`,
    which binds 127.0.0.1, and nothing in the sources asks for all interfaces."""
    from tune.driver import _ray_args

    assert _ray_args(None) == {"address": "local", "include_dashboard": False}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "0.0.0.0" not in node.value, (
                    path,
                    node.lineno,
                )


SECRET_NAME, SECRET = "DSANET_TEST_SECRET", "s3cr3t-value-7f1c"


@pytest.mark.slow
def test_no_environment_variable_reaches_mlflow(tmp_path, xd_small, ray_tmp, monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET)
    one_epoch = tiny_overrides(xd_small, **{"train.epochs": 1})
    space = write_space(
        tmp_path, xd_small, overrides=one_epoch, num_samples=1, scheduler={"kind": "none"}
    )
    log = tmp_path / "study.log"
    proc = start_study(["--space", str(space), "--final-seeds", "1"], log, ray_tmp)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    root = tmp_path / "studies" / "t"
    assert len(study_trials(root)) == 1

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    kinds = sorted(r.data.tags.get("dsanet.role") or r.data.tags["dsanet.stage"] for r in runs)
    assert kinds == ["final", "search", "study"]  # parent, trial and final run all logged
    for run in runs:
        logged = [run.data.params, run.data.tags, run.data.metrics]
        assert SECRET not in repr(logged) and SECRET_NAME not in repr(logged), run.info.run_id
    artifacts = [p for p in (root / "mlartifacts").rglob("*") if p.is_file()]
    assert len(artifacts) > 5
    for path in [root / "mlflow.db", *artifacts]:  # every byte MLflow holds
        data = path.read_bytes()
        assert SECRET.encode() not in data and SECRET_NAME.encode() not in data, path
