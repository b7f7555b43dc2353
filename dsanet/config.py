"""Typed, frozen experiment configuration: YAML + dotted overrides, validated once at load time.

This is the only place defaults live. Defaults are the DSANet XD-Violence settings of the
official code (DESIGN §4, §6); `dsanet/configs/ucf.yaml` changes what differs for UCF-Crime.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dsanet.errors import brief
from dsanet.yamlio import load_yaml_file, parse_yaml

CONFIG_DIR = Path(__file__).parent / "configs"
INT_LIMIT = 2**63 - 1  # config integers fit in 64 bits (torch seeds, sizes, counts)
LIST_LIMIT = 100  # values in a list field (milestones, iou_thresholds)
EXTENDS_LIMIT = 16  # files in one `extends:` chain


class ConfigError(ValueError):
    """A config file or override names an unknown field or holds a bad value."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "xd"  # a preset in dsanet/presets or a dataset YAML path
    list_dir: str = ""  # folder holding the CSV lists, gt_segment/gt_label and annotation files
    feature_root: str = ""  # list paths are re-rooted under it (DESIGN §1.2)
    test_feature_root: str = ""  # test features, when they live apart ("" = feature_root)
    cache_dir: str = ""  # packed feature cache ("" = <feature_root>/.dsanet-cache)
    # validation: select on a held-out split of the training videos; final: train on every
    # training video, keep the last epoch (the search's retrain); reference: select on the
    # test set each epoch, as the official code does (comparison with the paper only).
    protocol: Literal["validation", "final", "reference"] = "validation"
    val_fraction: float = 0.1  # of the training videos, stratified by class
    split_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    visual_length: int = 256  # T
    visual_width: int = 512  # D
    visual_layers: int = 1
    visual_heads: int = 1
    attn_window: int = 64
    mlp_ratio: int = 4
    sim_threshold: float = 0.7
    distance_scale: float = math.e
    align_temperature: float = 0.07
    pool_scale: float = 10.0  # DCSA sharpness s
    mask_padding: bool = False  # Q-P1: the reference never masks padding
    use_sgnm: bool = True
    num_prototypes: int = 16  # K
    normal_ratio: float = 0.8  # M = int(T * ratio)
    sgnm_select: Literal["padded", "valid"] = "padded"  # Q-S2
    extractor_depth: int = 1
    decoder_depth: int = 8
    sgnm_heads: int = 8
    decoder_residual: Literal["none", "all_but_first"] = "none"  # Q-S1


@dataclass(frozen=True)
class TextConfig:
    mode: Literal["adapter", "coop", "frozen", "manual"] = "adapter"
    arch: str = "ViT-B-16-quickgelu"
    # "openai" (resolved to a local file before training), a path to weights, or "" for random
    # weights (tests and the CPU demo; a loud warning is logged).
    weights: str = ""
    layers: int = 12  # fewer gives a tiny random tower for tests
    normalize: bool = True
    adapt_layers: int = 1  # L
    adapter_weight: float = 0.6  # t_w
    prompt_prefix: int = 10  # coop only
    prompt_postfix: int = 10
    template: str = "a video of {}"  # manual only


@dataclass(frozen=True)
class LossConfig:
    use_dcsa: bool = True
    w_mil: float = 1.0
    w_align: float = 5.0  # lambda2
    w_sep: float = 1.0
    w_event: float = 1.0
    w_bkg: float = 1.0
    w_cons: float = 1.0
    w_gather: float = 1.0
    label_smoothing: float = 0.1
    bkg_off_mass: float = 0.01
    topk_divisor: int = 16  # k = len // divisor + 1


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    sgnm_lr: float = 0.0  # 0 = same as lr
    weight_decay: float = 0.01
    schedule: Literal["cosine+warmcosine", "multistep"] = "cosine+warmcosine"
    milestones: tuple[int, ...] = (3, 6, 10)  # multistep only
    gamma: float = 0.1
    sgnm_weight_decay: float = 1e-4
    sgnm_eps: float = 1e-10
    sgnm_clip: float = 1.0
    sgnm_warmup: int = 100
    sgnm_floor: float = 0.1
    # Q-O2: the reference sizes UCF's SG-NM schedule with both loaders' lengths; 0 = actual steps.
    sgnm_schedule_steps_per_epoch: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 96  # rows per step ("paired" sampling: per half)
    seed: int = 234
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = 0  # evaluate every N steps inside an epoch; 0 = once per epoch
    max_steps_per_epoch: int = 0  # 0 = the full epoch
    select_metric: Literal["ap", "auc", "map_avg"] = "ap"
    reload_best_each_epoch: bool = False  # Q-O1
    out_dir: str = "runs/default"
    deterministic: bool = True


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 1.0  # beta of the hierarchical belief modulation
    class_probs: Literal["hbm", "softmax"] = "hbm"
    iou_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def with_overrides(self, overrides: Mapping[str, Any] | Sequence[str]) -> ExperimentConfig:
        """A new config with dotted overrides ({"model.num_prototypes": 32} or ["k=v", ...])."""
        tree = to_dict(self)
        _apply_overrides(tree, overrides, source="override")
        return from_dict(tree, source="override")

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)


# ---------------------------------------------------------------------------- checks

# (field, test, what is allowed): cross-field and range rules, checked after types.
# data.* fields holding paths: resolved against a config file's folder when relative.
_PATH_FIELDS = ("list_dir", "feature_root", "test_feature_root", "cache_dir")

_RULES: list[tuple[str, typing.Callable[[ExperimentConfig], bool], str]] = [
    ("model.visual_length", lambda c: c.model.visual_length >= 1, ">= 1"),
    (
        "model.attn_window",
        lambda c: c.model.attn_window >= 1 and c.model.visual_length % c.model.attn_window == 0,
        "a divisor of model.visual_length (e.g. 8, 16, 32, 64, 128 for 256)",
    ),
    ("model.visual_layers", lambda c: c.model.visual_layers >= 1, ">= 1"),
    (
        "model.visual_heads",
        lambda c: c.model.visual_heads >= 1 and c.model.visual_width % c.model.visual_heads == 0,
        "a divisor of model.visual_width",
    ),
    (
        "model.sgnm_heads",
        lambda c: c.model.sgnm_heads >= 1 and c.model.visual_width % c.model.sgnm_heads == 0,
        "a divisor of model.visual_width",
    ),
    ("model.num_prototypes", lambda c: c.model.num_prototypes >= 1, "an integer >= 1 (K)"),
    (
        "model.normal_ratio",
        lambda c: (
            0.0 < c.model.normal_ratio <= 1.0
            and int(c.model.visual_length * c.model.normal_ratio) >= 1
        ),
        "in (0, 1] with M = int(T*ratio) >= 1",
    ),
    ("model.extractor_depth", lambda c: c.model.extractor_depth >= 1, ">= 1"),
    ("model.decoder_depth", lambda c: c.model.decoder_depth >= 1, ">= 1"),
    ("model.sim_threshold", lambda c: -1.0 <= c.model.sim_threshold <= 1.0, "in [-1, 1]"),
    ("model.align_temperature", lambda c: c.model.align_temperature > 0, "> 0"),
    ("model.distance_scale", lambda c: c.model.distance_scale > 0, "> 0"),
    ("text.layers", lambda c: 1 <= c.text.layers <= 12, "in [1, 12]"),
    (
        "text.adapt_layers",
        lambda c: 0 <= c.text.adapt_layers <= c.text.layers,
        "in [0, text.layers]",
    ),
    ("text.adapter_weight", lambda c: 0.0 <= c.text.adapter_weight <= 1.0, "in [0, 1]"),
    ("text.template", lambda c: "{}" in c.text.template, "a string containing {}"),
    ("loss.label_smoothing", lambda c: 0.0 <= c.loss.label_smoothing < 1.0, "in [0, 1)"),
    ("loss.topk_divisor", lambda c: c.loss.topk_divisor >= 1, ">= 1"),
    ("optim.lr", lambda c: c.optim.lr > 0, "> 0"),
    ("optim.sgnm_lr", lambda c: c.optim.sgnm_lr >= 0, ">= 0 (0 = same as optim.lr)"),
    ("optim.sgnm_warmup", lambda c: c.optim.sgnm_warmup >= 0, ">= 0"),
    ("optim.weight_decay", lambda c: c.optim.weight_decay >= 0, ">= 0"),
    ("optim.sgnm_weight_decay", lambda c: c.optim.sgnm_weight_decay >= 0, ">= 0"),
    ("optim.sgnm_eps", lambda c: c.optim.sgnm_eps > 0, "> 0"),
    ("optim.sgnm_clip", lambda c: c.optim.sgnm_clip > 0, "> 0"),
    ("optim.sgnm_floor", lambda c: 0 <= c.optim.sgnm_floor <= 1, "in [0, 1]"),
    ("optim.gamma", lambda c: c.optim.gamma > 0, "> 0"),
    (
        "optim.milestones",
        lambda c: (
            all(m >= 1 for m in c.optim.milestones)
            and list(c.optim.milestones) == sorted(set(c.optim.milestones))
        ),
        "increasing epoch numbers >= 1",
    ),
    (
        "optim.sgnm_schedule_steps_per_epoch",
        lambda c: c.optim.sgnm_schedule_steps_per_epoch >= 0,
        ">= 0 (0 = the real steps per epoch)",
    ),
    ("train.epochs", lambda c: c.train.epochs >= 1, ">= 1"),
    ("train.batch_size", lambda c: c.train.batch_size >= 1, ">= 1"),
    ("train.eval_every", lambda c: c.train.eval_every >= 0, ">= 0"),
    ("train.max_steps_per_epoch", lambda c: c.train.max_steps_per_epoch >= 0, ">= 0"),
    (
        "train.device",
        lambda c: c.train.device in ("auto", "cpu", "cuda") or c.train.device.startswith("cuda:"),
        "auto, cpu, cuda or cuda:N",
    ),
    (
        "data.val_fraction",
        lambda c: (
            0.0 <= c.data.val_fraction < 1.0
            and (c.data.protocol != "validation" or c.data.val_fraction > 0)
        ),
        "in (0, 1) for protocol 'validation' (0 is allowed with 'final' and 'reference')",
    ),
    (
        "train.select_metric",
        lambda c: c.train.select_metric != "map_avg" or c.data.protocol == "reference",
        "'ap' or 'auc' under protocol 'validation' (the validation split has video labels only; "
        "segment mAP needs the test set's segments, i.e. protocol 'reference')",
    ),
    ("eval.temperature", lambda c: c.eval.temperature > 0, "> 0"),
    (
        "eval.iou_thresholds",
        lambda c: len(c.eval.iou_thresholds) > 0 and all(0 < t <= 1 for t in c.eval.iou_thresholds),
        "a non-empty list of values in (0, 1]",
    ),
]

for _k in ("w_mil", "w_align", "w_sep", "w_event", "w_bkg", "w_cons", "w_gather", "bkg_off_mass"):
    _RULES.append((f"loss.{_k}", lambda c, k=_k: getattr(c.loss, k) >= 0, ">= 0"))


def _expandable(path: str) -> bool:
    """Whether `~` or `~user` at the start of `path` names a home folder this system knows."""
    try:
        Path(path).expanduser()
    except RuntimeError:  # "~nosuchuser/...", or no home folder to expand "~" to
        return False
    return True


for _path_field in (*(f"data.{f}" for f in _PATH_FIELDS), "train.out_dir", "text.weights"):
    _RULES.append(
        (
            _path_field,
            lambda c, name=_path_field: _expandable(_get(c, name)),
            "a path whose '~' or '~user' names a home folder that exists (or a full path)",
        )
    )


def validate(cfg: ExperimentConfig, source: str = "config") -> ExperimentConfig:
    """Check range and cross-field rules; raise one ConfigError listing every violation."""
    problems = [
        f"{name}={brief(_get(cfg, name))}: must be {allowed}"
        for name, ok, allowed in _RULES
        if not ok(cfg)
    ]
    if problems:
        raise ConfigError(f"{source}: invalid values:\n  " + "\n  ".join(problems))
    return cfg


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------------------- (de)serialising


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), ready for YAML."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """{"model.num_prototypes": 16, ...}: for logging parameters."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def field_names() -> list[str]:
    """Every dotted field name a config or override may set."""
    return list(flatten(ExperimentConfig()))


def from_dict(tree: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Build and validate a config from a nested dict; unknown keys and bad types raise."""
    return validate(build(ExperimentConfig, tree, source), source)


def build(cls: type, tree: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    """A frozen dataclass `cls` from a nested mapping: absent keys keep their defaults, nested
    dataclasses recurse, values are coerced to the field types (int, float, str, bool, Literal,
    tuple); an unknown key or a bad value raises a ConfigError naming `source` and the key path
    (`prefix` + field). Range and cross-field rules are the caller's.
    """
    if not isinstance(tree, Mapping):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, "
            f"got {type(tree).__name__}"
        )
    hints = _field_types(cls)
    names = list(hints)
    unknown = sorted(set(tree) - set(names), key=str)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"{source}: unknown key(s) {brief([f'{prefix}{k}' for k in unknown])} in {where}; "
            f"valid keys: {names}"
        )
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, tree[name] or {}, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tree[name], hint, f"{prefix}{name}", source)
    return cls(**kwargs)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """`cls`'s fields and their types, in field order. Resolving the string annotations is the
    slow part of building a config (about 1 ms a class), and a search builds thousands."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    origin = typing.get_origin(hint)

    def fail(allowed: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {name}={brief(value)} is not {allowed}")

    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            fail(f"one of {list(allowed)}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            fail(f"a list of {item.__name__}")
        if len(value) > LIST_LIMIT:
            fail(f"a list of at most {LIST_LIMIT} values")
        return tuple(_coerce(v, item, f"{name}[{i}]", source) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        fail("supported")  # no optional fields: "" or 0 mean "unset"
    if hint is bool:
        if not isinstance(value, bool):
            fail("a boolean (true/false)")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        if abs(value) > INT_LIMIT:
            fail(f"an integer within ±{INT_LIMIT} (64 bits)")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if isinstance(value, int) and abs(value) > INT_LIMIT or not math.isfinite(value):
            fail("a finite number")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            fail("a string")
        if "\x00" in value:
            fail("a string without NUL characters")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {name}")  # internal invariant


def _apply_overrides(
    tree: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str], source: str
) -> None:
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"{source}: {brief(text)} is not of the form section.field=value "
                    f"(e.g. model.num_prototypes=32)"
                )
            value = parse_yaml(raw, f"{source}: value of {brief(text)}", ConfigError)
            items.append((key.strip(), value if raw.strip() else ""))
    valid = set(field_names())
    for key, value in items:
        if key not in valid:
            raise ConfigError(
                f"{source}: unknown field {brief(key)}; did you mean one of {_close(key, valid)}?"
            )
        section, name = key.split(".")
        if not isinstance(tree.get(section), dict):  # absent, or left empty (null) in the file
            tree[section] = {}
        tree[section][name] = value


def _close(key: Any, valid: set[str]) -> list[str]:
    """Fields with the same last part as `key`, else those of its section, else all."""
    parts = str(key).split(".")
    return (
        sorted(v for v in valid if v.split(".")[-1] == parts[-1])
        or sorted(v for v in valid if v.startswith(parts[0] + "."))
        or sorted(valid)
    )


# ---------------------------------------------------------------------------- files


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> ExperimentConfig:
    """Load a YAML config (which may name a parent with `extends:`), apply overrides, validate.

    Relative paths in `data.*` are resolved against the config file's folder.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        if "\x00" in str(path):
            raise ConfigError(f"config path {brief(str(path))} holds a NUL character; fix the path")
        path = Path(path)
        if not path.suffix and not is_file(path, ConfigError):  # shipped: configs/<name>.yaml
            path = CONFIG_DIR / f"{path}.yaml"
        if not is_file(path, ConfigError):
            raise FileNotFoundError(
                f"config file {path.resolve()} not found; pass an existing YAML file "
                f"(examples are in dsanet/configs/)"
            )
        tree = read_tree(path, ConfigError, _anchor_data, _SECTIONS)
        source = str(path)
    cfg = from_dict(tree, source)
    if overrides:
        _apply_overrides(tree, overrides, source=f"{source} (overrides)")
        cfg = from_dict(tree, f"{source} (overrides)")
    return cfg


def read_tree(
    path: Path,
    error: type[Exception],
    anchor: Callable[[dict[str, Any], Path], None],
    kind: str,
    seen: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """The mapping of the YAML file `path` (a config or a search space), merged by `merge` over
    the file its `extends:` names (relative to it; chains of up to EXTENDS_LIMIT files), or over
    nothing. `anchor` makes the file's relative paths absolute; each failure is one `error`
    naming the file."""
    path = path.resolve()
    if path in seen:
        raise error(f"{path}: extends: forms a cycle through {[str(p) for p in seen]}")
    if len(seen) >= EXTENDS_LIMIT:
        raise error(f"{path}: extends: chains more than {EXTENDS_LIMIT} files; merge some of them")
    tree = load_yaml_file(path, error) or {}
    if not isinstance(tree, dict):
        raise error(f"{path}: top level must be a mapping {kind}")
    anchor(tree, path.parent)
    parent = tree.pop("extends", None)
    if parent is None:
        return merge({}, tree)  # the same rule for a file with no parent: null is unset
    if not isinstance(parent, str) or not parent or "\x00" in parent:
        raise error(
            f"{path}: extends: {brief(parent)} is not a file path; name the parent file, "
            f"e.g. extends: xd.yaml"
        )
    parent_path = path.parent / parent
    try:
        found = is_file(parent_path, error)
    except error as exc:
        raise error(f"{path}: extends: {exc}") from exc
    if not found:
        raise error(f"{path}: extends: {parent_path} not found; give a path relative to this file")
    return merge(read_tree(parent_path, error, anchor, kind, seen + (path,)), tree)


_SECTIONS = "of sections (data, model, text, loss, optim, train, eval)"


def _anchor_data(tree: dict[str, Any], folder: Path) -> None:
    anchor_paths(tree.get("data"), folder)


def is_file(path: Path, error: type[Exception]) -> bool:
    """`path.is_file()`; a path the system refuses (a name too long, ...) is an `error`."""
    try:
        return path.is_file()
    except OSError as exc:
        raise error(f"{brief(str(path))}: not a usable path ({exc.strerror}); fix it") from exc


def anchor_paths(mapping: Any, folder: Path, prefix: str = "") -> None:
    """Make the relative data paths of `mapping` (keys `prefix` + list_dir, feature_root, ...)
    absolute, relative to `folder`: the folder of the file that names them."""
    if isinstance(mapping, dict):
        for key in (prefix + k for k in _PATH_FIELDS):
            if _relative_path(mapping.get(key)):
                mapping[key] = str((folder / mapping[key]).resolve())


def _relative_path(value: Any) -> bool:
    """Whether `value` is a relative path to resolve; a NUL is left for `_coerce` to report."""
    if not isinstance(value, str) or not value or "\x00" in value:
        return False
    return not Path(os.path.expanduser(value)).is_absolute()  # "~nosuchuser" stays relative


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base` (an `extends:` parent): mappings merge key by key at every depth, a null
    removes the key (so its default applies), any other value replaces the inherited one."""
    out = dict(base)
    for key, value in top.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            inherited = out.get(key)
            out[key] = merge(inherited if isinstance(inherited, Mapping) else {}, value)
        else:
            out[key] = value
    return out
