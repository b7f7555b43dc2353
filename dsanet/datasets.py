"""Dataset facts (class labels, prompts, list and ground-truth file names, batching) read from YAML.

XD-Violence and UCF-Crime differ here and nowhere else: the presets live in `dsanet/presets/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from dsanet.errors import brief
from dsanet.yamlio import load_yaml_file

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_labels: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    normal_label: str
    label_separator: str | None
    label_padding: str | None
    frames_per_snippet: int
    fps: float
    path_components: int
    train_list: str
    test_list: str
    gt_segments: str
    gt_labels: str
    annotation: str
    annotation_format: str  # "xd": "<video> s e s e ..."; "ucf": "<video> <class> s e s e"
    gt_normal_label: str
    crops: int
    test_crop: int
    sampling: str  # "mixed" | "paired"

    @property
    def num_classes(self) -> int:
        return len(self.class_labels)

    def parse_label(self, label: str) -> tuple[int, ...]:
        """Class indices named by a list label ("B1-B2-0" -> (1, 2)); raises on unknown tokens."""
        if self.label_separator is None:
            tokens = [label.strip()]
        else:
            tokens = [t.strip() for t in label.split(self.label_separator)]
            tokens = [t for t in tokens if t and t != self.label_padding]
        index = {c: i for i, c in enumerate(self.class_labels)}
        unknown = [t for t in tokens if t not in index]
        if unknown or not tokens:
            raise ValueError(
                f"label {brief(label)} names no known class of dataset {self.name!r} "
                f"(unknown: {brief(unknown or [label])}); known labels: "
                f"{list(self.class_labels)}"
            )
        return tuple(sorted({index[t] for t in tokens}))


_ALLOWED = {
    "annotation_format": ("xd", "ucf"),
    "sampling": ("mixed", "paired"),
}
_COUNT_LIMIT = 10**6  # frames per snippet, path components, crops: small counts


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """A preset name (`xd`, `ucf`) or the path of a dataset YAML -> validated `DatasetSpec`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "synth")
        raise FileNotFoundError(
            f"dataset spec {brief(str(name_or_path))} not found: give a preset name ({presets}) "
            f"or the path of a dataset YAML"
        )
    raw = load_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: top level must be a mapping of dataset fields (name, class_labels, ...), "
            f"got {type(raw).__name__}"
        )
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    unknown = sorted(set(raw) - fields, key=str)
    missing = sorted(fields - set(raw))
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown keys {brief(unknown)}, missing keys {missing}; "
            f"valid keys: {sorted(fields)}"
        )
    spec = {key: _FIELDS[key](raw[key], _Field(path, key, raw[key])) for key in _FIELDS}
    _check_consistency(spec, path)
    return DatasetSpec(**spec)


class _Field:
    """Where a dataset field's value came from, for its error message."""

    def __init__(self, path: Path, key: str, value: Any) -> None:
        self.path, self.key, self.value = path, key, value

    def fail(self, allowed: str) -> NoReturn:
        raise ValueError(
            f"{self.path}: {self.key}={brief(self.value)} is not {allowed}; fix the field"
        )


def _text(value: Any, where: _Field) -> str:
    if not isinstance(value, str) or not value or "\x00" in value:
        where.fail("a non-empty string")
    return value


def _label(value: Any, where: _Field) -> str:
    """A class label or prompt: a string, or an integer written without quotes."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _text(value, where)


def _optional_text(value: Any, where: _Field) -> str | None:
    return None if value is None else _text(value, where)


def _optional_label(value: Any, where: _Field) -> str | None:
    return None if value is None else _label(value, where)


def _labels(value: Any, where: _Field) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        where.fail("a non-empty list of labels")
    labels = tuple(_label(v, where) for v in value)
    if len(set(labels)) != len(labels):
        where.fail("a list of distinct labels")
    return labels


def _prompts(value: Any, where: _Field) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not all(isinstance(v, list) and v for v in value):
        where.fail("a list holding one non-empty list of descriptions per class")
    return tuple(tuple(_label(p, where) for p in prompts) for prompts in value)


def _count(value: Any, where: _Field, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _COUNT_LIMIT:
        where.fail(f"an integer in [{low}, {_COUNT_LIMIT}]")
    return value


def _index(value: Any, where: _Field) -> int:
    return _count(value, where, low=0)


def _rate(value: Any, where: _Field) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value <= _COUNT_LIMIT:
        where.fail(f"a number in (0, {_COUNT_LIMIT}]")
    return value


def _choice(value: Any, where: _Field) -> str:
    allowed = _ALLOWED[where.key]
    if value not in allowed:
        where.fail(f"one of {list(allowed)}")
    return value


_FIELDS: dict[str, Callable[[Any, _Field], Any]] = {
    "name": _text,
    "class_labels": _labels,
    "prompts": _prompts,
    "normal_label": _label,
    "label_separator": _optional_text,
    "label_padding": _optional_label,
    "frames_per_snippet": _count,
    "fps": _rate,
    "path_components": _count,
    "train_list": _text,
    "test_list": _text,
    "gt_segments": _text,
    "gt_labels": _text,
    "annotation": _text,
    "annotation_format": _choice,
    "gt_normal_label": _label,
    "crops": _count,
    "test_crop": _index,
    "sampling": _choice,
}


def _check_consistency(spec: dict[str, Any], path: Path) -> None:
    if len(spec["prompts"]) != len(spec["class_labels"]):
        raise ValueError(
            f"{path}: prompts must hold one non-empty list of descriptions per class "
            f"({len(spec['class_labels'])} classes, {len(spec['prompts'])} prompt lists)"
        )
    if spec["class_labels"][0] != spec["normal_label"]:
        raise ValueError(
            f"{path}: class_labels[0] must be the normal label {brief(spec['normal_label'])}"
        )
    if spec["test_crop"] >= spec["crops"]:
        raise ValueError(
            f"{path}: test_crop={spec['test_crop']} must be below crops={spec['crops']} "
            f"(crops are numbered from 0)"
        )
