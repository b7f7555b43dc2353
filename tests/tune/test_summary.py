"""The console summary of a study, from a real Optuna study written through the searcher."""

from __future__ import annotations

from pathlib import Path

from test_searcher import make_spec, run_epochs

from tune.searcher import OptunaSearcher
from tune.summary import ranked_trials, short_names, summarize


def study_of(tmp_path: Path, **fields):
    """Four trials: two complete (0.7, 0.6 at max_t), one pruned (0.8 early), one failed."""
    spec = make_spec(tmp_path, **fields)
    searcher = OptunaSearcher(spec, tmp_path / "study", pruned=lambda number: number == 2)  # "p"
    for ray_id, scores in {"a": [0.5, 0.6, 0.7], "b": [0.6, 0.6, 0.6], "p": [0.8]}.items():
        searcher.suggest(ray_id)
        searcher.on_trial_complete(ray_id, result=run_epochs(searcher, ray_id, scores))
    searcher.suggest("f")
    searcher.on_trial_complete("f", error=True)
    return spec, searcher.study


def test_complete_trials_rank_first_then_pruned_ones_by_their_last_score(tmp_path):
    spec, study = study_of(tmp_path)
    ranked = ranked_trials(study, spec)
    assert [t.user_attrs["ray_trial_id"] for t in ranked] == ["a", "b", "p"]  # no failed trial


def test_summary_counts_states_and_shows_the_top_trials(tmp_path):
    spec, study = study_of(tmp_path)
    text = summarize(study, spec)
    head, title, header, _, *rows = text.strip().splitlines()
    counts = "2 complete, 1 fail, 1 pruned"
    assert head == f"study {spec.name}: 4 of {spec.num_samples} trials ({counts})"
    assert "best val_ap first" in title and "pruned scores are early" in title
    assert header.split()[:5] == ["trial", "ray", "id", "status", "epochs"]
    assert [row.split()[1:4] for row in rows] == [
        ["a", "complete", "3"],
        ["b", "complete", "3"],
        ["p", "pruned", "1"],
    ]
    assert rows[0].split()[4] == "0.7000" and rows[2].split()[4] == "0.8000"


def test_short_names_keep_ambiguous_leaves_dotted():
    names = ["optim.lr", "model.num_prototypes", "loss.lambda_k", "text.lambda_k"]
    assert short_names(names) == {
        "optim.lr": "lr",
        "model.num_prototypes": "num_prototypes",
        "loss.lambda_k": "loss.lambda_k",
        "text.lambda_k": "text.lambda_k",
    }
