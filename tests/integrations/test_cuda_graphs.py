"""``apply(..., cuda_graph=True)``: replayed forwards give what eager forwards give, and the skip states, histories
and call records read the same.

On the CPU a stand-in graph emulates a CUDA graph: its replay re-runs the captured forward on the static inputs and
keeps only what the GPU would have written (outputs, state buffers, the history values the graph computes), with
every Python side effect undone. On a CUDA device the same checks run with real graphs.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn.integrations as li  # noqa: E402
from liteattn.integrations.diffusers import PATCH_ATTR  # noqa: E402
from liteattn.integrations.graphs import ForwardGraphs  # noqa: E402

SHARP = 12.0
THRESHOLD = -3.0


class EmulatedGraph:
    """A CUDA graph's behaviour on the CPU (see the module docstring)."""

    def __init__(self, graphs: ForwardGraphs):
        self.graphs = graphs
        self.fn = self.output = self.log = None

    def capture(self, fn):
        self.fn = fn
        self.output = fn()
        self.log = None  # filled from the graphs' capture log below
        return self.output

    def replay(self):
        graphs = self.graphs
        saved = graphs._save()
        log = []
        for runtime in graphs.runtimes.values():
            runtime.log = log
        try:
            output = self.fn()
        finally:
            for runtime in graphs.runtimes.values():
                runtime.log = None
        captured = next(c for c in graphs._graphs.values() if getattr(c, "graph", None) is self)
        for old, new in zip(captured.calls, log):  # the history values a real replay rewrites in place
            if old.sparsity is not None:
                old.sparsity.copy_(new.sparsity)
        for old, new in zip(torch.utils._pytree.tree_leaves(self.output), torch.utils._pytree.tree_leaves(output)):
            if isinstance(old, torch.Tensor):
                old.copy_(new)
        graphs._restore(saved)


def _emulate(model):
    patch = getattr(model, PATCH_ATTR)
    holder = {}
    patch.graphs = ForwardGraphs(patch.layers, patch.config, patch.fallbacks,
                                 make_graph=lambda pool: EmulatedGraph(holder["graphs"]))
    holder["graphs"] = patch.graphs
    return patch.graphs


@pytest.mark.parametrize("dense_steps", [0, 2])
def test_replayed_forwards_match_eager_ones(tiny, loops, tiles, dense_steps):
    model = tiny.wan(sharpen=SHARP)
    eager = li.apply(model, threshold=THRESHOLD, block_size=tiles, dense_steps=dense_steps)
    expected = [loops.wan(model, seed=2, steps=7) for _ in range(3)]
    summary = eager.summary()
    eager.remove()

    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles, dense_steps=dense_steps, cuda_graph=True)
    graphs = _emulate(model)
    for generation, (want, want_cond) in enumerate(expected):
        got, got_cond = loops.wan(model, seed=2, steps=7)
        assert torch.equal(got, want), f"generation {generation}"
        assert all(torch.equal(a, b) for a, b in zip(got_cond, want_cond))
    assert graphs.replays > 0
    assert handle.summary().per_step() == summary.per_step()
    assert handle.summary().per_layer() == summary.per_layer()
    state = handle.attention("blocks.0.attn1", "cond").state
    assert state.calls == 7 - dense_steps
    handle.remove()


def test_a_state_moved_elsewhere_runs_eagerly(tiny, loops, tiles):
    """A state whose buffers are not the graph's (here: replaced between generations) is never replayed over."""
    model = tiny.wan(sharpen=SHARP)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles, cuda_graph=True)
    graphs = _emulate(model)
    loops.wan(model, seed=2, steps=6)
    loops.wan(model, seed=2, steps=6)
    before = graphs.replays
    assert before > 0
    for runtime in getattr(model, PATCH_ATTR).layers.values():
        for context in runtime.contexts.values():
            context.attention.reset()
            context.attention._spent = None  # the next generation allocates new buffers
    out, _ = loops.wan(model, seed=2, steps=6)
    handle.remove()
    eager = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    want, _ = loops.wan(model, seed=2, steps=6)
    eager.remove()
    assert torch.equal(out, want)


def test_off_by_default_and_checked():
    assert li.LiteAttentionConfig().cuda_graph is False
    with pytest.raises(ValueError, match="cuda_graph"):
        li.LiteAttentionConfig(cuda_graph="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graphs_match_eager(tiny, loops, tiles):
    model = tiny.wan(dtype=torch.float16, head_dim=64, sharpen=SHARP).cuda()
    run = dict(seed=3, steps=8, latent=(1, 16, 4, 32, 32))
    eager = li.apply(model, threshold=-4.0, dense_steps=2)
    expected = [loops.wan(model, **run)[0] for _ in range(3)]
    summary = eager.summary()
    eager.remove()
    handle = li.apply(model, threshold=-4.0, dense_steps=2, cuda_graph=True)
    got = [loops.wan(model, **run)[0] for _ in range(3)]
    patch = getattr(model, PATCH_ATTR)
    assert patch.graphs.replays > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert handle.summary().per_step() == summary.per_step()
    handle.remove()


def test_replays_with_a_calibration_profile_match_eager_ones(tiny, loops, tiles):
    """With a profile a graph's key is the step range: every layer's threshold is fixed by it, and replays redo
    each call with the threshold it was captured with."""
    from liteattn.profile import Profile, model_binding

    model = tiny.wan(sharpen=SHARP)
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    profile = Profile(models={"transformer": model_binding(model, layers)}, tiles=tiles, tokens=160,
                      token_rule="exact", steps=7, dense_steps=1, range_starts=(1, 3, 5),
                      thresholds={layers[0]: [-4.0, -2.0, "-inf"], layers[1]: [-1.5, -3.0, -2.5]})
    eager = li.apply(model, profile=profile, block_size=tiles)
    expected = [loops.wan(model, seed=2, steps=7) for _ in range(3)]
    summary = eager.summary()
    eager.remove()
    handle = li.apply(model, profile=profile, block_size=tiles, cuda_graph=True)
    graphs = _emulate(model)
    for generation, (want, _) in enumerate(expected):
        got, _ = loops.wan(model, seed=2, steps=7)
        assert torch.equal(got, want), f"generation {generation}"
    assert graphs.replays > 0
    assert {key[1][-1] for key in graphs._graphs if key[1][0] != "dense"} >= {("range", 0), ("range", 1), ("range", 2)}
    assert handle.summary().per_step() == summary.per_step()
    assert handle.attention(layers[1], "cond").threshold == -2.5  # the last call's, set again by the replay
    handle.remove()
