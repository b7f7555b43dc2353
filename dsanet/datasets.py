"""Dataset facts (class labels, prompts, list and ground-truth file names, batching) read from YAML.

XD-Violence and UCF-Crime differ here and nowhere else: the presets live in `dsanet/presets/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

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
                f"label {label!r} names no known class of dataset {self.name!r} "
                f"(unknown: {unknown or [label]}); known labels: {list(self.class_labels)}"
            )
        return tuple(sorted({index[t] for t in tokens}))


_ALLOWED = {
    "annotation_format": ("xd", "ucf"),
    "sampling": ("mixed", "paired"),
}


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """A preset name (`xd`, `ucf`) or the path of a dataset YAML -> validated `DatasetSpec`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if p.stem != "synth")
        raise FileNotFoundError(
            f"dataset spec {str(name_or_path)!r} not found: give a preset name ({presets}) "
            f"or the path of a dataset YAML"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    unknown = sorted(set(raw) - fields)
    missing = sorted(fields - set(raw))
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown keys {unknown}, missing keys {missing}; valid keys: {sorted(fields)}"
        )
    for key, allowed in _ALLOWED.items():
        if raw[key] not in allowed:
            raise ValueError(f"{path}: {key}={raw[key]!r}; allowed: {list(allowed)}")
    raw["class_labels"] = tuple(str(c) for c in raw["class_labels"])
    raw["prompts"] = tuple(tuple(str(p) for p in ps) for ps in raw["prompts"])
    if len(raw["prompts"]) != len(raw["class_labels"]) or not all(raw["prompts"]):
        raise ValueError(
            f"{path}: prompts must hold one non-empty list of descriptions per class "
            f"({len(raw['class_labels'])} classes, {len(raw['prompts'])} prompt lists)"
        )
    if raw["class_labels"][0] != raw["normal_label"]:
        raise ValueError(
            f"{path}: class_labels[0] must be the normal label {raw['normal_label']!r}"
        )
    return DatasetSpec(**raw)
