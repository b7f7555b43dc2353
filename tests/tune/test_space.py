"""Search-space files: shipped spaces load, every bad file gets one clear error, sampling works."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml

from dsanet.config import flatten, load_config
from tune.space import (
    SPACE_DIR,
    SpaceError,
    load_space,
    optuna_distributions,
    reportable_metrics,
    sample,
    sampled_values,
    trial_config,
)

SEARCH = {
    "optim.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
    "model.use_sgnm": [True, False],
    "model.num_prototypes": {"choices": [4, 8, 16], "condition": {"model.use_sgnm": True}},
    "model.decoder_depth": {"type": "int", "low": 2, "high": 6, "step": 2},
    "model.attn_window": [8, 16, 32],  # divisors of the demo base's T=32
    "loss.label_smoothing": {"low": 0.0, "high": 0.2},
}
GOOD = {
    "base": "demo",
    "search": SEARCH,
    "metric": "val_ap",
    "mode": "max",
    "searcher": {"kind": "tpe", "seed": 0, "n_startup_trials": 3},
    "scheduler": {"kind": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "num_samples": 4,
}


def write(folder: Path, tree: dict[str, Any], name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def with_search(**params: Any) -> dict[str, Any]:
    """SEARCH with some parameters replaced or added (dots written as __)."""
    return {"search": {**SEARCH, **{k.replace("__", "."): v for k, v in params.items()}}}


# ---------------------------------------------------------------------------- shipped spaces

SHIPPED = sorted(SPACE_DIR.glob("*.yaml"))


def test_expected_spaces_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {
        "demo",
        "xd",
        "ucf",
        "ablation_xd_all",
        "ablation_xd_adapter",
        "ablation_xd_adapter_sgnm",
        "ablation_xd_adapter_dcsa",
        "ablation_xd_vadclip",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_loads_and_validates(path: Path):
    spec = load_space(path)
    assert spec.name == path.stem
    assert spec.metric[0] in reportable_metrics(spec.base)
    assert spec.scheduler.kind == "asha" and spec.scheduler.max_t <= spec.base.train.epochs
    assert set(optuna_distributions(spec)) == {p.name for p in spec.params}
    # the paper's settings first: every searched field at its base value
    base = flatten(spec.base)
    assert spec.points_to_evaluate[0] == {p.name: base[p.name] for p in spec.params}
    assert Path(spec.storage_path).is_absolute()


def test_paper_points_are_the_spec_defaults():
    xd = load_space("xd").points_to_evaluate[0]
    assert xd == {
        "optim.lr": 1e-5,
        "model.num_prototypes": 16,
        "model.normal_ratio": 0.8,
        "text.adapt_layers": 1,
        "text.adapter_weight": 0.6,
        "eval.temperature": 1.0,
        "loss.w_align": 5.0,
        "loss.w_mil": 1.0,
        "loss.w_sep": 1.0,
        "loss.w_event": 1.0,
        "loss.w_bkg": 1.0,
        "loss.w_cons": 1.0,
        "loss.w_gather": 1.0,
        "loss.label_smoothing": 0.1,
        "model.decoder_depth": 8,
        "model.extractor_depth": 1,
        "model.attn_window": 64,
        "model.visual_layers": 1,
        "model.pool_scale": 10.0,
        "train.batch_size": 96,
    }
    ucf = load_space("ucf").points_to_evaluate[0]
    assert {
        k: ucf[k]
        for k in (
            "optim.lr",
            "text.adapt_layers",
            "text.adapter_weight",
            "eval.temperature",
            "loss.w_align",
            "model.attn_window",
            "model.visual_layers",
            "train.batch_size",
        )
    } == {
        "optim.lr": 7e-5,
        "text.adapt_layers": 3,
        "text.adapter_weight": 0.1,
        "eval.temperature": 5.0,
        "loss.w_align": 1.1,
        "model.attn_window": 8,
        "model.visual_layers": 2,
        "train.batch_size": 64,
    }


def test_demo_space():
    spec = load_space("demo")  # by name, like load_config
    assert spec.synthetic is not None and spec.synthetic.preset == "xd-mini"
    assert (spec.scheduler.max_t, spec.num_samples, spec.max_concurrent) == (4, 6, 2)
    assert spec.searcher.n_startup_trials < spec.num_samples  # TPE proposes some trials
    assert spec.max_failures == 2  # the default
    assert (spec.final_seeds, spec.base.train.max_steps_per_epoch) == (2, 6)
    assert spec.resources.gpu == 0 and spec.searcher.kind == "tpe"


@pytest.mark.parametrize(
    ("row", "sgnm", "dcsa", "w_align", "searched_weights"),
    [
        ("all", True, True, 5.0, {"w_align", "w_sep", "w_event", "w_bkg", "w_cons", "w_gather"}),
        ("adapter", False, False, 1.0, {"w_align", "w_sep"}),
        ("adapter_sgnm", True, False, 5.0, {"w_align", "w_sep", "w_cons", "w_gather"}),
        ("adapter_dcsa", False, True, 1.0, {"w_align", "w_sep", "w_event", "w_bkg"}),
        ("vadclip", False, False, 1.0, {"w_align", "w_sep"}),
    ],
)
def test_ablation_rows(
    row: str, sgnm: bool, dcsa: bool, w_align: float, searched_weights: set[str]
):
    spec = load_space(f"ablation_xd_{row}")
    cfg = spec.base
    assert (cfg.model.use_sgnm, cfg.loss.use_dcsa, cfg.loss.w_align) == (sgnm, dcsa, w_align)
    names = {p.name for p in spec.params}
    assert names == {"optim.lr"} | {f"loss.{w}" for w in searched_weights}


def test_vadclip_row_switches():
    cfg = load_space("ablation_xd_vadclip").base
    assert (cfg.text.mode, cfg.text.normalize, cfg.eval.class_probs) == ("coop", False, "softmax")
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.lr) == (
        "multistep",
        (3, 6, 10),
        1e-5,
    )
    assert cfg.loss.w_sep == 1e-4


# ---------------------------------------------------------------------------- bad files

BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown-parameter",
        with_search(model__num_prototype=[4, 8]),
        r"search\.model\.num_prototype: 'model\.num_prototype' is not an ExperimentConfig field; "
        r"did you mean \['model\.num_prototypes'\]\? valid: \[",
    ),
    (
        "empty-range",
        with_search(optim__lr={"low": 1e-4, "high": 1e-4}),
        r"search\.optim\.lr: empty range",
    ),
    (
        "inverted-range",
        with_search(optim__lr={"low": 1e-3, "high": 1e-5}),
        r"search\.optim\.lr: inverted range: low 0\.001 > high 1e-05; swap them",
    ),
    (
        "log-range-not-positive",
        with_search(optim__lr={"low": 0, "high": 1e-3, "log": True}),
        r"search\.optim\.lr\.low: a log range needs low > 0",
    ),
    (
        "empty-categorical",
        with_search(model__num_prototypes={"choices": []}),
        r"search\.model\.num_prototypes\.choices: \[\]: give a non-empty list",
    ),
    (
        "choice-the-config-rejects",
        with_search(model__attn_window=[32, 60]),
        r"search\.model\.attn_window\.choices: 60 is rejected by the config \(.*divisor of "
        r"model\.visual_length",
    ),
    (
        "int-range-the-config-rejects",
        with_search(model__attn_window={"type": "int", "low": 16, "high": 64}),
        r"search\.model\.attn_window: 17 is rejected by the config",
    ),
    (
        "float-out-of-config-range",
        with_search(model__normal_ratio={"low": 0.0, "high": 0.9}),
        r"search\.model\.normal_ratio: 0\.0 is rejected by the config \(.*in \(0, 1\]",
    ),
    (
        "wrong-type-for-field",
        with_search(model__num_prototypes={"type": "float", "low": 2, "high": 8}),
        r"search\.model\.num_prototypes\.type: float does not fit",
    ),
    (
        "field-that-cannot-be-searched",
        with_search(train__epochs=[2, 4]),
        r"search\.train\.epochs: cannot be searched",
    ),
    (
        "condition-on-missing-parameter",
        with_search(model__num_prototypes={"choices": [4], "condition": {"loss.use_dcsa": True}}),
        r"search\.model\.num_prototypes\.condition: tests 'loss\.use_dcsa', which is not another "
        r"searched parameter; add it to search",
    ),
    (
        "condition-value-never-chosen",
        with_search(model__num_prototypes={"choices": [4], "condition": {"model.use_sgnm": 3}}),
        r"search\.model\.num_prototypes\.condition: \[3\] is never chosen",
    ),
    (
        "metric-never-reported",
        {"metric": "val_map"},
        r"metric: the trainer never reports 'val_map' under data\.protocol 'validation'.*"
        r"val_ap",
    ),
    (
        "test-metric-under-validation-protocol",
        {"metric": "test_map_avg"},
        r"metric: the trainer never reports 'test_map_avg'",
    ),
    (
        "metric-mode-lengths-differ",
        {"metric": ["val_ap", "val_auc"], "mode": "max"},
        r"mode: 2 metric\(s\) \['val_ap', 'val_auc'\] but mode 'max'; give one mode",
    ),
    ("bad-mode", {"mode": "maximize"}, r"mode: 'maximize' for val_ap: use max or min"),
    ("loss-maximised", {"metric": "loss_total", "mode": "max"}, r"mode: 'max' for loss_total"),
    (
        "unknown-searcher",
        {"searcher": {"kind": "cmaes"}},
        r"searcher\.kind='cmaes' is not one of \['tpe', 'random', 'gp'\]",
    ),
    (
        "gp-start-up-longer-than-asha-lets-complete",
        {"searcher": {"kind": "gp", "n_startup_trials": 2}, "num_samples": 6},
        r"searcher\.n_startup_trials: 2 with kind gp: the Gaussian process counts only trials "
        r"that reach max_t, and ASHA \(2 rung\(s\) below max_t 4, reduction factor 2\) lets "
        r"about 1 of the 6 through; set n_startup_trials <= 1, scheduler none, or searcher tpe",
    ),
    (
        "unknown-scheduler",
        {"scheduler": "hyperband"},
        r"scheduler\.kind='hyperband' is not one of \['asha', 'asha-promotion', 'none'\]",
    ),
    (
        "max-t-above-epochs",
        {"scheduler": {"kind": "asha", "max_t": 5}},
        r"scheduler\.max_t: 5 epochs is more than train\.epochs = 4 of the base config",
    ),
    (
        "grace-above-max-t",
        {"scheduler": {"max_t": 2, "grace_period": 3}},
        r"scheduler\.grace_period: 3 is more than max_t = 2",
    ),
    (
        "reduction-factor-not-above-1",
        {"scheduler": {"reduction_factor": 1}},
        r"scheduler\.reduction_factor: 1\.0 must be > 1",
    ),
    (
        "unknown-top-level-key",
        {"serach": {}},
        r"serach: unknown key; did you mean 'search'\? valid keys",
    ),
    (
        "unknown-param-key",
        with_search(optim__lr={"low": 1e-5, "hihg": 1e-3}),
        r"search\.optim\.lr\.hihg: unknown key; did you mean 'high'",
    ),
    ("negative-max-failures", {"max_failures": -1}, r"max_failures: -1 must be >= 0"),
    ("negative-final-seeds", {"final_seeds": -1}, r"final_seeds: -1 must be >= 0"),
    ("fractional-max-failures", {"max_failures": 1.5}, r"max_failures=1\.5 is not an integer"),
    (
        "negative-cpu",
        {"resources": {"cpu": -1}},
        r"resources\.cpu: -1\.0 per trial: use a share in \[0\.01, 1024\]",
    ),
    (
        "negative-gpu",
        {"resources": {"cpu": 1, "gpu": -0.5}},
        r"resources\.gpu: -0\.5 per trial: use 0 or a share in \[0\.01, 64\]",
    ),
    (
        "gpu-for-a-cpu-config",
        {"resources": {"cpu": 1, "gpu": 0.5}},
        r"resources\.gpu: 0\.5 GPUs per trial but train\.device is 'cpu'",
    ),
    (
        "point-outside-range",
        {"points_to_evaluate": [{"optim.lr": 0.01}]},
        r"points_to_evaluate\[0\]\.optim\.lr: 0\.01 lies outside the search space",
    ),
    (
        "point-off-the-step-grid",
        {"points_to_evaluate": [{"model.decoder_depth": 3}]},
        r"points_to_evaluate\[0\]\.model\.decoder_depth: 3 lies outside the search space "
        r"\[2, 6\] in steps of 2",
    ),
    (
        "step-not-dividing-the-range",
        with_search(model__decoder_depth={"type": "int", "low": 2, "high": 7, "step": 2}),
        r"search\.model\.decoder_depth\.step: high - low = 5 is not a multiple of 2",
    ),
    (
        "point-on-unsearched-field",
        {"points_to_evaluate": [{"optim.gamma": 0.5}]},
        r"points_to_evaluate\[0\]\.optim\.gamma: is not searched",
    ),
    (
        "point-against-its-condition",
        {"points_to_evaluate": [{"model.use_sgnm": False, "model.num_prototypes": 4}]},
        r"points_to_evaluate\[0\]\.model\.num_prototypes: is given but its condition",
    ),
    (
        "base-point-outside-range",
        {**with_search(optim__lr={"low": 1e-3, "high": 1e-2}), "points_to_evaluate": ["base"]},
        r"points_to_evaluate\[0\]\.optim\.lr: 0\.0001 lies outside",
    ),
    (
        "too-few-samples-for-points",
        {"num_samples": 1, "points_to_evaluate": ["base", "base"]},
        r"num_samples: 1 is fewer than the 2 points_to_evaluate",
    ),
    ("unknown-base-config", {"base": "nosuch"}, r"base: config file .*nosuch\.yaml not found"),
    (
        "unknown-override-field",
        {"overrides": {"model.num_protos": 4}},
        r"overrides\.model\.num_protos: unknown field 'model\.num_protos'",
    ),
    (
        "override-the-config-rejects",
        {"overrides": {"model.attn_window": 60}},
        r"overrides\.model\.attn_window: invalid values",
    ),
    (
        "file-store-tracking-uri",
        {"mlflow": {"tracking_uri": "./mlruns"}},
        r"mlflow\.tracking_uri: './mlruns': use sqlite:///",
    ),
    (
        "unknown-synthetic-preset",
        {"synthetic": {"preset": "xd-tiny"}},
        r"synthetic\.preset: 'xd-tiny' is not a preset",
    ),
    (
        "synthetic-preset-of-other-dataset",
        {"synthetic": {"preset": "ucf-mini"}},
        r"synthetic\.preset: ucf-mini generates 'ucf' data",
    ),
    # numbers: finite, of sane size, never booleans; steps normal and coarse enough
    (
        "huge-int-range",
        with_search(model__num_prototypes={"type": "int", "low": 1, "high": 10**23}),
        r"search\.model\.num_prototypes\.high: 100000000000000000000000 is out of range; "
        r"integers here lie within ±2147483647",
    ),
    (
        "int-of-400-digits-for-a-float",
        with_search(loss__w_align={"low": 0.1, "high": 10**400}),
        r"search\.loss\.w_align\.high: .* is not a finite number \(too large for a float\)",
    ),
    (
        "denormal-step",
        with_search(loss__label_smoothing={"low": 0.0, "high": 1e-323, "step": 5e-324}),
        r"search\.loss\.label_smoothing\.step: 5e-324 is below the smallest normal float",
    ),
    (
        "denormal-step-over-a-wide-range",
        with_search(loss__label_smoothing={"low": 0.0, "high": 0.2, "step": 5e-324}),
        r"search\.loss\.label_smoothing\.step: 5e-324 is below the smallest normal float",
    ),
    (
        "step-grid-too-fine",
        with_search(loss__label_smoothing={"low": 0.0, "high": 0.2, "step": 1e-12}),
        r"label_smoothing\.step: 1e-12 cuts \[0\.0, 0\.2\] into 2e\+11 steps, more than 1000000; "
        r"use a larger step, or drop step",
    ),
    (
        "range-overflows",
        with_search(loss__w_align={"low": -1e308, "high": 1e308}),
        r"search\.loss\.w_align: range \[-1e\+308, 1e\+308\] is too wide",
    ),
    (
        "nan-bound",
        with_search(optim__lr={"low": float("nan"), "high": 1e-3}),
        r"search\.optim\.lr\.low: nan is not a finite number",
    ),
    (
        "inf-bound",
        with_search(optim__lr={"low": 1e-5, "high": float("inf")}),
        r"search\.optim\.lr\.high: inf is not a finite number",
    ),
    (
        "bool-bound",
        with_search(model__decoder_depth={"type": "int", "low": True, "high": 6}),
        r"search\.model\.decoder_depth\.low: True is not a number",
    ),
    (
        "list-bound",
        with_search(optim__lr={"low": [1e-5], "high": 1e-3}),
        r"search\.optim\.lr\.low: \[1e-05\] is not a number",
    ),
    (
        "bool-step",
        with_search(model__decoder_depth={"type": "int", "low": 2, "high": 6, "step": True}),
        r"search\.model\.decoder_depth\.step: True is not a number",
    ),
    (
        "word-step",
        with_search(loss__label_smoothing={"low": 0.0, "high": 0.2, "step": "two"}),
        r"search\.loss\.label_smoothing\.step: 'two' is not a number",
    ),
    (
        "zero-step",
        with_search(model__decoder_depth={"type": "int", "low": 2, "high": 6, "step": 0}),
        r"search\.model\.decoder_depth\.step: must be > 0",
    ),
    (
        "huge-int-step",
        with_search(model__decoder_depth={"type": "int", "low": 2, "high": 6, "step": 2**40}),
        r"search\.model\.decoder_depth\.step: 1099511627776 is out of range",
    ),
    (
        "fractional-int-step",
        with_search(model__decoder_depth={"type": "int", "low": 2, "high": 6, "step": 0.5}),
        r"search\.model\.decoder_depth\.step: 0\.5 is not an integer",
    ),
    (
        "int-log-flag-not-bool",
        with_search(optim__lr={"low": 1e-5, "high": 1e-3, "log": "yes"}),
        r"search\.optim\.lr\.log: 'yes' is not true or false",
    ),
    (
        "too-many-choices",
        with_search(model__num_prototypes=list(range(1, 200))),
        r"search\.model\.num_prototypes\.choices: 199 values, more than 100; search a range",
    ),
    (
        "nested-choice",
        with_search(model__num_prototypes=[[4], 8]),
        r"search\.model\.num_prototypes\.choices: \[4\] is rejected by the config",
    ),
    (
        "condition-too-long",
        with_search(
            model__num_prototypes={"choices": [4], "condition": {"model.use_sgnm": [True] * 101}}
        ),
        r"search\.model\.num_prototypes\.condition\.model\.use_sgnm: lists more than 100",
    ),
    (
        "non-string-parameter",
        {"search": {1: [1, 2]}},
        r"search\.1: 1 is not an ExperimentConfig field",
    ),
    ("huge-num-samples", {"num_samples": 10**9}, r"num_samples: 1000000000 must be <= 100000"),
    (
        "astronomic-num-samples",
        {"num_samples": 10**30},
        r"num_samples=.* is not an integer within ±9223372036854775807",
    ),
    ("bool-num-samples", {"num_samples": True}, r"num_samples=True is not an integer"),
    (
        "float-num-samples",
        {"num_samples": 1e300},
        r"num_samples=.* is not an integer within ±9223372036854775807",
    ),
    ("huge-max-concurrent", {"max_concurrent": 10**6}, r"max_concurrent: 1000000 must be <="),
    ("huge-max-failures", {"max_failures": 10**6}, r"max_failures: 1000000 must be <= 100"),
    (
        "negative-searcher-seed",
        {"searcher": {"seed": -1}},
        r"searcher\.seed: -1 must be >= 0",
    ),
    (
        "huge-searcher-seed",
        {"searcher": {"seed": 2**40}},
        r"searcher\.seed: 1099511627776 must be <= 2147483647",
    ),
    (
        "huge-startup-trials",
        {"searcher": {"n_startup_trials": 10**7}},
        r"searcher\.n_startup_trials: 10000000 must be <= 100000",
    ),
    (
        "reduction-factor-barely-above-1",
        {"scheduler": {"reduction_factor": 1.0000001}},
        r"scheduler\.reduction_factor: 1\.0000001 puts 1\.39e\+07 ASHA rungs between "
        r"grace_period 1 and max_t 4, more than 100",
    ),
    (
        "reduction-factor-inf",
        {"scheduler": {"reduction_factor": float("inf")}},
        r"scheduler\.reduction_factor=inf is not a finite number",
    ),
    (
        "huge-max-t",
        {"scheduler": {"max_t": 10**20}},
        r"scheduler\.max_t=100000000000000000000 is not an integer within",
    ),
    (
        "huge-cpu",
        {"resources": {"cpu": 10**6}},
        r"resources\.cpu: 1000000\.0 per trial: use a share in \[0\.01, 1024\]",
    ),
    ("tiny-cpu", {"resources": {"cpu": 1e-300}}, r"resources\.cpu: 1e-300 per trial"),
    (
        "denormal-gpu",
        {"resources": {"cpu": 1, "gpu": 5e-324}},
        r"resources\.gpu: 5e-324 per trial: use 0 or a share in \[0\.01, 64\]",
    ),
    ("bool-gpu", {"resources": {"gpu": False}}, r"resources\.gpu=False is not a number"),
    (
        "too-many-points",
        {"num_samples": 200, "points_to_evaluate": ["base"] * 101},
        r"points_to_evaluate: 101 points, more than 100",
    ),
    (
        "point-of-400-digits",
        {"points_to_evaluate": [{"optim.lr": 10**400}]},
        r"points_to_evaluate\[0\]\.optim\.lr: .* is rejected by the config \(.*finite number",
    ),
    (
        "too-many-objectives",
        {"metric": [f"loss_{i}" for i in range(9)], "mode": None},
        r"metric: 9 objectives, more than 8",
    ),
    ("long-name", {"name": "a" * 150}, r"name: 'a+\.\.\.a+' is longer than 100 characters"),
    (
        "synthetic-preset-not-a-word",
        {"synthetic": {"preset": ["xd-mini"]}},
        r"synthetic\.preset=\['xd-mini'\] is not a string",
    ),
    (
        "negative-synthetic-seed",
        {"synthetic": {"preset": "xd-mini", "seed": -3}},
        r"synthetic\.seed: -3 must be >= 0",
    ),
    (
        "nul-in-storage-path",
        {"storage_path": "a\x00b"},
        r"storage_path='a\\x00b' is not a string without NUL",
    ),
    (
        "long-experiment-name",
        {"mlflow": {"experiment": "e" * 300}},
        r"mlflow\.experiment: 'e+\.\.\.e+': use at most 200 printable characters",
    ),
    (
        "extends-not-a-path",
        {"extends": ["parent.yaml"]},
        r"extends: \['parent\.yaml'\] is not a file path",
    ),
    (
        "extends-name-too-long",
        {"extends": "p" * 300 + ".yaml"},
        r"extends: .*not a usable path \(File name too long\)",
    ),
    (
        "override-huge-int",
        {"overrides": {"model.num_prototypes": 10**23}},
        r"overrides\.model\.num_prototypes: .*is not an integer within",
    ),
    (
        "override-non-string-key",
        {"overrides": {1: 2}},
        r"overrides\.1: .*unknown field 1; did you mean",
    ),
    ("base-with-nul", {"base": "demo\x00.yaml"}, r"base: config path .* holds a NUL character"),
    (
        "base-name-too-long",
        {"base": "b" * 300},
        r"base: 'b+\.\.\.b+': not a usable path \(File name too long\)",
    ),
]


@pytest.mark.parametrize(("update", "match"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_space_gets_one_clear_error(tmp_path: Path, update: dict[str, Any], match: str):
    path = write(tmp_path, {**copy.deepcopy(GOOD), **copy.deepcopy(update)})
    with pytest.raises(SpaceError, match=match) as info:
        load_space(path)
    assert str(info.value).startswith(f"{path}: ")


def test_good_space_loads(tmp_path: Path):
    spec = load_space(write(tmp_path, GOOD))
    assert [p.name for p in spec.params][:3] == [
        "optim.lr",
        "model.use_sgnm",
        "model.num_prototypes",
    ]
    assert spec.metric == ("val_ap",) and spec.mode == ("max",)


def test_gp_takes_categorical_conditional_and_multi_objective_spaces(tmp_path: Path):
    """GPSampler (Optuna 5) models categorical parameters and several objectives; a conditional
    parameter is sampled at random, which the plan says. Without ASHA every trial completes, so
    any start-up fits."""
    from tune.plan import describe

    tree = {**GOOD, "metric": ["val_ap", "val_auc"], "mode": ["max", "max"], "scheduler": "none"}
    tree["searcher"] = {"kind": "gp", "seed": 1, "n_startup_trials": 4}
    spec = load_space(write(tmp_path, tree))
    assert spec.searcher.kind == "gp" and len(spec.metric) == 2
    plan = SimpleNamespace(
        spec=spec,
        root=tmp_path,
        resume=False,
        data_note="",
        tracking_uri="",
        address=None,
        final_seeds=0,
    )
    assert (
        "gp (seed 1, 4 random start-up trials); conditional model.num_prototypes sampled "
        "at random;" in describe(plan)
    )
    asha = {**GOOD, "searcher": {"kind": "gp", "n_startup_trials": 1}}
    assert load_space(write(tmp_path, asha, "asha.yaml")).searcher.n_startup_trials == 1


def test_yaml_syntax_error(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("base: demo\nsearch: {optim.lr: [1, 2\n")
    with pytest.raises(SpaceError, match=r"broken\.yaml: not valid YAML; fix the syntax at line"):
        load_space(path)


ALIAS_BOMB = "base: demo\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)
BAD_YAML = {
    "alias-bomb": (ALIAS_BOMB, r"line 2, column 4: YAML anchors and aliases .*write the value"),
    "alias": (
        "base: demo\nsearch:\n  optim.lr: &r {low: 1.0e-5, high: 1.0e-3}\n  optim.gamma: *r\n",
        r"line 3, column 13: YAML anchors and aliases",
    ),
    "duplicate-top-level-key": (
        "base: demo\nnum_samples: 4\nnum_samples: 40\n",
        r"line 3, column 1: key 'num_samples' is given twice \(first at line 2\); keep one",
    ),
    "duplicate-parameter": (
        "base: demo\nsearch:\n  optim.lr: {low: 1.0e-5, high: 1.0e-3}\n  optim.lr: [1.0e-4]\n",
        r"line 4, column 3: key 'optim\.lr' is given twice \(first at line 3\)",
    ),
    "non-utf8-byte": (
        b"base: demo\nname: caf\xe9\n",
        r"not UTF-8 text: byte 0xe9 at line 2 \(byte offset 20\) .*save the file as UTF-8",
    ),
    "oversize": ("base: demo\n#" + "x" * (1 << 20), r"larger than the 1024 KiB"),
    "deep-nesting": ("base: demo\nsearch: " + "[" * 50 + "]" * 50, r"nested more than 32"),
    "python-tag": ("base: !!python/object/apply:os.system [ls]\n", r"could not determine a con"),
    "bad-date": ("base: demo\nname: 2024-02-30\n", r"line 2, column 7: cannot read '2024-02-30'"),
    "multiple-documents": ("base: demo\n---\nbase: xd\n", r"but found another document"),
    "control-character": ("base: demo\nname: a\x1bb\n", r"unacceptable character #x001b"),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_bad_yaml_gets_one_short_error(tmp_path: Path, case: str):
    text, match = BAD_YAML[case]
    path = tmp_path / "space.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.monotonic()
    with pytest.raises(SpaceError, match=match) as info:
        load_space(path)
    assert time.monotonic() - start < 2
    assert str(info.value).startswith(f"{path}: ") and len(str(info.value).splitlines()) == 1


def test_bad_yaml_in_a_parent_names_the_parent(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text("base: demo\nbase: xd\n")
    child = write(tmp_path, {"extends": "parent.yaml", "search": SEARCH}, "child.yaml")
    with pytest.raises(SpaceError, match=r"parent\.yaml: line 2, column 1: key 'base' is given"):
        load_space(child)


def test_huge_values_are_quoted_briefly(tmp_path: Path):
    cases = [
        with_search(model__attn_window=["x" * 100_000]),
        with_search(**{"x" * 100_000: [1, 2]}),
        {"metric": "val_" + "y" * 100_000},
        {"serach" + "z" * 100_000: 1},
        {"overrides": {"train.device": "w" * 100_000}},
    ]
    for update in cases:
        path = write(tmp_path, {**copy.deepcopy(GOOD), **update})
        with pytest.raises(SpaceError) as info:
            load_space(path)
        assert len(str(info.value)) < 2000, str(info.value)[:300]


def test_fine_float_grid_within_the_limit_loads(tmp_path: Path):
    search = {"loss.label_smoothing": {"low": 0.0, "high": 0.5, "step": 1e-6}}
    spec = load_space(write(tmp_path, {**GOOD, "search": search}))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    assert 0.0 <= sample(trial, spec)["loss.label_smoothing"] <= 0.5


def test_missing_space_file_lists_the_shipped_ones(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"shipped space \[.*'demo'"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(SpaceError, match=r"not a usable path \(File name too long\)"):
        load_space("s" * 300)


def test_shorthands_and_inline_base(tmp_path: Path):
    tree = {
        **GOOD,
        "base": {"model": {"visual_length": 128, "attn_window": 32}, "train": {"epochs": 3}},
        "search": {
            "model.num_prototypes": {"type": "log", "low": 2, "high": 64},
            "text.mode": ["adapter", "coop"],
        },
        "scheduler": "none",
        "searcher": "random",
    }
    spec = load_space(write(tmp_path, tree))
    k = spec.params[0]
    assert (k.kind, k.log, k.low, k.high) == ("int", True, 2, 64)
    assert spec.params[1].choices == ("adapter", "coop")
    assert (spec.scheduler.kind, spec.searcher.kind, spec.base.train.epochs) == (
        "none",
        "random",
        3,
    )
    assert spec.base_ref["model"]["visual_length"] == 128


def test_conditions_are_sampled_after_their_parent(tmp_path: Path):
    search = {
        "model.num_prototypes": SEARCH["model.num_prototypes"],
        "model.use_sgnm": [True, False],
    }
    spec = load_space(write(tmp_path, {**GOOD, "search": search}))
    assert [p.name for p in spec.params] == ["model.use_sgnm", "model.num_prototypes"]


def test_condition_cycle(tmp_path: Path):
    search = {
        "model.use_sgnm": {"choices": [True], "condition": {"loss.use_dcsa": True}},
        "loss.use_dcsa": {"choices": [True], "condition": {"model.use_sgnm": True}},
    }
    with pytest.raises(SpaceError, match=r"search: conditions form a cycle"):
        load_space(write(tmp_path, {**GOOD, "search": search}))


# ---------------------------------------------------------------------------- objectives


def test_multi_objective_and_loss_default_mode(tmp_path: Path):
    spec = load_space(write(tmp_path, {**GOOD, "metric": ["val_ap", "loss_total"], "mode": None}))
    assert spec.metric == ("val_ap", "loss_total") and spec.mode == ("max", "min")


def test_reference_protocol_reports_test_metrics(tmp_path: Path):
    tree = {**GOOD, "overrides": {"data.protocol": "reference"}, "metric": "test_map_avg"}
    assert load_space(write(tmp_path, tree)).metric == ("test_map_avg",)
    reference = load_config("demo", {"data.protocol": "reference"})
    assert {"test_auc", "test_ap", "test_map_iou10", "test_map_iou50", "test_map_avg"} <= set(
        reportable_metrics(reference)
    )
    assert reportable_metrics(load_config("demo")) == ("val_ap", "val_auc", "val_class_acc")


# ---------------------------------------------------------------------------- extends, overrides


def test_extends_merges_blocks_and_null_removes(tmp_path: Path):
    write(tmp_path, {**GOOD, "overrides": {"optim.gamma": 0.5}}, "parent.yaml")
    child = {
        "extends": "parent.yaml",
        "overrides": {"loss.w_sep": 0.5},
        "search": {"loss.label_smoothing": None, "loss.w_bkg": {"low": 0.1, "high": 3}},
    }
    spec = load_space(write(tmp_path, child, "child.yaml"))
    names = [p.name for p in spec.params]
    assert "loss.label_smoothing" not in names and names[-1] == "loss.w_bkg"
    assert (spec.base.optim.gamma, spec.base.loss.w_sep) == (0.5, 0.5)
    assert spec.name == "child" and spec.scheduler.max_t == 4


def test_extends_merges_parameters_key_by_key_like_configs(tmp_path: Path):
    """Spaces and configs share dsanet.config.merge: a child's mapping merges into the inherited
    one at every depth (a parameter keeps the keys it does not give), and null removes a key."""
    write(tmp_path, GOOD, "parent.yaml")
    child = {
        "extends": "parent.yaml",
        "search": {"optim.lr": {"high": 1e-2}, "model.decoder_depth": {"step": None}},
        "scheduler": {"max_t": 3},
    }
    spec = load_space(write(tmp_path, child, "child.yaml"))
    by_name = {p.name: p for p in spec.params}
    lr, depth = by_name["optim.lr"], by_name["model.decoder_depth"]
    assert (lr.low, lr.high, lr.log) == (1e-5, 1e-2, True)
    assert (depth.kind, depth.low, depth.high, depth.step) == ("int", 2, 6, None)
    assert (spec.scheduler.max_t, spec.scheduler.reduction_factor) == (3, 2.0)


def test_extends_errors(tmp_path: Path):
    write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(SpaceError, match=r"extends: forms a cycle"):
        load_space(tmp_path / "a.yaml")
    with pytest.raises(SpaceError, match=r"c\.yaml: extends: .*missing\.yaml not found"):
        load_space(write(tmp_path, {"extends": "missing.yaml"}, "c.yaml"))


def test_command_line_overrides_and_relative_paths(tmp_path: Path):
    path = write(tmp_path, {**GOOD, "overrides": {"data.feature_root": "feats"}})
    spec = load_space(path, ["optim.gamma=0.5"])
    assert spec.base.optim.gamma == 0.5
    assert spec.base.data.feature_root == str(tmp_path / "feats")
    with pytest.raises(SpaceError, match=r"overrides \(command line\)"):
        load_space(path, ["optim.gama=0.5"])
    with pytest.raises(SpaceError, match=r"scheduler\.max_t: 4 epochs is more than"):
        load_space(path, {"train.epochs": 2})


# ---------------------------------------------------------------------------- sampling


def test_sampling_honours_conditions_and_ranges(tmp_path: Path):
    spec = load_space(write(tmp_path, GOOD))
    dists = optuna_distributions(spec)
    by_name = {p.name: p for p in spec.params}
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
    )
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = sample(trial, spec)
        assert ("model.num_prototypes" in values) == values["model.use_sgnm"]
        dropped = set() if values["model.use_sgnm"] else {"model.num_prototypes"}
        assert set(values) == set(by_name) - dropped
        assert trial.distributions == {name: dists[name] for name in values}
        for name, value in values.items():
            assert by_name[name].contains(value), (name, value)
        assert values["model.decoder_depth"] in (2, 4, 6)
        seen.add(values["model.use_sgnm"])
        study.tell(trial, values["loss.label_smoothing"])
    assert seen == {True, False}


def test_enqueued_points_are_sampled_first(tmp_path: Path):
    spec = load_space(write(tmp_path, {**GOOD, "points_to_evaluate": ["base"]}))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for point in spec.points_to_evaluate:
        study.enqueue_trial(point)
    assert sample(study.ask(), spec) == spec.points_to_evaluate[0]


def test_trial_config_applies_sampled_values(tmp_path: Path):
    spec = load_space(write(tmp_path, GOOD))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    values = sample(trial, spec)
    cfg = trial_config(spec, values)
    flat, base = flatten(cfg), flatten(spec.base)
    assert all(flat[name] == value for name, value in values.items())
    assert all(flat[k] == v for k, v in base.items() if k not in values)


def test_sampled_values_are_the_config_fields_of_a_trial():
    config = {
        "optim.lr": 1e-4,
        "model": {"num_prototypes": 8},  # nested keys read as dotted ones
        "_study": {"dir": "/studies/x", "max_t": 4},  # the runner's own keys
        "_optuna_trial": 3,
        "train.no_such_field": 1,
    }
    assert sampled_values(config) == {"optim.lr": 1e-4, "model.num_prototypes": 8}


def test_sample_plugs_into_ray_optuna_search():
    """The runner's contract: define-by-run space, dotted names kept, the paper's point first."""
    optuna_search = pytest.importorskip("ray.tune.search.optuna")  # no Ray cluster is started
    spec = load_space("demo")
    search = optuna_search.OptunaSearch(
        space=lambda trial: sample(trial, spec),
        metric=spec.metric[0],
        mode=spec.mode[0],
        points_to_evaluate=spec.points_to_evaluate,
        sampler=optuna.samplers.TPESampler(seed=spec.searcher.seed),
    )
    assert search.suggest("first") == spec.points_to_evaluate[0]
    search.on_trial_complete("first", {spec.metric[0]: 0.5})
    second = search.suggest("second")
    assert set(second) == {p.name for p in spec.params}
    assert trial_config(spec, second).optim.lr == second["optim.lr"]
