"""The `search:` block of a space: searched parameters, their conditions and order, and the
`points_to_evaluate` checked against them."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from dsanet.config import ExperimentConfig, flatten
from dsanet.errors import brief
from tune.space_values import (
    DEFAULTS,
    apply_overrides,
    as_mapping,
    as_number,
    check_field,
    check_keys,
    check_value,
    fail,
)

_PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "condition")
# Fields a trial must not vary, and why.
_FIXED = {
    "data.protocol": "it decides which metrics the trainer reports",
    "train.epochs": "scheduler.max_t is checked against it",
    "train.out_dir": "the runner gives each trial its own folder",
}
_MAX_CHECKED_INTS = 64  # int ranges up to this many values are checked value by value
# Each listed value costs one config validation (~3 ms): more than this many choices should be a
# range, and points_to_evaluate are a few known settings, not a grid.
CHOICES_LIMIT = 100
POINTS_LIMIT = 100
# A float step grid of more than a million points is continuous in practice, and the check that
# the step divides the range (1e-9 of a step, in float64's 16 digits) stays exact up to 1e6 steps.
GRID_LIMIT = 10**6


@dataclass(frozen=True)
class Param:
    """One searched config field. `condition` maps parent parameters to their allowed values."""

    name: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    condition: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether the condition holds for the parameter values chosen so far."""
        return all(n in values and values[n] in ok for n, ok in self.condition.items())

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        steps = (value - self.low) / self.step if self.step else 0.0
        return self.low <= value <= self.high and abs(steps - round(steps)) < 1e-9

    def describe(self) -> str:
        if self.kind == "categorical":
            return brief(list(self.choices))
        return f"[{self.low}, {self.high}]" + (f" in steps of {self.step}" if self.step else "")


def parse_search(raw: Any, base: ExperimentConfig) -> tuple[Param, ...]:
    search = as_mapping(raw or {}, "search")
    if not search:
        fail("search", "no parameters; add e.g. optim.lr: {low: 1.0e-5, high: 1.0e-3, log: true}")
    return _order([_parse_param(name, spec, base) for name, spec in search.items()])


def _parse_param(name: str, raw: Any, base: ExperimentConfig) -> Param:
    where = f"search.{name}"
    check_field(name, where)
    if name in _FIXED:
        fail(where, f"cannot be searched: {_FIXED[name]}; set it under overrides")
    if isinstance(DEFAULTS[name], list):
        fail(where, "is a list field and cannot be searched; set it under overrides")
    raw = {"choices": raw} if isinstance(raw, list) else raw
    if not isinstance(raw, Mapping):
        fail(where, "must be a mapping like {low: 0.1, high: 3, log: true} or {choices: [4, 8]}")
    check_keys(raw, _PARAM_KEYS, where)
    if raw.get("type") == "log":  # shorthand for a log-uniform range of the field's type
        raw = {**raw, "type": {int: "int"}.get(type(DEFAULTS[name]), "float"), "log": True}
    kind = _param_kind(name, raw)
    param = (
        _categorical(name, raw, base) if kind == "categorical" else _numeric(name, kind, raw, base)
    )
    return dataclasses.replace(param, condition=_parse_condition(raw.get("condition"), where))


def _param_kind(name: str, raw: Mapping[str, Any]) -> str:
    held = type(DEFAULTS[name])  # the field's type
    natural = {float: "float", int: "int"}.get(held)
    kind = raw.get("type") or ("categorical" if "choices" in raw else natural)
    if kind not in ("float", "int", "categorical"):
        fix = f"{name} holds {held.__name__} values: give choices" if not kind else "fix the type"
        fail(f"search.{name}.type", f"{brief(kind)} is not float, int, log or categorical; {fix}")
    if kind == "float" and held is not float or kind == "int" and held not in (int, float):
        use = natural or "categorical"
        fail(f"search.{name}.type", f"{kind} does not fit {held.__name__} values; use {use}")
    return kind


def _categorical(name: str, raw: Mapping[str, Any], base: ExperimentConfig) -> Param:
    where = f"search.{name}"
    extra = sorted(set(raw) & {"low", "high", "log", "step"})
    if extra:
        fail(where, f"a categorical parameter takes choices, not {extra}; drop them")
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        fail(f"{where}.choices", f"{brief(choices)}: give a non-empty list of values, e.g. [4, 8]")
    if len(choices) > CHOICES_LIMIT:
        fail(
            f"{where}.choices",
            f"{len(choices)} values, more than {CHOICES_LIMIT}; search a range (low, high) instead",
        )
    typed = tuple(check_value(base, name, c, f"{where}.choices") for c in choices)
    if len(set(map(repr, typed))) != len(typed):
        fail(f"{where}.choices", f"{brief(choices)} repeats a value; list each value once")
    return Param(name, "categorical", choices=typed)


def _numeric(name: str, kind: str, raw: Mapping[str, Any], base: ExperimentConfig) -> Param:
    where, integer = f"search.{name}", kind == "int"
    if "choices" in raw or "low" not in raw or "high" not in raw:
        fail(where, f"type {kind} takes low and high (and no choices)")
    low = as_number(raw["low"], f"{where}.low", integer=integer)
    high = as_number(raw["high"], f"{where}.high", integer=integer)
    if low == high:
        fail(where, f"empty range: low == high == {low}; widen it, or set it under overrides")
    if low > high:
        fail(where, f"inverted range: low {low} > high {high}; swap them")
    if not math.isfinite(high - low):
        fail(where, f"range [{low}, {high}] is too wide: high - low overflows a float; narrow it")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        fail(f"{where}.log", f"{brief(log)} is not true or false")
    if log and low <= 0:
        fail(f"{where}.low", f"a log range needs low > 0 (got {low}); raise low or drop log")
    step = raw.get("step")
    if step is not None:
        if log:
            fail(f"{where}.step", "must be > 0 and cannot be combined with log")
        step = _int_step(step, low, high, where) if integer else _float_step(step, low, high, where)
    grid = range(int(low), int(high) + 1, int(step or 1)) if integer else ()
    for value in grid if 0 < len(grid) <= _MAX_CHECKED_INTS else (low, high):
        check_value(base, name, value, where)
    if not integer:
        low, high = float(low), float(high)
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _int_step(raw: Any, low: int, high: int, where: str) -> int:
    step = as_number(raw, f"{where}.step", integer=True)
    if step <= 0:
        fail(f"{where}.step", "must be > 0 and cannot be combined with log")
    if (high - low) % step:
        fail(f"{where}.step", f"high - low = {high - low} is not a multiple of {step}")
    return step


def _float_step(raw: Any, low: float, high: float, where: str) -> float:
    step = as_number(raw, f"{where}.step")
    if step <= 0:
        fail(f"{where}.step", "must be > 0 and cannot be combined with log")
    if step < sys.float_info.min:
        fail(
            f"{where}.step",
            f"{step} is below the smallest normal float {sys.float_info.min}; "
            f"use a larger step, or drop step for a continuous range",
        )
    count = (high - low) / step
    if count > GRID_LIMIT:
        fail(
            f"{where}.step",
            f"{step} cuts [{low}, {high}] into {count:.3g} steps, more than {GRID_LIMIT}; "
            f"use a larger step, or drop step for a continuous range",
        )
    if abs(count - round(count)) > 1e-9:
        fail(f"{where}.step", f"high - low = {high - low} is not a multiple of {step}")
    return step


def _parse_condition(raw: Any, where: str) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        fail(
            f"{where}.condition", "must map a parameter to a value or list: {model.use_sgnm: true}"
        )
    condition = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items()}
    for parent, allowed in condition.items():
        if len(allowed) > CHOICES_LIMIT:
            fail(f"{where}.condition.{parent}", f"lists more than {CHOICES_LIMIT} values; trim it")
    return condition


def _order(params: list[Param]) -> tuple[Param, ...]:
    """Check conditions; put each parameter after the parameters its condition tests."""
    by_name = {p.name: p for p in params}
    for p in params:
        where = f"search.{p.name}.condition"
        for parent, allowed in p.condition.items():
            if parent not in by_name or parent == p.name:
                fail(
                    where,
                    f"tests {brief(parent)}, which is not another searched parameter; add it "
                    f"to search (e.g. {parent}: [true, false]) or drop the condition. "
                    f"Searched: {sorted(by_name)}",
                )
            if by_name[parent].kind != "categorical":
                fail(where, f"{parent} must be categorical to be tested; give it choices")
            never = [v for v in allowed if v not in by_name[parent].choices]
            if never:
                fail(
                    where,
                    f"{brief(never)} is never chosen for {parent}: {by_name[parent].describe()}",
                )
    ordered: list[Param] = []
    pending = list(params)
    while pending:  # keep the file's order where conditions allow it
        done = {p.name for p in ordered}
        ready = next((p for p in pending if set(p.condition) <= done), None)
        if ready is None:
            fail("search", f"conditions form a cycle among {[p.name for p in pending]}")
        ordered.append(ready)
        pending.remove(ready)
    return tuple(ordered)


def parse_points(raw: Any, params: tuple[Param, ...], base: ExperimentConfig) -> list[dict]:
    if not isinstance(raw, list):
        fail("points_to_evaluate", "must be a list of mappings (or the word base)")
    if len(raw) > POINTS_LIMIT:
        fail("points_to_evaluate", f"{len(raw)} points, more than {POINTS_LIMIT}; keep a few")
    points = []
    for i, entry in enumerate(raw):
        where = f"points_to_evaluate[{i}]"
        if entry == "base":  # every searched parameter at its base-config value
            entry = _base_point(params, base)
        elif not isinstance(entry, Mapping):
            fail(where, "must map searched parameters to values, or be the word base")
        points.append(_check_point(dict(entry), params, base, where))
    return points


def _base_point(params: tuple[Param, ...], base: ExperimentConfig) -> dict[str, Any]:
    values, point = flatten(base), {}
    for p in params:
        if p.active(point):
            point[p.name] = values[p.name]
    return point


def _check_point(
    point: dict, params: tuple[Param, ...], base: ExperimentConfig, where: str
) -> dict:
    for name in point:
        if name not in {p.name for p in params}:
            check_field(name, f"{where}.{name}")
            fail(f"{where}.{name}", "is not searched; add it to search, or set it under overrides")
    typed: dict[str, Any] = {}
    for p in (p for p in params if p.name in point):
        value = check_value(base, p.name, point[p.name], f"{where}.{p.name}")
        if not p.contains(value):
            fail(
                f"{where}.{p.name}",
                f"{brief(value)} lies outside the search space {p.describe()}; "
                f"widen search.{p.name} or change the point",
            )
        if not p.active(typed):
            fail(
                f"{where}.{p.name}",
                f"is given but its condition {p.condition} does not hold "
                f"in this point; drop it or set the parent",
            )
        typed[p.name] = value
    apply_overrides(base, typed, where)  # the values together, e.g. attn_window with visual_length
    return typed


def distribution(p: Param) -> optuna.distributions.BaseDistribution:
    if p.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(p.choices)
    if p.kind == "int":
        return optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
    return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
