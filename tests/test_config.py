"""Config loading: YAML, extends, dotted overrides, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from dsanet.config import ConfigError, ExperimentConfig, flatten, load_config


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert cfg.model.num_prototypes == 16 and cfg.model.attn_window == 64
    with pytest.raises(AttributeError):
        cfg.model.num_prototypes = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["xd", "ucf"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "dsanet" / "configs" / f"{name}.yaml")
    assert cfg.data.dataset == name


def test_overrides_from_strings_and_mapping():
    cfg = load_config(
        REPO / "dsanet" / "configs" / "ucf.yaml",
        ["model.num_prototypes=32", "optim.lr=3e-5", "optim.milestones=[4, 8]"],
    )
    assert cfg.model.num_prototypes == 32 and cfg.optim.lr == 3e-5
    assert cfg.optim.milestones == (4, 8) and cfg.model.visual_layers == 2
    again = cfg.with_overrides({"model.normal_ratio": 0.5})
    assert again.model.normal_ratio == 0.5 and cfg.model.normal_ratio == 0.8


def test_extends_and_relative_paths(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {num_prototypes: 8}\ndata: {list_dir: lists}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {decoder_depth: 2}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.num_prototypes == 8 and cfg.model.decoder_depth == 2
    assert cfg.data.list_dir == str(tmp_path / "lists")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.num_prototypes=4", "eval.iou_thresholds=[0.3]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert flatten(cfg)["model.num_prototypes"] == 4


BAD_CONFIGS = {
    "yaml syntax": ("model: {num_prototypes: 4", [], "not valid YAML"),
    "top level list": ("- 1\n- 2\n", [], "top level must be a mapping"),
    "unknown section": ("modle: {}\n", [], r"unknown key\(s\) \['modle'\]"),
    "unknown key": ("model: {num_protos: 4}\n", [], r"model.num_protos"),
    "wrong type": (
        "model: {num_prototypes: many}\n",
        [],
        "model.num_prototypes='many' is not an integer",
    ),
    "bool as int": ("model: {use_sgnm: 1}\n", [], "model.use_sgnm=1 is not a boolean"),
    "bad literal": ("text: {mode: prompt}\n", [], r"one of \['adapter', 'coop'"),
    "window not dividing": ("model: {attn_window: 60}\n", [], "a divisor of model.visual_length"),
    "K below one": (
        "model: {num_prototypes: 0}\n",
        [],
        "num_prototypes=0: must be an integer >= 1",
    ),
    "M above one": ("model: {normal_ratio: 1.5}\n", [], r"normal_ratio=1.5: must be in \(0, 1\]"),
    "M zero": ("model: {normal_ratio: 0}\n", [], "normal_ratio"),
    "negative lr": ("optim: {lr: -1}\n", [], "optim.lr=-1.0: must be > 0"),
    "adapt layers beyond tower": ("text: {adapt_layers: 13}\n", [], "text.adapt_layers"),
    "nan weight": ("loss: {w_align: .nan}\n", [], "finite number"),
    "section not mapping": ("model: 3\n", [], "model must be a mapping"),
    "override unknown": ("", ["model.prototypes=3"], "unknown field 'model.prototypes'"),
    "override malformed": ("", ["model.num_prototypes"], "section.field=value"),
    "override bad value": ("", ["train.device=tpu"], "train.device='tpu'"),
    "val fraction zero": ("data: {val_fraction: 0}\n", [], "data.val_fraction"),
    "extends missing": ("extends: nowhere.yaml\n", [], "not found"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_fail_with_field_and_fix(tmp_path, case):
    text, overrides, message = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((ConfigError, FileNotFoundError), match=message) as info:
        load_config(path, overrides)
    assert str(path.name) in str(info.value) or "nowhere" in str(info.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="dsanet/configs/"):
        load_config(Path("/nonexistent/x.yaml"))


def test_experiment_config_is_the_only_default_source():
    assert ExperimentConfig().optim.weight_decay == 0.01
