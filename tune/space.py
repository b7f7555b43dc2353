"""Search-space YAML -> a validated `SpaceSpec`, Optuna distributions and define-by-run sampling.

Everything is checked at load time, before Ray starts: each bad file gets one `SpaceError` naming
the file, the field and the fix. Parameter names are dotted `ExperimentConfig` fields, and every
bound, choice and starting point passes through the config's own validation. The blocks are
parsed in `space_params` (search, points) and `space_settings` (the rest).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from dsanet.config import (
    EXTENDS_LIMIT,
    ConfigError,
    ExperimentConfig,
    _relative_path,
    anchor_paths,
    from_dict,
    is_file,
    load_config,
)
from dsanet.errors import brief
from dsanet.yamlio import load_yaml_file
from tune.space_params import Param, distribution, parse_points, parse_search
from tune.space_settings import (
    SETTINGS_KEYS,
    Settings,
    SyntheticSpec,
    parse_objectives,
    parse_settings,
    parse_synthetic,
)
from tune.space_values import (
    DEFAULTS,
    Problem,
    SpaceError,
    apply_overrides,
    as_mapping,
    check_keys,
    fail,
)

SPACE_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
_TOP_KEYS = ("name", "extends", "base", "overrides", "synthetic", "search", "metric", "mode")
_TOP_KEYS += ("points_to_evaluate", *SETTINGS_KEYS)
NAME_LIMIT = 100  # characters of a study name (a folder name)


@dataclass(frozen=True, kw_only=True)
class SpaceSpec(Settings):
    """A validated space: its study settings, plus the base config and what is searched."""

    name: str
    path: Path
    base_ref: str | dict[str, Any]  # config name or path, or an inline config mapping
    overrides: dict[str, Any]
    base: ExperimentConfig  # base_ref + overrides, validated
    params: tuple[Param, ...]  # parents before the parameters conditioned on them
    metric: tuple[str, ...]
    mode: tuple[str, ...]  # ASHA acts on the first objective
    points_to_evaluate: list[dict[str, Any]]
    synthetic: SyntheticSpec | None = None


# ---------------------------------------------------------------------------- public API


def load_space(path: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> SpaceSpec:
    """Read and validate a space file (or a shipped one by name: demo, xd, ...).

    `overrides` are config overrides ({"optim.lr": 1e-4} or ["data.feature_root=/x"]) applied
    after the file's own `overrides`.
    """
    path = Path(path)
    if not path.suffix and not is_file(path, SpaceError):
        path = SPACE_DIR / f"{path}.yaml"
    if not is_file(path, SpaceError):
        shipped = sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))
        raise FileNotFoundError(
            f"search space {path} not found; pass a YAML file or a shipped space {shipped}"
        )
    tree = _read(path)  # its errors name the file they are in (a parent, with extends)
    try:
        return _parse(tree, path, overrides)
    except Problem as problem:
        raise SpaceError(f"{path}: {problem}") from None  # the message carries any cause
    except ConfigError as exc:  # a settings value of the wrong type; the message names the file
        raise SpaceError(str(exc)) from None


def optuna_distributions(spec: SpaceSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every parameter's distribution, conditional ones included."""
    return {p.name: distribution(p) for p in spec.params}


def sample(trial: optuna.Trial, spec: SpaceSpec) -> dict[str, Any]:
    """Define-by-run: suggest each parameter whose condition holds; others are left out."""
    values: dict[str, Any] = {}
    for p in spec.params:
        if not p.active(values):
            continue
        if p.kind == "categorical":
            values[p.name] = trial.suggest_categorical(p.name, p.choices)
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return values


def trial_config(spec: SpaceSpec, sampled: Mapping[str, Any]) -> ExperimentConfig:
    return spec.base.with_overrides(dict(sampled))


def sampled_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The sampled fields of a trial's Ray config or Optuna params: the keys that name an
    `ExperimentConfig` field (nested mappings read as dotted keys). The runner's own keys
    (`_study`, `_optuna_trial`) and anything else are left out: the one filter of them."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            values.update(sampled_values(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" in DEFAULTS:
            values[f"{prefix}{key}"] = value
    return values


# ---------------------------------------------------------------------------- files


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping, merged over its `extends:` parent; null values delete inherited keys."""
    path = path.resolve()
    if path in seen:
        raise SpaceError(f"{path}: extends: forms a cycle through {[str(p) for p in seen]}")
    if len(seen) >= EXTENDS_LIMIT:
        raise SpaceError(f"{path}: extends: chains more than {EXTENDS_LIMIT} files; merge some")
    tree = load_yaml_file(path, SpaceError) or {}
    if not isinstance(tree, dict):
        raise SpaceError(f"{path}: top level: must be a mapping (base, search, metric, ...)")
    _anchor(tree, path.parent)
    parent = tree.pop("extends", None)
    if parent is None:
        return _merge({}, tree)
    if not isinstance(parent, str) or not parent or "\x00" in parent:
        raise SpaceError(f"{path}: extends: {brief(parent)} is not a file path; name the parent")
    parent_path = path.parent / parent
    try:
        found = is_file(parent_path, SpaceError)
    except SpaceError as exc:
        raise SpaceError(f"{path}: extends: {exc}") from exc
    if not found:
        raise SpaceError(f"{path}: extends: {parent_path} not found; give a path from this file")
    return _merge(_read(parent_path, seen + (path,)), tree)


def _anchor(tree: dict[str, Any], folder: Path) -> None:
    """Make a base path and relative data paths absolute, relative to the file that names them."""
    base = tree.get("base")
    if _relative_path(base) and Path(base).suffix:
        tree["base"] = str((folder / base).resolve())
    anchor_paths(tree.get("overrides"), folder, prefix="data.")
    anchor_paths(base.get("data") if isinstance(base, dict) else None, folder)


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Mapping blocks merge key by key (one level), null deletes, anything else replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping):
            inherited = out.get(key) if isinstance(out.get(key), Mapping) else {}
            value = {k: v for k, v in {**inherited, **value}.items() if v is not None}
        out[key] = value
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------- the space


def _parse(tree: dict[str, Any], path: Path, overrides: Any) -> SpaceSpec:
    check_keys(tree, _TOP_KEYS, "top level")
    name = tree.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        fail(
            "name", f"{brief(name)}: use letters, digits, '.', '_', '-' (it names the study folder)"
        )
    if len(name) > NAME_LIMIT:
        fail("name", f"{brief(name)} is longer than {NAME_LIMIT} characters; shorten it")
    ref, file_overrides, base = _resolve_base(tree, overrides)
    params = parse_search(tree.get("search"), base)
    metric, mode = parse_objectives(tree.get("metric", "val_ap"), tree.get("mode"), base)
    points = parse_points(tree.get("points_to_evaluate") or [], params, base)
    settings = parse_settings(tree, str(path), base, name)
    if settings.num_samples < len(points):
        fail(
            "num_samples",
            f"{settings.num_samples} is fewer than the {len(points)} points_to_evaluate",
        )
    return SpaceSpec(
        name=name,
        path=path.resolve(),
        base_ref=ref,
        overrides=file_overrides,
        base=base,
        params=params,
        metric=metric,
        mode=mode,
        points_to_evaluate=points,
        synthetic=parse_synthetic(tree.get("synthetic"), str(path), base),
        **vars(settings),
    )


def _resolve_base(tree: Mapping[str, Any], overrides: Any) -> tuple[Any, dict, ExperimentConfig]:
    ref = tree.get("base")
    file_overrides = dict(as_mapping(tree.get("overrides") or {}, "overrides"))
    if not isinstance(ref, (str, Mapping)) or not ref:
        fail(
            "base",
            "missing; name a dsanet config (xd, ucf, xd_reference, ucf_reference, demo), a "
            "path, or a mapping",
        )
    try:
        base = from_dict(ref, "inline base") if isinstance(ref, Mapping) else load_config(ref)
    except (ConfigError, FileNotFoundError) as exc:
        fail("base", f"{exc}")
    for key, value in file_overrides.items():
        base = apply_overrides(base, {key: value}, f"overrides.{key}")
    if overrides:
        base = apply_overrides(base, overrides, "overrides (command line)")
    return ref, file_overrides, base
