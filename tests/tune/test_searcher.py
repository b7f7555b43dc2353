"""The Optuna searcher, driven the way Ray drives it (no Ray runtime).

What Optuna is told: COMPLETE at max_t with the selected epoch's values, PRUNED when ASHA
stopped the trial, FAIL on error, nothing for an interrupted trial; each epoch recorded once;
starting points enqueued once per study; orphaned trials adopted after a driver crash; the
directions and scheduler settings a study started with are kept.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray_fixtures import MAX_T, write_space

from tune.layout import StudyFolder
from tune.searcher import (
    ADOPTED_ATTR,
    EPOCHS_ATTR,
    OPTUNA_KEY,
    RAY_TRIAL_ATTR,
    SCHEDULER_ATTR,
    SEARCHER_ATTR,
    STEP_KEY,
    OptunaSearcher,
    open_study,
    selected_values,
)
from tune.space import load_space

FAKE_DATA = {"lists": Path("/nowhere/lists"), "features": Path("/nowhere/f"), "cache": Path("/c")}


def make_spec(tmp_path: Path, **fields):
    return load_space(write_space(tmp_path / "space", FAKE_DATA, **fields))


def result(epoch: int, val_ap: float, best: float, val_auc: float = 0.5) -> dict:
    """A flattened Tune result as Ray hands it to the searcher (epoch: epochs completed)."""
    return {
        STEP_KEY: epoch,
        "epoch": epoch - 1,
        "val_ap": val_ap,
        "val_auc": val_auc,
        "best_val_ap": best,
        "loss_total": 1.0,
    }


def run_epochs(searcher: OptunaSearcher, trial_id: str, scores: list[float], **extra) -> dict:
    best, last = -1.0, {}
    for epoch, score in enumerate(scores, start=1):
        best = max(best, score)
        last = result(epoch, score, best, **extra)
        searcher.on_trial_result(trial_id, last)
    return last


def trial_of(searcher: OptunaSearcher, trial_id: str):
    (trial,) = [t for t in searcher.study.trials if t.user_attrs[RAY_TRIAL_ATTR] == trial_id]
    return trial


def test_complete_trial_is_told_its_selected_epoch(tmp_path):
    spec = make_spec(tmp_path)
    searcher = OptunaSearcher(spec, tmp_path / "study")
    config = searcher.suggest("a")
    assert config[OPTUNA_KEY] == 0 and set(config) - {OPTUNA_KEY} == {p.name for p in spec.params}
    last = run_epochs(searcher, "a", [0.5, 0.7, 0.6])
    searcher.on_trial_complete("a", result=last)
    trial = trial_of(searcher, "a")
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.7)  # best_val_ap's epoch, the weights fit() keeps
    assert trial.intermediate_values == {1: 0.5, 2: 0.7, 3: 0.6}


def test_asha_stop_is_pruned_with_its_intermediate_values(tmp_path):
    searcher = OptunaSearcher(make_spec(tmp_path), tmp_path / "study", pruned=lambda n: n == 0)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.4, 0.4))
    # ASHA's STOP result never reaches on_trial_result: it arrives with on_trial_complete.
    searcher.on_trial_complete("a", result=result(2, 0.3, 0.4))
    trial = trial_of(searcher, "a")
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.4, 2: 0.3}
    assert len(trial.intermediate_values) < MAX_T


def test_error_fails_and_interruption_leaves_running(tmp_path):
    searcher = OptunaSearcher(make_spec(tmp_path), tmp_path / "study", pruned=lambda n: False)
    searcher.suggest("bad")
    searcher.suggest("cut")
    searcher.on_trial_complete("bad", error=True)
    searcher.on_trial_complete("cut", result=run_epochs(searcher, "cut", [0.5]))
    assert trial_of(searcher, "bad").state == TrialState.FAIL
    assert trial_of(searcher, "cut").state == TrialState.RUNNING  # carried on by --resume


def test_replayed_epochs_and_completions_change_nothing(tmp_path):
    searcher = OptunaSearcher(make_spec(tmp_path), tmp_path / "study")
    searcher.suggest("a")
    run_epochs(searcher, "a", [0.5, 0.6])
    searcher.on_trial_result("a", result(2, 0.9, 0.9))  # epoch 2 again: a restart replays it
    last = run_epochs(searcher, "a", [0.5, 0.6, 0.55])
    searcher.on_trial_complete("a", result=last)
    searcher.on_trial_complete("a", result=result(3, 0.99, 0.99))
    trial = trial_of(searcher, "a")
    assert trial.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.55}
    assert trial.value == pytest.approx(0.6)


def test_points_are_enqueued_once_per_study(tmp_path):
    spec = make_spec(tmp_path)
    searcher = OptunaSearcher(spec, tmp_path / "study")
    first = searcher.suggest("a")
    assert {k: v for k, v in first.items() if k != OPTUNA_KEY} == spec.points_to_evaluate[0]
    searcher.on_trial_complete("a", error=True)
    OptunaSearcher(spec, tmp_path / "study").suggest("b")  # a restarted driver
    study = open_study(spec, tmp_path / "study")
    assert len(study.trials) == 2  # the base point was not queued a second time
    assert study.trials[1].params != spec.points_to_evaluate[0]


def test_a_new_driver_adopts_the_trials_left_running_first(tmp_path):
    spec = make_spec(tmp_path, points_to_evaluate=[])
    old = OptunaSearcher(spec, tmp_path / "study")
    left = [old.suggest(ray_id) for ray_id in ("a", "b")]  # the driver died with a, b running
    old.on_trial_complete("a", result=run_epochs(old, "a", [0.1]))  # interrupted: RUNNING
    new = OptunaSearcher(spec, tmp_path / "study")  # --resume: a new Tuner, new Ray ids
    adopted = [new.suggest(ray_id) for ray_id in ("c", "d")]
    assert adopted == left  # same Optuna trials and values: folders and runs keyed by number
    assert [trial_of(new, t).user_attrs[ADOPTED_ATTR] for t in ("c", "d")] == ["a", "b"]
    assert new.suggest("e")[OPTUNA_KEY] == 2  # then new asks
    new.on_trial_complete("c", result=run_epochs(new, "c", [0.1, 0.2, 0.3]))
    assert trial_of(new, "c").intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}  # 1 kept once
    assert trial_of(new, "c").state == TrialState.COMPLETE


def test_a_finished_trials_resume_state_is_dropped(tmp_path):
    spec = make_spec(tmp_path, points_to_evaluate=[])
    searcher = OptunaSearcher(spec, tmp_path / "study", pruned=lambda n: n == 1)
    folders = {}
    for ray_id in ("done", "pruned", "cut"):
        number = searcher.suggest(ray_id)[OPTUNA_KEY]
        folders[ray_id] = StudyFolder(tmp_path / "study").trial_dir(number)
        folders[ray_id].mkdir(parents=True)
        for name in ("last.pt", "best.pt"):
            (folders[ray_id] / name).write_bytes(b"state")
    searcher.on_trial_complete("done", result=run_epochs(searcher, "done", [0.1, 0.2, 0.3]))
    searcher.on_trial_complete("pruned", result=run_epochs(searcher, "pruned", [0.1]))
    searcher.on_trial_complete("cut", result=run_epochs(searcher, "cut", [0.1]))  # interrupted
    assert {k: (f / "last.pt").exists() for k, f in folders.items()} == {
        "done": False,
        "pruned": False,
        "cut": True,  # RUNNING: a --resume continues from it
    }
    assert all((f / "best.pt").is_file() for f in folders.values())


def test_multi_objective_values_and_pareto_front(tmp_path):
    spec = make_spec(tmp_path, metric=["val_ap", "val_auc"], mode=["max", "max"])
    searcher = OptunaSearcher(spec, tmp_path / "study", pruned=lambda n: n == 2)  # "p"
    for trial_id in ("a", "b", "p"):
        searcher.suggest(trial_id)
    for epoch, (ap, auc) in enumerate([(0.5, 0.6), (0.8, 0.7), (0.6, 0.9)], start=1):
        searcher.on_trial_result("a", result(epoch, ap, max(0.5, ap), val_auc=auc))
    searcher.on_trial_complete("a", result=result(3, 0.6, 0.8, val_auc=0.9))
    searcher.on_trial_complete("b", result=run_epochs(searcher, "b", [0.7] * 3, val_auc=0.75))
    searcher.on_trial_complete("p", result=run_epochs(searcher, "p", [0.99], val_auc=0.99))
    a, b, p = (trial_of(searcher, t) for t in ("a", "b", "p"))
    assert a.values == [0.8, 0.7]  # both objectives at val_ap's best epoch
    assert p.state == TrialState.PRUNED and p.values is None
    assert p.intermediate_values == {}  # Optuna forbids report(); the epochs live in a user attr
    assert p.user_attrs[EPOCHS_ATTR]["1"]["values"] == [0.99, 0.99]
    assert {t.number for t in searcher.study.best_trials} == {a.number, b.number}


def test_selected_values_fall_back_to_the_last_epoch():
    epochs = {1: {"values": [2.0], "select": float("nan")}, 2: {"values": [1.0], "select": None}}
    assert selected_values(epochs) == [1.0]
    ties = {1: {"values": [1.0], "select": 0.5}, 2: {"values": [2.0], "select": 0.5}}
    assert selected_values(ties) == [1.0]  # the first best epoch, as fit() selects


def test_directions_of_a_stored_study_must_match(tmp_path):
    open_study(make_spec(tmp_path), tmp_path / "study")
    with pytest.raises(ValueError, match="directions"):
        open_study(make_spec(tmp_path, mode="min"), tmp_path / "study")


@pytest.mark.parametrize(
    "changed, needle",
    [
        ({"scheduler": {"kind": "asha", "max_t": MAX_T - 1}}, "max_t 3"),
        (
            {"scheduler": {"kind": "asha", "max_t": MAX_T, "reduction_factor": 3}},
            "reduction_factor",
        ),
        ({"scheduler": {"kind": "none"}}, "kind 'asha'"),
        ({"metric": "val_auc"}, "metric 'val_ap'"),
    ],
)
def test_scheduler_settings_of_a_stored_study_must_match(tmp_path, changed, needle):
    study = open_study(make_spec(tmp_path), tmp_path / "study")
    pinned = study.user_attrs[SCHEDULER_ATTR]
    assert pinned == {
        "kind": "asha",
        "metric": "val_ap",
        "mode": "max",
        "max_t": MAX_T,
        "grace_period": 1,
        "reduction_factor": 2.0,
    }
    with pytest.raises(ValueError, match="scheduler settings") as error:
        open_study(make_spec(tmp_path, **changed), tmp_path / "study")
    assert needle in str(error.value) and "--storage-path" in str(error.value)
    again = open_study(make_spec(tmp_path), tmp_path / "study")  # the same settings: resumed
    assert again.user_attrs[SCHEDULER_ATTR] == pinned


def test_a_gp_study_is_told_each_end_and_keeps_its_sampler(tmp_path):
    """searcher.kind gp: Optuna's GPSampler proposes once enough trials completed (pruned ones
    do not count, nor inform it), also while another trial runs; the bookkeeping is the same as
    TPE's, and a resume with another kind is refused."""
    gp = {"kind": "gp", "seed": 0, "n_startup_trials": 2}
    spec = make_spec(tmp_path, searcher=gp, num_samples=8, points_to_evaluate=[])
    searcher = OptunaSearcher(spec, tmp_path / "study", pruned=lambda n: n == 2)
    assert isinstance(searcher.study.sampler, optuna.samplers.GPSampler)
    for trial_id, scores in (("a", [0.3, 0.5, 0.4]), ("b", [0.6, 0.6, 0.7]), ("c", [0.1])):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, result=run_epochs(searcher, trial_id, scores))
    states = [trial_of(searcher, t).state for t in "abc"]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trial_of(searcher, "b").value == pytest.approx(0.7)
    assert trial_of(searcher, "c").intermediate_values == {1: 0.1}
    searcher.suggest("d")
    searcher.suggest("e")  # asked while d runs: d's parameters are a pending point
    for trial_id in "de":
        attrs = searcher.study.trials[trial_of(searcher, trial_id).number].system_attrs
        assert any(key.startswith("gp:relative_params") for key in attrs), trial_id
    searcher.on_trial_complete("d", result=run_epochs(searcher, "d", [0.2, 0.3, 0.4]))
    assert trial_of(searcher, "d").state == TrialState.COMPLETE
    assert trial_of(searcher, "e").state == TrialState.RUNNING
    assert searcher.study.user_attrs[SEARCHER_ATTR] == {"kind": "gp"}

    tpe = {**gp, "kind": "tpe"}
    with pytest.raises(ValueError, match="started with searcher settings kind 'gp'") as error:
        open_study(make_spec(tmp_path, searcher=tpe, num_samples=8), tmp_path / "study")
    assert "kind 'tpe'" in str(error.value) and "--storage-path" in str(error.value)
    again = open_study(make_spec(tmp_path, searcher=gp, num_samples=8), tmp_path / "study")
    assert isinstance(again.sampler, optuna.samplers.GPSampler)  # the same kind: resumed
