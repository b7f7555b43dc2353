"""The driver's console: one line per trial event naming the Optuna number and the Ray id, a
rate-limited one-line summary, and a dsanet warning shown once in a worker that imported
open_clip. Hooks are driven directly with stub trials: no Ray runtime."""

from __future__ import annotations

import logging

from ray.tune.experiment import Trial
from test_searcher import make_spec, result

from tune.console import Console
from tune.searcher import OPTUNA_KEY


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def trial(spec, number: int, ray_id: str) -> Trial:
    config = {p.name: 0.5 for p in spec.params} | {OPTUNA_KEY: number}
    return Trial("x", config=config, trial_id=ray_id, stub=True)


def feed(console: Console, t: Trial, scores: list[float]) -> None:
    best = -1.0
    for epoch, score in enumerate(scores, start=1):
        best = max(best, score)
        console.on_trial_result(0, [t], t, result(epoch, score, best))


def test_each_trial_event_is_one_line_with_its_optuna_number_and_ray_id(tmp_path, capsys):
    spec = make_spec(tmp_path)
    max_t = spec.scheduler.max_t
    rungs = [1, max_t]  # at max_t the trial completes: no "kept" line there
    console = Console(spec, pruned=lambda number: number == 4, rungs=rungs, clock=Clock())
    done, pruned = trial(spec, 3, "r_c"), trial(spec, 4, "r_p")
    for t in (done, pruned):
        console.on_trial_start(0, [done, pruned], t)
    feed(console, done, [0.6, 0.9] + [0.7] * (max_t - 2))  # told: its best epoch, 0.9
    console.on_trial_complete(0, [done, pruned], done)
    feed(console, pruned, [0.2])  # stopped at the rung: no "kept" line
    console.on_trial_complete(0, [done, pruned], pruned)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert all(line.startswith(("trial 3 (ray r_c) ", "trial 4 (ray r_p) ")) for line in lines)
    started, _, kept, complete, prune = lines
    assert "started: " in started and "=0.5" in started
    assert kept == "trial 3 (ray r_c) kept at rung epoch 1: val_ap=0.6000"
    assert complete == f"trial 3 (ray r_c) complete after {max_t} epochs: val_ap=0.9000"
    assert prune == "trial 4 (ray r_p) pruned at epoch 1: val_ap=0.2000"


def test_a_trial_paused_by_promotion_asha_is_said_paused(tmp_path, capsys):
    spec = make_spec(tmp_path)
    console = Console(spec, pruned=lambda n: False, rungs=[1, 2], paused=lambda: {5: 1})
    feed(console, trial(spec, 5, "r_w"), [0.3])
    feed(console, trial(spec, 6, "r_k"), [0.8])
    assert capsys.readouterr().out.splitlines() == [
        "trial 5 (ray r_w) paused at rung epoch 1: val_ap=0.3000",
        "trial 6 (ray r_k) kept at rung epoch 1: val_ap=0.8000",
    ]


def test_an_errored_trial_says_where_its_error_is(tmp_path, capsys):
    spec = make_spec(tmp_path)
    t = trial(spec, 7, "r_e")
    Console(spec, ray_dir=tmp_path / "ray").on_trial_error(0, [t], t)
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"trial 7 (ray r_e) failed (see {tmp_path}/ray/r_e/error.txt)"


def test_the_summary_line_comes_at_most_every_30_seconds(tmp_path, capsys):
    spec = make_spec(tmp_path)
    clock = Clock()
    console = Console(spec, clock=clock)
    t = trial(spec, 0, "r_0")
    feed(console, t, [0.4] * spec.scheduler.max_t)
    console.on_trial_complete(0, [t], t)
    capsys.readouterr()
    for now in (10, 29, 31, 40, 60, 61.5):
        clock.now = now
        console.on_step_begin(0, [t])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[0m31s] 0 running, 1 complete, 0 pruned, 0 failed; best val_ap=0.4000 (trial 0)",
        "[1m01s] 0 running, 1 complete, 0 pruned, 0 failed; best val_ap=0.4000 (trial 0)",
    ]


def test_a_dsanet_warning_after_open_clip_reaches_stderr_once(capsys):
    import open_clip  # noqa: F401

    from tune.trainable import _said_in_the_plan, worker_logging

    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        # What open_clip's root `logging.info` leaves in a worker: a root stderr handler.
        root.addHandler(logging.StreamHandler())
        worker_logging()
        worker_logging()  # a reused worker runs it again
        logging.getLogger("dsanet.data").warning("a video is shorter than T")
        # The random text tower: said once by the driver's plan, by no trial or seed.
        logging.getLogger("dsanet.text").warning("text.weights is empty: RANDOM weights")
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        err = capsys.readouterr().err
        assert err == "WARNING dsanet.data: a video is shorter than T\n"
    finally:
        root.handlers[:] = saved
        for logger in (root, logging.getLogger("dsanet.text")):
            logger.removeFilter(_said_in_the_plan)
        for name in ("dsanet", "tune"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
