"""Dataset YAMLs: presets load, and a bad custom one is one ValueError naming the file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dsanet.datasets import PRESET_DIR, load_spec

XD = yaml.safe_load((PRESET_DIR / "xd.yaml").read_text())


def write(tmp_path: Path, tree: Any) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_custom_dataset_yaml_loads(tmp_path: Path):
    tree = {**XD, "name": "custom", "label_padding": 0, "class_labels": ["A", 1, "B2"]}
    tree["prompts"] = [["normal"], ["one"], ["two", 3]]
    spec = load_spec(write(tmp_path, tree))
    assert spec.class_labels == ("A", "1", "B2") and spec.label_padding == "0"
    assert spec.prompts[2] == ("two", "3") and spec.parse_label("1-0-0") == (1,)


BAD_FIELDS = {
    "name": (["x"], "name=\\['x'\\] is not a non-empty string"),
    "class_labels": ("A", "class_labels='A' is not a non-empty list of labels"),
    "prompts": ([["normal"], "fighting"], "prompts=.* is not a list holding one non-empty list"),
    "normal_label": (True, "normal_label=True is not a non-empty string"),
    "label_separator": (5, "label_separator=5 is not a non-empty string"),
    "frames_per_snippet": ("16", "frames_per_snippet='16' is not an integer in \\[1, 1000000\\]"),
    "fps": (float("nan"), "fps=nan is not a number in \\(0, 1000000\\]"),
    "path_components": (0, "path_components=0 is not an integer in \\[1, "),
    "crops": (10**30, "crops=1000000000000000000000000000000 is not an integer"),
    "test_crop": (-1, "test_crop=-1 is not an integer in \\[0, "),
    "train_list": (None, "train_list=None is not a non-empty string"),
    "sampling": ("pairs", "sampling='pairs' is not one of \\['mixed', 'paired'\\]"),
    "annotation_format": ({"a": 1}, "annotation_format=\\{'a': 1\\} is not one of"),
}


@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_wrong_field_type_names_file_and_field(tmp_path: Path, field: str):
    value, message = BAD_FIELDS[field]
    path = write(tmp_path, {**XD, field: value})
    with pytest.raises(ValueError, match=rf"custom\.yaml: {message}"):
        load_spec(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [xd\n", r"custom\.yaml: not valid YAML; fix the syntax at line \d"),
        ("- name\n- xd\n", r"custom\.yaml: top level must be a mapping .* got list"),
        ("name: &n xd\nnormal_label: *n\n", r"custom\.yaml: line 1, column 7: YAML anchors"),
        ("name: xd\nname: ucf\n", r"line 2, column 1: key 'name' is given twice"),
        ("{1: 2}\n", r"unknown keys \[1\], missing keys \["),
    ],
)
def test_bad_dataset_yaml(tmp_path: Path, text: str, message: str):
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_spec(path)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"class_labels": ["A", "B1", "A"]}, "is not a list of distinct labels"),
        ({"prompts": [["normal"]]}, "prompts must hold one non-empty list .* per class"),
        ({"normal_label": "B1"}, "class_labels\\[0\\] must be the normal label 'B1'"),
        ({"test_crop": 10}, "test_crop=10 must be below crops=10"),
    ],
)
def test_inconsistent_fields(tmp_path: Path, update: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        load_spec(write(tmp_path, {**XD, **update}))


def test_non_utf8_dataset_yaml(tmp_path: Path):
    path = tmp_path / "custom.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ValueError, match=r"custom\.yaml: not UTF-8 text: byte 0xe9 at line 1"):
        load_spec(path)
