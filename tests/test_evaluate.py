"""Evaluation of a finished run: the loader, and the video-level class guesses and confusion
against a per-video loop written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dsanet.config import EvalConfig, load_config
from dsanet.evaluate import class_confusion, video_class_predictions, video_class_scores
from dsanet.model import belief_modulation
from dsanet.runs import load_run
from dsanet.trainer import BEST, CHECKPOINT, CONFIG, RESULT


@pytest.fixture(scope="module")
def tiny_run(tiny_finished_run) -> Path:
    """The folder of a finished 1-epoch, 1-step tiny run (copy it before changing it)."""
    return tiny_finished_run


@pytest.fixture(scope="module")
def tiny_predictions(tiny_run) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The tiny run's test logits per video, and the test targets (V, C)."""
    run = load_run(tiny_run)
    return run.predict_test(), run.bundle.test.videos.targets


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _set_protocol(run: Path, protocol: str) -> None:
    (run / CONFIG).write_text(load_config(run / CONFIG, [f"data.protocol={protocol}"]).to_yaml())


def test_load_run_reproduces_the_runs_test_metrics(tiny_run):
    saved = json.loads((tiny_run / RESULT).read_text())["test"]
    for path in (tiny_run, tiny_run / BEST):
        run = load_run(path)
        assert run.checkpoint == tiny_run / BEST and not run.model.training
        # the mAP needs the class text features: the random text tower is rebuilt as trained
        assert run.test_metrics() == pytest.approx(saved, rel=1e-6, abs=1e-9)


def test_load_run_for_validation_reads_no_test_split(tiny_run, tmp_path):
    run = load_run(tiny_run, [f"data.test_feature_root={tmp_path}"], split="val")  # no features
    assert run.bundle.test is None
    assert set(run.validation_metrics()) >= {"val_ap", "val_auc", "val_class_acc"}


def test_a_final_run_without_best_uses_the_last_epoch(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    (run_dir / BEST).unlink()
    with pytest.raises(FileNotFoundError, match="no epoch was selected yet"):
        load_run(run_dir)
    _set_protocol(run_dir, "final")
    run = load_run(run_dir)
    assert run.checkpoint == run_dir / CHECKPOINT
    last = torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]
    state = run.model.trainable_state_dict()
    assert state.keys() == last.keys() and all(torch.equal(state[k], last[k]) for k in last)
    with pytest.raises(ValueError, match="data.protocol=final.*--split test"):
        load_run(run_dir, split="val")


def test_load_run_errors_name_the_path(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere not found; runs write last.pt"):
        load_run(tmp_path / "nowhere")
    run_dir = _copy(tiny_run, tmp_path)
    (run_dir / BEST).unlink()
    (run_dir / CHECKPOINT).unlink()
    _set_protocol(run_dir, "final")
    with pytest.raises(FileNotFoundError, match="holds no best.pt; pass the folder of a run"):
        load_run(run_dir)
    with pytest.raises(ValueError, match="drop that override"):
        load_run(tiny_run, ["data.protocol=final"], split="val")


def _loop_scores(predictions, cfg: EvalConfig, divisor: int) -> np.ndarray:
    """Per video and class: the mean of the k largest snippet probabilities, in plain loops."""
    scores = []
    for det, align in predictions:
        det_t, align_t = torch.from_numpy(det).float(), torch.from_numpy(align).float()
        if cfg.class_probs == "hbm":
            probs = belief_modulation(det_t, align_t, cfg.temperature).double().numpy()
        else:
            probs = torch.softmax(align_t.double(), dim=-1).numpy()
        k = min(len(probs) // divisor + 1, len(probs))
        scores.append([np.mean(sorted(probs[:, c], reverse=True)[:k]) for c in range(len(align.T))])
    return np.array(scores)


def _random_predictions(num_classes: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (
            rng.normal(size=(n, 1)).astype(np.float32),
            (3 * rng.normal(size=(n, num_classes))).astype(np.float32),
        )
        for n in (1, 2, 15, 16, 17, 40, 300)
    ]


@pytest.mark.parametrize("class_probs, temperature", [("hbm", 1.0), ("hbm", 0.5), ("softmax", 1)])
@pytest.mark.parametrize("divisor", [16, 3, 1])
def test_class_guesses_match_a_per_video_loop(tiny_predictions, class_probs, temperature, divisor):
    cfg = EvalConfig(temperature=temperature, class_probs=class_probs)
    predictions, _ = tiny_predictions
    for videos in (predictions, _random_predictions()):
        expected = _loop_scores(videos, cfg, divisor)
        scores = video_class_scores(videos, cfg, divisor)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
        guesses = video_class_predictions(videos, cfg, divisor)
        assert guesses.tolist() == (expected[:, 1:].argmax(axis=1) + 1).tolist()


def test_confusion_of_the_tiny_run(tiny_predictions):
    predictions, targets = tiny_predictions
    guesses = video_class_predictions(predictions, EvalConfig(), 16)
    matrix = class_confusion(guesses, targets)
    anomalous = targets[:, 0] == 0
    assert matrix.shape == (targets.shape[1] - 1,) * 2 and matrix.sum() == anomalous.sum() == 1
    true = int(np.flatnonzero(targets[anomalous][0])[0])
    assert matrix[true - 1, guesses[anomalous][0] - 1] == 1


def test_class_confusion_counts_multi_label_videos_as_right():
    targets = np.array(
        [
            [0, 1, 0, 0],  # class 1, predicted 1: right
            [0, 0, 1, 1],  # classes 2 and 3, predicted 3: right
            [0, 1, 0, 0],  # class 1, predicted 2: wrong
            [1, 0, 0, 0],  # normal: not counted
        ],
        dtype=np.float32,
    )
    matrix = class_confusion(np.array([1, 3, 2, 2]), targets)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[0, 0] = expected[2, 2] = expected[0, 1] = 1
    np.testing.assert_array_equal(matrix, expected)
