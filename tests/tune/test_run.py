"""`python tune/run.py` as users run it: bad input is one `error:` message with the file or
field and the fix, exit status 2, no traceback, and Ray is never started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from ray_fixtures import REPO, RUN_PY, write_space


def _broken_yaml(space: Path) -> list[str]:
    space.write_text(space.read_text().replace("search:", "search: {", 1))
    return ["--space", str(space)]


def _unknown_parameter(space: Path) -> list[str]:
    tree = yaml.safe_load(space.read_text())
    tree["search"]["optim.lrate"] = [1e-4, 1e-3]
    space.write_text(yaml.safe_dump(tree, sort_keys=False))
    return ["--space", str(space)]


def _existing_study(space: Path) -> list[str]:
    (space.parent / "studies" / "t" / "ray").mkdir(parents=True)
    return ["--space", str(space)]


BAD_RUNS = {
    "space file missing": (
        lambda space: ["--space", str(space.parent / "nope.yaml")],
        r"nope\.yaml.*shipped space \[",
    ),
    "space yaml syntax": (_broken_yaml, r"space\.yaml: not valid YAML; fix the syntax"),
    "space unknown parameter": (
        _unknown_parameter,
        r"search\.optim\.lrate: 'optim\.lrate' is not an ExperimentConfig field; did you mean",
    ),
    "override rejected": (
        lambda space: ["--space", str(space), "model.attn_window=60"],
        r"model\.attn_window=60: must be a divisor of model\.visual_length",
    ),
    "feature root missing": (
        lambda space: ["--space", str(space), "data.feature_root=/nonexistent/features"],
        r"data\.feature_root='/nonexistent/features' is not a folder; fix the path",
    ),
    "study exists without --resume": (_existing_study, r"holds a study already; pass --resume"),
    "no cluster at --address": (
        lambda space: ["--space", str(space), "--address", f"127.0.0.1:{free_port()}"],
        r"no Ray cluster answers at 127\.0\.0\.1:\d+ \(Connection refused\); start one",
    ),
}


def _refused_before_ray(tmp_path: Path, status: int, stderr: str, message: str) -> None:
    assert status == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("error:") == 1, stderr
    assert "Traceback" not in stderr
    assert re.search(message, stderr, re.S), stderr
    assert not list((tmp_path / "ray-tmp").iterdir())  # Ray never started
    assert not (tmp_path / "studies" / "t" / "optuna.db").exists()


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_is_one_error_message_before_ray(tmp_path, xd_small, case, capsys, monkeypatch):
    """In-process `main(argv)`; the test below runs `python tune/run.py` itself."""
    import ray

    from tune.driver import main

    make_args, message = BAD_RUNS[case]
    args = make_args(write_space(tmp_path, xd_small))
    (tmp_path / "ray-tmp").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    status = main([*args, "--final-seeds", "0"])
    _refused_before_ray(tmp_path, status, capsys.readouterr().err, message)
    assert not ray.is_initialized()


def test_run_py_refuses_bad_input_as_users_run_it(tmp_path, xd_small):
    """The one subprocess run of `python tune/run.py`: exit status and stderr as users see them."""
    make_args, message = BAD_RUNS["space unknown parameter"]
    args = make_args(write_space(tmp_path, xd_small))
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    run = subprocess.run(
        [sys.executable, str(RUN_PY), *args, "--final-seeds", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
        timeout=300,
    )
    _refused_before_ray(tmp_path, run.returncode, run.stderr, message)
