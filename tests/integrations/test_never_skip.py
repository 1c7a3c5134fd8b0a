"""Settings that cannot skip anything run the model's own attention: the stock result, bit for bit.

A threshold of -inf at every step marks nothing, so liteattn would compute dense attention, equal to the stock
backend only up to rounding (~1e-7 in float32). Such a configuration runs the stock backend instead, as
``remove()`` would. A schedule that marks at some step keeps its -inf steps on liteattn (the tiles skipped so
far stay skipped there); ``dense_steps`` is the way to stock steps first. So does a layer whose skip state was
seeded before the generation (test_wan14b_shape_benchmark.py's forced mode: -inf keeps the seeded sparsity).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn.integrations as li  # noqa: E402

SHARP = 12.0


def test_never_skip_threshold_is_the_stock_model_bit_for_bit(tiny, loops, tiles):
    model = tiny.wan(sharpen=SHARP)  # float32: liteattn's own dense walk differs from stock by rounding
    stock, _ = loops.wan(model, seed=5, steps=3)
    handle = li.apply(model, threshold=-math.inf, block_size=tiles)
    out, _ = loops.wan(model, seed=5, steps=3)
    assert torch.equal(out, stock)
    calls = handle.summary().calls
    assert calls and all(c.mode == "dense_step" for c in calls) and not handle.summary().fallbacks
    handle.remove()
    # The same model through liteattn with a finite threshold that marks nothing is close but not the same
    # bits: what the routing buys.
    handle = li.apply(model, threshold=-1e30, block_size=tiles)
    through, _ = loops.wan(model, seed=5, steps=3)
    assert all(c.mode == "sparse" for c in handle.summary().calls)
    torch.testing.assert_close(through, stock, rtol=0, atol=1e-5)
    assert not torch.equal(through, stock)


def test_never_skip_schedule_is_stock_and_a_skipping_schedule_is_not(tiny, loops, tiles):
    """A schedule of -inf at every step is stock too; one that marks at some step runs its -inf steps through
    liteattn (a step's route depends on the configuration and the step alone), and dense_steps gives stock
    steps first."""
    model = tiny.wan(sharpen=SHARP)
    stock, _ = loops.wan(model, seed=6, steps=4)
    for threshold, dense_steps, modes in (
            ([-math.inf, -math.inf], 0, ["dense_step"] * 4),
            ([-math.inf, -3.0, -math.inf], 0, ["sparse"] * 4),
            ([-math.inf, -3.0, -math.inf], 1, ["dense_step", "sparse", "sparse", "sparse"])):
        handle = li.apply(model, threshold=threshold, dense_steps=dense_steps, block_size=tiles)
        out, _ = loops.wan(model, seed=6, steps=4)
        by_step = {}
        for call in handle.summary().calls:
            by_step.setdefault(call.step, set()).add(call.mode)
        assert [by_step[step] for step in range(4)] == [{mode} for mode in modes], threshold
        if modes[-1] == "dense_step":
            assert torch.equal(out, stock)
        else:
            assert handle.summary().per_step()[3]["sparsity"] > 0.0
        handle.remove()
