"""CUDA paths: bf16 autocast training steps and evaluation. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_run_overrides

from dsanet.config import load_config
from dsanet.trainer import fit, resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device is visible; use train.device=cpu"):
        resolve_device("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fit_on_cuda(xd_mini, tmp_path, precision):
    cfg = load_config(
        "demo",
        tiny_run_overrides(xd_mini, tmp_path / precision)
        + ["train.device=cuda", f"train.precision={precision}", "train.epochs=1"],
    )
    result = fit(cfg)
    assert math.isfinite(result.history[0]["loss_total"])
    assert 0.0 <= result.test["auc"] <= 1.0
