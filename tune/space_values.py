"""Checks of single values in a search-space file: mappings, keys, numbers, config fields.

Each failure is a `Problem` ('key path: what is wrong, and the fix'); `tune.space.load_space`
adds the file's name and raises it as one `SpaceError`.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from dsanet.config import ConfigError, ExperimentConfig, flatten
from dsanet.errors import brief

DEFAULTS = flatten(ExperimentConfig())  # dotted field -> default; its type is the field's type
# Integers in a space lie within ±INT_LIMIT: config integers are counts, sizes and seeds, and
# Optuna samples them through float64, exact only to 2**53.
INT_LIMIT = 2**31 - 1
_WHERE_LIMIT = 160  # characters of a key path an error message keeps
_SUGGEST_LIMIT = 100  # longer keys get no "did you mean" (difflib's work grows with length)


class SpaceError(ValueError):
    """A search-space file is invalid; the message names the file, the field and the fix."""


class Problem(Exception):
    """'field: what is wrong, and the fix'; load_space adds the file and raises a SpaceError."""


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
    if integer:
        return _as_int(value, where)
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        fail(where, f"{brief(value)} is not a finite number (too large for a float)")
    return value


def _as_int(value: int | float, where: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        fail(where, f"{value} is not an integer")
    if abs(value) > INT_LIMIT:
        fail(where, f"{brief(value)} is out of range; integers here lie within ±{INT_LIMIT}")
    return int(value)
