"""The console summary of a study: trial counts, the top trials, and where everything is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tune.space import SpaceSpec

TOP_TRIALS = 5


def summarize(study: Any, spec: SpaceSpec) -> str:
    """Trial counts, then the top trials: status, epochs, objectives, the parameters that vary."""
    from tune.searcher import RAY_TRIAL_ATTR, epoch_records

    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    head = f"\nstudy {spec.name}: {len(trials)} of {spec.num_samples} trials ({counts})"
    top = ranked_trials(study, spec)[:TOP_TRIALS]
    if not top:
        return head
    varying = [p.name for p in spec.params if len({repr(t.params.get(p.name)) for t in trials}) > 1]
    header = ["trial", "ray id", "status", "epochs", *spec.metric, *short_names(varying).values()]
    rows = [
        [
            str(t.number),
            str(t.user_attrs.get(RAY_TRIAL_ATTR, "")),
            t.state.name.lower(),
            str(len(epoch_records(t))),
            *(f"{v:.4f}" for v in _shown_values(t, len(spec.metric))),
            *(_format(t.params.get(name)) for name in varying),
        ]
        for t in top
    ]
    order = "Pareto front first" if len(spec.metric) > 1 else f"best {spec.metric[0]} first"
    return "\n".join(
        [head, f"top trials ({order}; pruned scores are early):", _table(header, rows)]
    )


def ranked_trials(study: Any, spec: SpaceSpec) -> list[Any]:
    """Complete trials best first (a multi-objective Pareto front first, by the first
    objective), then pruned ones by their last score."""
    from optuna.trial import TrialState

    sign = -1.0 if spec.mode[0] == "max" else 1.0
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials} if len(spec.metric) > 1 and complete else set()
    complete.sort(key=lambda t: (t.number not in front, sign * t.values[0]))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    pruned.sort(key=lambda t: sign * _shown_values(t, len(spec.metric))[0])
    return complete + pruned


def _shown_values(trial: Any, count: int) -> list[float]:
    """The told values of a complete trial; the last epoch's of any other."""
    from tune.searcher import epoch_records

    if trial.state.name == "COMPLETE":
        return list(trial.values)
    epochs = epoch_records(trial)
    return list(epochs[max(epochs)]["values"]) if epochs else [float("nan")] * count


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Dotted names by their last part where that is unambiguous."""
    leaves = [n.split(".")[-1] for n in names]
    return {
        n: leaf if leaves.count(leaf) == 1 else n for n, leaf in zip(names, leaves, strict=True)
    }


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)
