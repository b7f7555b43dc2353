"""The `search:` block of a space (searched parameters, their conditions and order), the
`points_to_evaluate` checked against it, and the value checks every block of a space shares.

Each failure is a `Problem` ('key path: what is wrong, and the fix'); `tune.space.load_space`
adds the file's name and raises it as one `SpaceError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import optuna

from dsanet.config import ConfigError, ExperimentConfig, flatten
from dsanet.errors import brief

DEFAULTS = flatten(ExperimentConfig())  # dotted field -> default; its type is the field's type
# Integers in a space lie within ±INT_LIMIT: config integers are counts, sizes and seeds, and
# Optuna samples them through float64, exact only to 2**53.
INT_LIMIT = 2**31 - 1
# Each listed value costs one config validation (~3 ms): more than this many choices should be a
# range, and points_to_evaluate are a few known settings, not a grid.
CHOICES_LIMIT = POINTS_LIMIT = 100
# A float step grid of more than a million points is continuous in practice, and the check that
# the step divides the range (1e-9 of a step, in float64's 16 digits) stays exact up to 1e6 steps.
GRID_LIMIT = 10**6
_MAX_CHECKED_INTS = 64  # int ranges up to this many values are checked value by value
_WHERE_LIMIT = 160  # characters of a key path an error message keeps
_SUGGEST_LIMIT = 100  # longer keys get no "did you mean" (difflib's work grows with length)
_PARAM_KEYS = ("type", "low", "high", "log", "step", "choices", "condition")
_FIXED = {  # fields a trial must not vary, and why
    "data.protocol": "it decides which metrics the trainer reports",
    "train.epochs": "scheduler.max_t is checked against it",
    "train.out_dir": "the runner gives each trial its own folder",
}


class SpaceError(ValueError):
    """A search-space file is invalid; the message names the file, the field and the fix."""


class Problem(Exception):
    """'field: what is wrong, and the fix'; load_space adds the file and raises a SpaceError."""


# ---------------------------------------------------------------------------- value checks


def fail(where: str, message: str) -> NoReturn:
    if len(where) > _WHERE_LIMIT:  # a key path built from a huge key
        where = f"{where[: _WHERE_LIMIT - 12]}… ({len(where)} chars)"
    raise Problem(f"{where}: {message}")


def close_matches(word: Any, candidates: Sequence[str], n: int, cutoff: float = 0.6) -> list:
    """difflib's close matches of `word`; none for a word too long to be a typo."""
    word = str(word)
    if len(word) > _SUGGEST_LIMIT:
        return []
    return difflib.get_close_matches(word, candidates, n=n, cutoff=cutoff)


def check_keys(raw: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            close = close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            at = str(key) if where == "top level" else f"{where}.{key}"
            fail(at, f"unknown key; {hint}valid keys: {list(valid)}")


def check_field(name: str, where: str) -> None:
    if name in DEFAULTS:
        return
    same_leaf = [f for f in DEFAULTS if f.split(".")[-1] == str(name).split(".")[-1]]
    others = [f for f in DEFAULTS if f not in same_leaf]
    close = same_leaf + close_matches(name, others, n=3, cutoff=0.75)
    hint = f"did you mean {close}? " if close else ""
    fail(where, f"{brief(name)} is not an ExperimentConfig field; {hint}valid: {sorted(DEFAULTS)}")


def check_value(base: ExperimentConfig, name: str, value: Any, where: str) -> Any:
    """`value` as the config types it, once the config's own validation has accepted it."""
    try:
        return flatten(base.with_overrides({name: value}))[name]
    except ConfigError as exc:
        reason = str(exc).removeprefix("override: ").replace("\n ", "")
        fail(where, f"{brief(value)} is rejected by the config ({reason}); change the value")


def apply_overrides(base: ExperimentConfig, overrides: Any, where: str) -> ExperimentConfig:
    try:
        return base.with_overrides(overrides)
    except ConfigError as exc:
        fail(where, str(exc).removeprefix("override: "))


def as_mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        fail(where, f"must be a mapping, got {type(raw).__name__}")
    return raw


def as_number(value: Any, where: str, integer: bool = False) -> float:
    """A finite number (an integer within ±INT_LIMIT if `integer`); never a boolean."""
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(where, f"{brief(value)} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        fail(where, f"{value} is not a finite number; give a number")
    if not integer:
        if isinstance(value, int) and abs(value) > sys.float_info.max:
            fail(where, f"{brief(value)} is not a finite number (too large for a float)")
        return value
    if isinstance(value, float) and not value.is_integer():
        fail(where, f"{value} is not an integer")
    if abs(value) > INT_LIMIT:
        fail(where, f"{brief(value)} is out of range; integers here lie within ±{INT_LIMIT}")
    return int(value)


# ---------------------------------------------------------------------------- parameters


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


def distribution(p: Param) -> optuna.distributions.BaseDistribution:
    if p.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(p.choices)
    if p.kind == "int":
        return optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
    return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)


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
    step = None if raw.get("step") is None else _step(raw["step"], low, high, where, integer, log)
    grid = range(int(low), int(high) + 1, int(step or 1)) if integer else ()
    for value in grid if 0 < len(grid) <= _MAX_CHECKED_INTS else (low, high):
        check_value(base, name, value, where)
    if not integer:
        low, high = float(low), float(high)
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _step(raw: Any, low: float, high: float, where: str, integer: bool, log: bool) -> float:
    """A step that divides [low, high]; a float step is normal, and coarser than GRID_LIMIT."""
    where = f"{where}.step"
    step = 0 if log else as_number(raw, where, integer=integer)  # a log range takes no step
    if step <= 0:
        fail(where, "must be > 0 and cannot be combined with log")
    count = (high - low) / step
    if not integer and step < sys.float_info.min:
        fail(
            where,
            f"{step} is below the smallest normal float {sys.float_info.min}; "
            f"use a larger step, or drop step for a continuous range",
        )
    if not integer and count > GRID_LIMIT:
        fail(
            where,
            f"{step} cuts [{low}, {high}] into {count:.3g} steps, more than {GRID_LIMIT}; "
            f"use a larger step, or drop step for a continuous range",
        )
    if (high - low) % step if integer else abs(count - round(count)) > 1e-9:
        fail(where, f"high - low = {high - low} is not a multiple of {step}")
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


# ---------------------------------------------------------------------------- starting points


def parse_points(raw: Any, params: tuple[Param, ...], base: ExperimentConfig) -> list[dict]:
    if not isinstance(raw, list):
        fail("points_to_evaluate", "must be a list of mappings (or the word base)")
    if len(raw) > POINTS_LIMIT:
        fail("points_to_evaluate", f"{len(raw)} points, more than {POINTS_LIMIT}; keep a few")
    points = []
    for i, entry in enumerate(raw):
        where = f"points_to_evaluate[{i}]"
        if entry == "base":  # every searched parameter at its base-config value
            values, entry = flatten(base), {}
            for p in params:
                if p.active(entry):
                    entry[p.name] = values[p.name]
        elif not isinstance(entry, Mapping):
            fail(where, "must map searched parameters to values, or be the word base")
        points.append(_check_point(dict(entry), params, base, where))
    return points


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
