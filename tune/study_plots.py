"""The search's own plots, pruned trials included: learning curves, history, parallel coordinates.

Optuna's matplotlib plots show COMPLETE trials only, so a study whose trials ASHA mostly
stopped looked empty. Here every trial counts: a complete trial at its told value, any other
at its last reported epoch. The series are pure functions (`learning_curves`,
`history_points`, `parallel_rows`) so they can be tested without reading pixels; the drawing
uses matplotlib's Figure API only (no pyplot state), thin semi-transparent lines so that 800
trials stay readable as well as 8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from tune.space import SpaceSpec
from tune.space_params import Param

# Okabe-Ito colours, safe for the common colour-vision deficiencies; outcomes drawn in this
# order, so complete trials lie on top of pruned ones.
OUTCOMES = ("pruned", "failed", "running", "complete")
COLOURS = {"complete": "#0072B2", "pruned": "#E69F00", "failed": "#D55E00", "running": "#009E73"}
BEST_COLOUR = "#000000"
LABEL_CHARS = 18  # parameter names longer than this are ellipsized on the parallel plot


class Curve(NamedTuple):
    epochs: list[int]
    values: list[float]
    outcome: str


class Point(NamedTuple):
    number: int
    value: float
    outcome: str  # complete (told value) or pruned (last reported value)


class Row(NamedTuple):
    number: int
    coords: list[float]  # one per searched parameter in [0, 1]; NaN where the trial lacks it
    value: float
    outcome: str


# ---------------------------------------------------------------------------- the series


def outcome(trial: FrozenTrial) -> str:
    """complete, pruned, failed or running (a waiting trial counts as running)."""
    return {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
    }.get(trial.state, "running")


def learning_curves(study: optuna.Study, index: int = 0) -> dict[int, Curve]:
    """Per trial number, the objective `index` by epochs completed, for every trial that
    reported an epoch. From the searcher's `epochs` user attribute; a single-objective trial
    without it falls back to Optuna's intermediate values."""
    from tune.searcher import epoch_records

    curves = {}
    for trial in study.get_trials(deepcopy=False):
        records = epoch_records(trial)
        if records:
            series = {s: _at(records[s].get("values"), index) for s in records}
        elif len(study.directions) == 1:
            series = dict(trial.intermediate_values)
        else:
            series = {}
        if series:
            epochs = sorted(series)
            values = [_float(series[s]) for s in epochs]
            curves[trial.number] = Curve(epochs, values, outcome(trial))
    return curves


def history_points(study: optuna.Study, index: int = 0) -> list[Point]:
    """Every finished trial in trial order: complete at its told value, pruned at its last
    reported value (pruned trials with no finite report are left out)."""
    curves = learning_curves(study, index)
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if trial.state == TrialState.COMPLETE:
            value = _float(trial.values[index])
        else:
            value = _last_finite(curves.get(trial.number))
        if math.isfinite(value):
            points.append(Point(trial.number, value, outcome(trial)))
    return points


def best_so_far(points: Sequence[Point], maximize: bool) -> tuple[list[int], list[float]]:
    """The best complete value up to each complete trial, as (trial numbers, values)."""
    numbers, values = [], []
    for point in points:
        if point.outcome != "complete":
            continue
        better = max if maximize else min
        values.append(better(values[-1], point.value) if values else point.value)
        numbers.append(point.number)
    return numbers, values


def parallel_rows(study: optuna.Study, spec: SpaceSpec, index: int = 0) -> list[Row]:
    """One row per finished trial (as `history_points`), its parameters normalised to [0, 1]:
    log-scaled where the parameter is, categorical choices evenly spaced, NaN where a
    conditional parameter was not sampled."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = []
    for point in history_points(study, index):
        params = trials[point.number].params
        coords = [
            normalise(p, params[p.name]) if p.name in params else math.nan for p in spec.params
        ]
        rows.append(Row(point.number, coords, point.value, point.outcome))
    return rows


def normalise(param: Param, value: Any) -> float:
    """`value`'s place on the parameter's axis, 0 at the low end, 1 at the high end."""
    if param.kind == "categorical":
        choices = list(param.choices)
        place = choices.index(value) if value in choices else 0
        return place / (len(choices) - 1) if len(choices) > 1 else 0.5
    low, high, value = float(param.low), float(param.high), float(value)
    if param.log and low > 0 and value > 0:
        low, high, value = math.log(low), math.log(high), math.log(value)
    return 0.5 if high == low else min(max((value - low) / (high - low), 0.0), 1.0)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _at(values: Any, index: int) -> float:
    return values[index] if isinstance(values, list) and index < len(values) else math.nan


def _last_finite(curve: Curve | None) -> float:
    finite = [v for v in (curve.values if curve else []) if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def _alpha(count: int) -> float:
    """Opaque for a handful of lines, faint for hundreds."""
    return min(0.9, max(0.12, 3.0 / math.sqrt(max(count, 1))))


def _counts(states: Sequence[str]) -> str:
    return ", ".join(f"{states.count(o)} {o}" for o in reversed(OUTCOMES) if o in states)


# ---------------------------------------------------------------------------- the drawings


def draw_curves(
    curves: dict[int, Curve], best: int | None, label: str, rungs: Sequence[float], path: Path
) -> None:
    """Every trial's learning curve coloured by outcome (pruned first, complete on top), the
    best complete trial in black, ASHA's rung epochs as faint vertical lines."""
    figure = Figure(figsize=(10, 6))
    ax = figure.subplots()
    for rung in rungs:
        ax.axvline(rung, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
    alpha, marker = _alpha(len(curves)), ("o" if len(curves) <= 50 else None)
    states = [c.outcome for c in curves.values()]
    for rank, kind in enumerate(OUTCOMES):
        for curve in (c for c in curves.values() if c.outcome == kind):
            ax.plot(
                curve.epochs,
                curve.values,
                color=COLOURS[kind],
                alpha=alpha,
                linewidth=1.0,
                marker=marker or ("o" if len(curve.epochs) == 1 else None),
                markersize=4,
                zorder=1 + rank,
            )
    handles = [
        Line2D([], [], color=COLOURS[k], label=f"{k} ({states.count(k)})")
        for k in reversed(OUTCOMES)
        if k in states
    ]
    if best in curves:
        ax.plot(
            curves[best].epochs,
            curves[best].values,
            color=BEST_COLOUR,
            linewidth=2.2,
            marker=marker,
            markersize=4,
            zorder=10,
        )
        handles.append(Line2D([], [], color=BEST_COLOUR, linewidth=2.2, label=f"best: #{best}"))
    if rungs:
        handles.append(Line2D([], [], color="0.6", linestyle=":", label="ASHA rungs"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs completed")
    ax.set_ylabel(label)
    ax.set_title(f"Learning curves of {len(curves)} trials ({_counts(states)})")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize="small")
    _save(figure, path)


def draw_history(points: Sequence[Point], maximize: bool, label: str, path: Path) -> None:
    """Each finished trial's value in trial order and the best-so-far over complete trials."""
    figure = Figure(figsize=(10, 6))
    ax = figure.subplots()
    alpha = max(_alpha(len(points)), 0.35)
    for kind, marker in (("pruned", "v"), ("complete", "o")):
        chosen = [p for p in points if p.outcome == kind]
        if chosen:
            ax.scatter(
                [p.number for p in chosen],
                [p.value for p in chosen],
                marker=marker,
                s=22,
                color=COLOURS[kind],
                alpha=alpha,
                zorder=2 + (kind == "complete"),
                label=f"{kind} ({len(chosen)})" + (", last epoch" if kind == "pruned" else ""),
            )
    numbers, best = best_so_far(points, maximize)
    if numbers:
        ax.step(
            numbers,
            best,
            where="post",
            color=BEST_COLOUR,
            linewidth=1.6,
            zorder=4,
            label="best so far (complete)",
        )
    ax.set_xlabel("trial number")
    ax.set_ylabel(label)
    ax.set_title(f"Optimisation history ({_counts([p.outcome for p in points])})")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(loc="best", fontsize="small")
    _save(figure, path)


def draw_parallel(rows: Sequence[Row], params: Sequence[Param], label: str, path: Path) -> None:
    """One line per finished trial over the normalised parameter axes and the objective;
    complete trials coloured by the objective, pruned ones grey and dashed at their last
    reported value; a parameter a trial lacks leaves a gap in its line."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from tune.summary import short_names

    figure = Figure(figsize=(max(8.0, 1.8 * (len(params) + 1)), 6))
    ax = figure.subplots()
    values = [r.value for r in rows]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    complete = [r.value for r in rows if r.outcome == "complete"] or [low, high]
    norm, cmap = Normalize(min(complete), max(complete)), colormaps["viridis"]
    alpha, xs = _alpha(len(rows)), list(range(len(params) + 1))
    for row in sorted(rows, key=lambda r: r.outcome == "complete"):  # pruned underneath
        ys = [*row.coords, 0.5 if high == low else (row.value - low) / (high - low)]
        if row.outcome == "complete":
            style = {"color": cmap(norm(row.value)), "linewidth": 1.2, "zorder": 3}
        else:
            style = {"color": "0.55", "linestyle": "--", "linewidth": 0.9, "zorder": 2}
        ax.plot(xs, ys, alpha=alpha, **style)
    for x, param in enumerate(params):
        _axis_ticks(ax, x, param)
    _axis_ticks(ax, len(params), None, (low, high))
    names = short_names([p.name for p in params])
    labels = [_ellipsize(names[p.name]) for p in params] + [_ellipsize(label)]
    ax.set_xticks(xs, labels, rotation=25, ha="right")
    ax.set_xlim(-0.3, len(params) + 0.3)
    ax.set_ylim(-0.08, 1.08)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label=f"{label} (complete trials)")
    pruned = sum(r.outcome == "pruned" for r in rows)
    ax.set_title(f"Parallel coordinates of {len(rows)} trials ({pruned} pruned: grey, dashed)")
    _save(figure, path)


def _axis_ticks(ax: Any, x: int, param: Param | None, span: tuple[float, float] = (0, 1)) -> None:
    """A vertical axis at `x` with its values written beside it."""
    ax.axvline(x, color="0.3", linewidth=0.8, zorder=1)
    if param is not None and param.kind == "categorical":
        choices = list(param.choices)
        ticks = [(normalise(param, c), _ellipsize(str(c), 12)) for c in choices]
    else:
        low, high = (param.low, param.high) if param is not None else span
        log = " (log)" if param is not None and param.log else ""
        ticks = [(0.0, f"{low:.3g}{log}"), (1.0, f"{high:.3g}")]
    for y, text in ticks:
        ax.text(
            x + 0.04,
            y,
            text,
            fontsize=7,
            va="center",
            ha="left",
            color="0.2",
            zorder=5,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5},
        )


def _ellipsize(text: str, chars: int = LABEL_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=100, bbox_inches="tight")
