"""Shared fixtures: paths to ../shared, and a tiny VadCLIP-format tree written to tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch loads: the workers share the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
REAL_DATA = SHARED / "data"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (the default): the end-to-end runs (`-m slow`) go one at a time in this process:
    they start Ray clusters and network namespaces and time kills. Other suites: xdist's count."""
    return None if "not slow" in (config.option.markexpr or "") else 0


def write_tiny_tree(root: Path, width: int = 512, seed: int = 0) -> dict[str, Path]:
    """A minimal XD-format tree: 5 train videos x 10 crops, 3 test videos, gt files.

    Train: two anomalous (B1-0-0, B2-G-0) and two normal, then a second B1-0-0 video (listed
    last), so that a stratified validation split of half the videos holds both kinds; test: one
    anomalous, two normal.
    """
    rng = np.random.default_rng(seed)
    feats, lists = root / "features", root / "lists"
    feats.mkdir(parents=True)
    lists.mkdir(parents=True)
    train = [
        ("fightA__#00-00-00_00-01-00_label_B1-0-0", "B1-0-0", 300),
        ("boomB__#00-00-00_00-01-00_label_B2-G-0", "B2-G-0", 40),
        ("calmC__#00-00-00_00-01-00_label_A", "A", 120),
        ("calmD__#00-00-00_00-01-00_label_A", "A", 80),
        ("fightE__#00-00-00_00-01-00_label_B1-0-0", "B1-0-0", 60),
    ]
    rows = ["path,label"]
    for name, label, length in train:
        for crop in range(10):
            file = f"{name}__{crop}.npy"
            np.save(feats / file, rng.normal(size=(length + crop, width)).astype(np.float32))
            rows.append(f"/elsewhere/XDTrainClipFeatures/{file},{label}")
    (lists / "xd_CLIP_rgb.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    test = [
        ("testA__#00-00-00_00-01-00_label_B1-0-0", "B1-0-0", 520),
        ("testN__#00-00-00_00-01-00_label_A", "A", 100),
        ("testM__#00-00-00_00-01-00_label_A", "A", 256),
    ]
    rows = ["path,label"]
    for name, label, length in test:
        file = f"{name}__0.npy"
        np.save(feats / file, rng.normal(size=(length, width)).astype(np.float32))
        rows.append(f"/elsewhere/XDTestClipFeatures/{file},{label}")
    (lists / "xd_CLIP_rgbtest.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    segments = np.empty(3, dtype=object)
    segments[:] = [[["32", "160"], ["4000", "9000"]], [[0, 1600]], [[0, 4096]]]
    labels = np.empty(3, dtype=object)
    labels[:] = [["B1", "B1"], ["A"], ["A"]]
    np.save(lists / "gt_segment.npy", segments, allow_pickle=True)
    np.save(lists / "gt_label.npy", labels, allow_pickle=True)
    (lists / "annotations.txt").write_text(f"{test[0][0]} 32 160 4000 9000\n")
    return {"features": feats, "lists": lists, "cache": root / "cache"}


@pytest.fixture
def tiny_tree(tmp_path: Path) -> dict[str, Path]:
    return write_tiny_tree(tmp_path / "tiny")


@pytest.fixture(scope="session")
def synth_mini(tmp_path_factory):
    """`synth_mini("xd")`: the synthetic xd-mini (or ucf-mini) benchmark of seed 0, generated
    at its first use in the session; read it, never change it."""
    from dsanet.synth import SynthSummary, generate

    made: dict[str, SynthSummary] = {}

    def tree(dataset: str) -> SynthSummary:
        if dataset not in made:
            out = tmp_path_factory.mktemp(f"{dataset}-mini") / "data"
            made[dataset] = generate(f"{dataset}-mini", out, seed=0)
        return made[dataset]

    return tree


@pytest.fixture(scope="session")
def xd_mini(synth_mini) -> dict[str, Path]:
    """The synthetic xd-mini benchmark, generated once per test session."""
    summary = synth_mini("xd")
    return {
        "lists": summary.list_dir,
        "features": summary.feature_root,
        "cache": summary.out.parent / "cache",
    }


def tiny_run_overrides(data: dict[str, Path], out_dir: Path) -> list[str]:
    """A DSANet small enough for CPU tests: short window, one decoder block, 1-layer text."""
    return [
        f"data.list_dir={data['lists']}",
        f"data.feature_root={data['features']}",
        f"data.cache_dir={data['cache']}",
        f"train.out_dir={out_dir}",
        "model.visual_length=64",
        "model.attn_window=16",
        "model.decoder_depth=1",
        "text.layers=1",
        "train.batch_size=8",
        "train.max_steps_per_epoch=3",
        "train.epochs=2",
        "data.val_fraction=0.2",
    ]


def one_error(capsys, status: int, *needles: str) -> str:
    """A CLI's answer to bad input: exit 2, one short `error:` message holding `needles`."""
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="session")
def tiny_finished(tmp_path_factory) -> tuple[list[str], Path]:
    """The overrides of a finished 1-epoch, 1-step run on the tiny tree, and its folder (copy it
    before changing it): test_cli's, test_evaluate's and test_plots' tests read the same one."""
    from dsanet.config import load_config
    from dsanet.trainer import fit

    root = tmp_path_factory.mktemp("tiny-run")
    data = write_tiny_tree(root / "tiny")
    out = root / "run"
    overrides = tiny_run_overrides(data, out) + [
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "data.val_fraction=0.5",
        "model.num_prototypes=4",
    ]
    fit(load_config("demo", overrides))
    return overrides, out


@pytest.fixture(scope="session")
def tiny_finished_run(tiny_finished) -> Path:
    """The folder of `tiny_finished` (copy it before changing it)."""
    return tiny_finished[1]
