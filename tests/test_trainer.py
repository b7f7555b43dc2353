"""Training loop: exact resume, selection on validation, test once, CLI, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_run_overrides, write_tiny_tree

from dsanet.cli import main
from dsanet.config import load_config
from dsanet.trainer import BEST, CHECKPOINT, RESULT, fit


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny XD tree (5 train / 3 test videos), shared with its feature cache by the module."""
    return write_tiny_tree(tmp_path_factory.mktemp("trainer") / "tiny")


# Half of the tiny tree's videos validate, so that the stratified split holds both kinds.
TINY_VAL = "data.val_fraction=0.5"
# One epoch of one step, for the tests of what happens around training (the resume and selection
# tests keep tiny_run_overrides' 2 epochs of 3 steps).
ONE_STEP = ("train.epochs=1", "train.max_steps_per_epoch=1")


def _config(data, out_dir, *extra):
    return load_config("demo", tiny_run_overrides(data, out_dir) + [TINY_VAL, *extra])


@pytest.fixture(scope="module")
def straight_run(tiny, tmp_path_factory):
    """One uninterrupted 2-epoch tiny run: its result, the records its callback saw, its folder."""
    out = tmp_path_factory.mktemp("straight") / "run"
    seen = []
    result = fit(_config(tiny, out), on_epoch_end=lambda r, f: seen.append(r))
    return result, seen, out


@pytest.mark.slow  # trains (end to end); the default suite stays under 90 s
def test_resume_continues_exactly(straight_run, tiny, tmp_path):
    straight = straight_run[0]

    def crash_after_first(record, folder):
        assert (folder / CHECKPOINT).is_file()
        raise Crash

    cfg = _config(tiny, tmp_path / "resumed")
    with pytest.raises(Crash):
        fit(cfg, on_epoch_end=crash_after_first)
    # A kill during a checkpoint write leaves its temporary file (300 MB at the demo size).
    stale = tmp_path / "resumed" / f".{CHECKPOINT}.tmp-999999"
    stale.write_bytes(b"partial")
    resumed = fit(cfg)
    assert not stale.exists()
    assert len(resumed.history) == len(straight.history) == 2
    for a, b in zip(straight.history, resumed.history, strict=False):
        for key in a:
            if key != "seconds":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.test == pytest.approx(straight.test, rel=1e-6)


@pytest.mark.slow  # trains (end to end); the default suite stays under 90 s
def test_fit_selects_on_validation_and_tests_once(straight_run):
    result, seen, run = straight_run
    assert [int(r["epoch"]) for r in seen] == [0, 1]
    assert all("val_ap" in r and not any(k.startswith("test_") for k in r) for r in seen)
    vals = [r["val_ap"] for r in seen]
    assert result.best_metric == max(vals) and result.best_epoch == vals.index(max(vals))
    saved = json.loads((run / RESULT).read_text())
    assert saved["test"]["ap"] == result.test["ap"] and 0 <= result.test["auc"] <= 1
    state = torch.load(run / BEST, weights_only=True)
    assert not any(
        k.startswith("text_encoder.tower") or "clip" in k.lower()
        for k in state
        if "adapter" not in k and "projection" not in k
    )
    assert not list(run.glob(".*tmp*"))


@pytest.mark.slow  # trains (end to end); the default suite stays under 90 s
def test_callback_can_stop_early(tiny, tmp_path):
    # 2 epochs (tiny_run_overrides'), of one step each: the callback stops after the first.
    cfg = _config(tiny, tmp_path / "stop", "train.max_steps_per_epoch=1")
    result = fit(cfg, on_epoch_end=lambda r, f: True)
    assert len(result.history) == 1 and result.test


@pytest.mark.slow  # trains (end to end); the default suite stays under 90 s
def test_reference_protocol_selects_on_test(tiny, tmp_path):
    cfg = _config(tiny, tmp_path / "ref", "data.protocol=reference", *ONE_STEP)
    result = fit(cfg)
    assert result.select_metric == "test_ap"
    assert "test_map_avg" in result.history[0]


def test_dsanet_command_answers_bad_input_as_users_run_it():
    """The default suite's subprocess run of `python -m dsanet`: bad input, exit 2, one line on
    stderr, before the trainer (torch, open_clip) is imported. It trains in the slow test below."""
    run = subprocess.run(
        [sys.executable, "-m", "dsanet", "train", "--config", "demo", "model.attn_window=60"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 2 and run.stdout == "", run
    assert run.stderr.startswith("error: ") and "model.attn_window=60" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) <= 3 and "Traceback" not in run.stderr


@pytest.mark.slow  # a subprocess that imports torch and open_clip (13 s here) and trains
def test_cli_train_then_evaluate(tiny, tmp_path, capsys):
    """`python -m dsanet train` in a subprocess; the evaluation of its run is in-process."""
    out = tmp_path / "cli"
    args = tiny_run_overrides(tiny, out) + [TINY_VAL, *ONE_STEP]
    run = subprocess.run(
        [sys.executable, "-m", "dsanet", "train", "--config", "demo", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert "val_ap" in printed and "test_ap" in printed
    status = main(["evaluate", "--checkpoint", str(out / BEST)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert json.loads(captured.out)["ap"] == pytest.approx(printed["test_ap"], rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "demo", "model.attn_window=60"], "model.attn_window=60"),
        (["train", "--config", "demo", "data.feature_root=/nonexistent"], "data.feature_root"),
        (["train", "--config", "/nonexistent.yaml"], "not found"),
        (["evaluate", "--checkpoint", "/nonexistent/best.pt"], "not found"),
        (["train", "--config", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML"),
        (["evaluate", "--checkpoint", "{tmp}/run/best.pt"], "best.pt is not a torch.save file"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    """In-process `main(argv)`: the subprocess path is covered by the two tests above."""
    (tmp_path / "broken.yaml").write_text("model: {num_prototypes: 4\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(load_config("demo").to_yaml())
    (tmp_path / "run" / "best.pt").write_bytes(b"half a checkpoint")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    status = main([*argv, "data.list_dir=/tmp"] if argv[0] == "train" else argv)
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert "Traceback" not in stderr and message in stderr
    assert stderr.strip().startswith("error:") and stderr.count("error:") == 1


@pytest.mark.slow  # trains (end to end); the default suite stays under 90 s
def test_final_protocol_trains_on_all_videos_and_keeps_last_epoch(tiny, tmp_path):
    cfg = _config(tiny, tmp_path / "final", "data.protocol=final", "data.val_fraction=0", *ONE_STEP)
    result = fit(cfg)
    assert result.select_metric == "" and result.best_epoch == -1
    # best.pt holds the weights to use under every protocol: here the last epoch's.
    best = torch.load(tmp_path / "final" / BEST, weights_only=True)
    last = torch.load(tmp_path / "final" / CHECKPOINT, weights_only=True)["model"]
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
    assert not any(k.startswith("val_") for k in result.history[0]) and "ap" in result.test


@pytest.mark.slow  # trains (end to end); the default suite stays under 90 s
def test_fit_without_test_never_reads_the_test_split(tiny, tmp_path):
    from dsanet.loading import read_test_inputs

    apart = tmp_path / "test-features"  # the test features exist, and cannot be read
    apart.mkdir()
    for path in read_test_inputs(_config(tiny, tmp_path).data).videos.paths:
        (apart / path.name).write_bytes(b"not a feature file")
    cfg = _config(tiny, tmp_path / "run", f"data.test_feature_root={apart}", *ONE_STEP)
    result = fit(cfg, test=False)
    assert result.test == {} and result.best_epoch == 0
    saved = json.loads((tmp_path / "run" / RESULT).read_text())
    assert "test" not in saved and not any(k.startswith("test") for k in saved["history"][0])
    for path in apart.iterdir():  # and with no test features at all, a test pass is refused
        path.unlink()
    with pytest.raises(FileNotFoundError, match="test feature file"):
        fit(cfg)


def test_result_files_are_strict_json(tmp_path):
    """No NaN or Infinity (not JSON): a metric without a finite value yet is null."""
    import numpy as np

    from dsanet.trainer import write_json_atomic

    result = {"best_metric": -float("inf"), "h": [np.float32(0.5), float("nan")]}
    write_json_atomic(result, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "best_metric": None,
        "h": [0.5, None],
    }
