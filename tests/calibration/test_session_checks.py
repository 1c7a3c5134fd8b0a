"""A calibration's measurements cannot pass by accident: a NaN output misses every fidelity budget, and a model
whose attention calls all ran dense is refused instead of looking perfect at every threshold."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from liteattn.calibration import Budget
from liteattn.calibration.session import MISSED, Calibration, fidelity


def test_identical_outputs_are_perfect_and_nan_outputs_miss():
    dense = torch.rand(3, 2, 16, 16) * 2 - 1
    same = fidelity(dense.clone(), dense, (-1.0, 1.0))
    assert same["psnr"] == 99.0 and same["rel_error"] == 0.0 and same["ssim"] == pytest.approx(1.0)
    broken = dense.clone()
    broken[0, 0, 0, 0] = float("nan")
    bad = fidelity(broken, dense, (-1.0, 1.0))
    assert bad == {"psnr": MISSED["psnr"], "ssim": MISSED["ssim"], "rel_error": MISSED["rel_error"]}
    for text, metric in (("psnr>=10", "psnr"), ("ssim>=0.5", "ssim"), ("rel_error<=0.5", "rel_error")):
        assert not Budget.parse(text).met(bad[metric])


def test_rel_error_is_measured_on_the_outputs_as_they_are():
    dense = torch.full((3, 1, 8, 8), 0.5)  # mid-grey in [0, 1]: mapping to [-1, 1] would make its norm 0
    out = dense + 0.05
    assert fidelity(out, dense, (0.0, 1.0))["rel_error"] == pytest.approx(0.1)


def _calls(*modes):
    return [SimpleNamespace(mode=m) for m in modes]


def test_a_run_that_computed_nothing_sparse_is_refused():
    lines = []
    fake = SimpleNamespace(log=lines.append, _fallbacks_reported=False)
    sparse_config = SimpleNamespace(threshold=-2.0)
    everything_dense = SimpleNamespace(fallbacks={"context_parallel_steer": 4},
                                       calls=_calls("dense_step", *["fallback"] * 4))
    with pytest.raises(ValueError, match="^pipe_or_transformer: every attention call ran dense"):
        Calibration._check_fallbacks(fake, everything_dense, sparse_config)
    Calibration._check_fallbacks(fake, everything_dense, SimpleNamespace(threshold=-math.inf))  # a dense run: fine
    partly = SimpleNamespace(fallbacks={"attention_mask": 2}, calls=_calls("sparse", "fallback", "fallback"))
    Calibration._check_fallbacks(fake, partly, sparse_config)
    Calibration._check_fallbacks(fake, partly, sparse_config)
    assert len(lines) == 1 and "attention_mask=2" in lines[0]  # reported once
    Calibration._check_fallbacks(fake, SimpleNamespace(fallbacks={}, calls=_calls("sparse")), sparse_config)
