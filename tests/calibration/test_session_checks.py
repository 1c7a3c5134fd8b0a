"""A calibration's measurements cannot pass by accident: a NaN output misses every fidelity budget, a model
whose attention calls all ran dense is refused instead of looking perfect at every threshold, the journal tells
two checkpoints of one architecture apart, and held-out testbed inputs never share a noise seed with calibration
ones."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from liteattn.calibration import Budget
from liteattn.calibration.api import testbed_inputs as draw_inputs  # not collected as a test
from liteattn.calibration.session import MISSED, Calibration, fidelity, weights_digest


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


def test_the_weights_digest_tells_checkpoints_apart():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])
    copy = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])
    copy.load_state_dict(model.state_dict())
    assert weights_digest(model) == weights_digest(copy) != weights_digest(torch.nn.Linear(64, 64))
    with torch.no_grad():
        copy[5].weight.add_(1e-3 * torch.randn_like(copy[5].weight))  # a fine-tune of one layer
    assert weights_digest(copy) != weights_digest(model)
    assert weights_digest(object()) == "none"


def test_testbed_inputs_of_different_seeds_never_share_a_noise_seed():
    seeds = {s for draw in (0, 1, 10_000, 20_001) for _, s in draw_inputs(3, draw)}
    assert len(seeds) == 12
    for bad, match in (((0, 0), "inputs: expected from 1 to 100,000"), ((100_001, 0), "inputs: expected"),
                       ((2, -1), "seed: expected a non-negative int"), ((2, 1.5), "seed: expected")):
        with pytest.raises(ValueError, match=match):
            draw_inputs(*bad)


def test_two_callable_runners_differ_by_what_they_do_not_by_their_name():
    from liteattn.calibration.runners import CallableRunner

    def fingerprint(run):
        return CallableRunner(None, run).fingerprint()

    def make(scale):
        return lambda inputs: torch.ones(len(inputs)) * scale

    first, other = (lambda inputs: torch.zeros(len(inputs))), (lambda inputs: torch.ones(len(inputs)))
    assert fingerprint(first)["run"] == fingerprint(other)["run"]  # both "<lambda>" ...
    assert fingerprint(first) != fingerprint(other)  # ... but they do different things
    assert fingerprint(make(2.0)) == fingerprint(make(2.0)) != fingerprint(make(3.0))  # captured values count
    again = (lambda inputs: torch.zeros(len(inputs)))  # the same code defined again: a resume is allowed
    assert fingerprint(again)["code"] == fingerprint(first)["code"]
    bound = [lambda inputs, s=s: torch.ones(len(inputs)) * s for s in (1.0, 2.0)]  # defaults count
    assert fingerprint(bound[0]) != fingerprint(bound[1])

    def run(inputs, *, steps=20):
        return torch.zeros(len(inputs)) + steps

    assert fingerprint(functools.partial(run, steps=20)) != fingerprint(functools.partial(run, steps=30))


def test_a_callable_runner_digest_is_the_same_in_another_process():
    """Set constants are hashed sorted: their order in the code follows the string hash seed of the process."""
    code = ("from liteattn.calibration.runners import code_digest; "
            "print(code_digest(lambda x: x in {'alpha', 'beta', 'gamma', 'delta'}))")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout for seed in (1, 2, 3)}
    assert len(digests) == 1
