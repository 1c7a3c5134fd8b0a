"""liteattn.integrations on a tiny Wan transformer driven like WanPipeline.

What must hold: with nothing skippable the output is the stock output;
skipping happens and starts fresh every generation (however the generation
boundary is signalled); "cond" and "uncond" keep separate states;
cross-attention never reaches liteattn; ``remove`` gives back the exact
original model; applying twice is refused.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn.integrations as li  # noqa: E402
from liteattn.integrations.diffusers import LAYER_HOOK, PATCH_ATTR, ROOT_HOOK  # noqa: E402
from liteattn.integrations.layer import LayerRuntime  # noqa: E402

NO_SKIP = -1e30  # marks nothing, through liteattn (-inf runs the model's own attention: test_never_skip.py)
SHARP = 12.0  # query-norm gain that makes the tiny model's attention peaky enough to skip
THRESHOLD = -3.0


def _hook_names(model) -> set[str]:
    return {name for m in model.modules() if hasattr(m, "_diffusers_hook") for name in m._diffusers_hook.hooks}


def test_no_skip_threshold_matches_stock_output(tiny, loops, tiles):
    model = tiny.wan(dtype=torch.float64)
    stock, _ = loops.wan(model, seed=1)
    handle = li.apply(model, threshold=NO_SKIP, block_size=tiles)
    out, _ = loops.wan(model, seed=1)
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-12)
    summary = handle.summary()
    assert len(summary.calls) == 3 * 2 * 2  # steps x contexts x self-attention layers
    assert summary.sparsity == 0.0 and not summary.fallbacks


def test_through_the_triton_kernel(tiny, loops, tiles, kernel_device):
    """The kernel path (GPU, or Triton's CPU interpreter in fp16) skips what the PyTorch path skips."""
    model = tiny.wan(dtype=torch.float16, head_dim=16, sharpen=30.0).to(kernel_device)
    run = dict(seed=11, steps=3, guidance=False, latent=(1, 16, 3, 8, 16))  # 96 tokens: quick to interpret
    results = {}
    for backend in ("torch", "triton"):
        handle = li.apply(model, threshold=-2.0, block_size=tiles, backend=backend)
        out, _ = loops.wan(model, **run)
        results[backend] = out, handle.summary()
        handle.remove()
    (ref, ref_summary), (out, summary) = results["torch"], results["triton"]
    assert not summary.fallbacks
    assert summary.per_step() == ref_summary.per_step() and summary.per_step()[2]["sparsity"] > 0.0
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_skips_and_every_generation_starts_fresh(tiny, loops, tiles):
    model = tiny.wan(sharpen=SHARP)
    stock, _ = loops.wan(model, seed=2, steps=4)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    first, _ = loops.wan(model, seed=2, steps=4)
    per_step = handle.summary().per_step()
    second, _ = loops.wan(model, seed=2, steps=4)
    again = handle.summary().per_step()

    assert per_step[0]["sparsity"] == 0.0  # nothing is known before the first step
    assert per_step[3]["sparsity"] > 0.0
    assert not torch.equal(first, stock)  # skipped tiles changed the result a little
    assert again[0]["sparsity"] == 0.0  # the second generation started with a fresh state
    assert again == per_step
    assert torch.equal(second, first)


@pytest.mark.parametrize("signal", ["step_index", "timestep_up", "hook_reset", "new_generation"])
def test_new_generation_detection(tiny, loops, tiles, signal):
    """Each way a generation boundary shows must reset the skip states."""
    model = tiny.wan(sharpen=SHARP)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    # Repeated timesteps hide the boundary unless the signal under test shows it.
    flat = torch.full((3,), 500.0)
    kwargs = {
        "step_index": dict(step_index=True, finish=False, timesteps=flat),
        "timestep_up": dict(step_index=False, finish=False),
        "hook_reset": dict(step_index=False, finish=True, timesteps=flat),
        "new_generation": dict(step_index=False, finish=False, timesteps=flat),
    }[signal]
    first, _ = loops.wan(model, seed=3, guidance=False, **kwargs)
    assert handle.summary().per_step()[2]["sparsity"] > 0.0
    if signal == "new_generation":
        li.new_generation(model)
    second, _ = loops.wan(model, seed=3, guidance=False, **kwargs)
    assert handle.summary().per_step()[0]["sparsity"] == 0.0
    assert torch.equal(second, first)


def test_without_a_boundary_the_state_carries_on(tiny, loops, tiles):
    """The counterpart of the detection test: repeated timesteps, no reset, so step numbers keep counting."""
    model = tiny.wan(sharpen=SHARP)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    flat = torch.full((3,), 500.0)
    loops.wan(model, seed=3, guidance=False, step_index=False, finish=False, timesteps=flat)
    loops.wan(model, seed=3, guidance=False, step_index=False, finish=False, timesteps=flat)
    steps = sorted(handle.summary().per_step())
    assert steps == list(range(6))


def test_cond_and_uncond_keep_separate_states(tiny, loops, tiles):
    model = tiny.wan(sharpen=SHARP)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    _, with_cfg = loops.wan(model, seed=4, steps=4, update=False)
    layer = handle.layers[-1]  # the first block's self-attention runs before any text enters
    cond, uncond = handle.attention(layer, "cond"), handle.attention(layer, "uncond")
    assert cond.step == uncond.step == 4  # one call per step each: the contexts do not share a counter
    assert cond.state is not uncond.state
    assert not torch.equal(cond.state.to_dense(), uncond.state.to_dense())
    assert handle.summary().sparsity > 0.0

    # The cond outputs are the same with or without uncond calls in between.
    _, cond_only = loops.wan(model, seed=4, steps=4, update=False, guidance=False)
    for a, b in zip(with_cfg, cond_only):
        assert torch.equal(a, b)


def test_cross_attention_is_never_routed(tiny, loops, tiles, monkeypatch):
    model = tiny.wan()
    seen = []
    original = LayerRuntime.attend

    def spy(self, query, key, *args, **kwargs):
        seen.append((self.name, query.shape[1], key.shape[1]))
        return original(self, query, key, *args, **kwargs)

    monkeypatch.setattr(LayerRuntime, "attend", spy)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    loops.wan(model, seed=5, steps=2)
    assert handle.layers == ["blocks.0.attn1", "blocks.1.attn1"]
    assert {name for name, _, _ in seen} == {"blocks.0.attn1", "blocks.1.attn1"}
    assert len(seen) == 2 * 2 * 2
    assert all(q == k == 160 for _, q, k in seen)  # video tokens, never the 16 text tokens
    for block in model.blocks:
        assert "_attention_backend" not in vars(block.attn2.processor)
        assert block.attn2.processor._attention_backend is None


def test_remove_restores_the_exact_model(tiny, loops, tiles):
    model = tiny.wan(sharpen=SHARP)
    before, _ = loops.wan(model, seed=6)
    li.apply(model, threshold=THRESHOLD, block_size=tiles)
    patched, _ = loops.wan(model, seed=6)
    li.remove(model)
    after, _ = loops.wan(model, seed=6)

    assert not torch.equal(patched, before)
    assert torch.equal(after, before)
    assert not _hook_names(model) & {ROOT_HOOK, LAYER_HOOK}
    assert not hasattr(model, PATCH_ATTR)
    for block in model.blocks:
        assert "forward" not in vars(block.attn1)
        assert "_diffusers_hook" not in vars(block.attn1)
        assert "_attention_backend" not in vars(block.attn1.processor)
    with pytest.warns(UserWarning, match="not applied"):
        li.remove(model)


def test_remove_keeps_other_hooks(tiny, loops, tiles):
    """A cache hook registered after liteattn survives liteattn's removal."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    model = tiny.wan()
    li.apply(model, threshold=NO_SKIP, block_size=tiles)
    HookRegistry.check_if_exists_or_initialize(model.blocks[0].attn1).register_hook(Double(), "double")
    li.remove(model)
    assert model.blocks[0].attn1._diffusers_hook.hooks.keys() == {"double"}
    x = torch.randn(1, 160, 24)
    plain = model.blocks[0].attn1.processor(model.blocks[0].attn1, x)
    torch.testing.assert_close(model.blocks[0].attn1(x), 2 * plain)


def test_apply_twice_is_refused(tiny, tiles):
    model = tiny.wan()
    li.apply(model, threshold=THRESHOLD, block_size=tiles)
    with pytest.raises(ValueError, match="already applied"):
        li.apply(model)
    other = tiny.wan()
    with pytest.raises(ValueError, match="already applied"):
        li.apply(SimpleNamespace(transformer=other, transformer_2=model))
    assert not hasattr(other, PATCH_ATTR)  # nothing was half-applied


def test_pipeline_with_two_transformers(tiny, loops, tiles):
    """Wan 2.2 switches between transformer and transformer_2: both are patched, each with its own states."""
    high, low = tiny.wan(seed=0), tiny.wan(seed=1)
    pipe = SimpleNamespace(transformer=high, transformer_2=low)
    handle = li.apply(pipe, threshold=NO_SKIP, block_size=tiles)
    assert handle.layers == ["blocks.0.attn1", "blocks.1.attn1",
                             "transformer_2:blocks.0.attn1", "transformer_2:blocks.1.attn1"]
    loops.wan(high, steps=2)
    loops.wan(low, steps=2)
    layers = li.summary(pipe).per_layer()
    assert set(layers) == {"transformer:blocks.0.attn1", "transformer:blocks.1.attn1",
                           "transformer_2:blocks.0.attn1", "transformer_2:blocks.1.attn1"}
    assert all(row["calls"] == 4 for row in layers.values())
    li.remove(pipe)
    assert not hasattr(high, PATCH_ATTR) and not hasattr(low, PATCH_ATTR)


def test_dense_steps_run_the_stock_backend(tiny, loops, tiles):
    model = tiny.wan(dtype=torch.float64, sharpen=SHARP)
    _, stock = loops.wan(model, seed=7, steps=4, update=False)
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles, dense_steps=2)
    _, outputs = loops.wan(model, seed=7, steps=4, update=False)
    per_step = handle.summary().per_step()
    assert [per_step[s]["dense"] for s in range(4)] == [4, 4, 0, 0]
    assert torch.equal(outputs[0], stock[0]) and torch.equal(outputs[1], stock[1])
    assert per_step[2]["sparsity"] == 0.0  # skipping starts fresh after the dense steps
    assert per_step[3]["sparsity"] > 0.0


def test_threshold_schedule_follows_the_step(tiny, loops, tiles):
    model = tiny.wan(sharpen=SHARP)
    handle = li.apply(model, threshold=[NO_SKIP, NO_SKIP, THRESHOLD], block_size=tiles)
    loops.wan(model, seed=8, steps=4)
    per_step = handle.summary().per_step()
    # Marks made at step s are skipped from step s + 1: the first marks come at step 2.
    assert [per_step[s]["sparsity"] for s in range(3)] == [0.0, 0.0, 0.0]
    assert per_step[3]["sparsity"] > 0.0


def test_profile_times_attention_and_forwards(tiny, loops, tiles):
    model = tiny.wan()
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles, timing=True)
    loops.wan(model, steps=2)
    summary = handle.summary()
    assert all(c.attention_ms is not None and c.attention_ms > 0 for c in summary.calls)
    assert len(summary.forwards) == 4 and all(f.forward_ms > 0 for f in summary.forwards)
    assert summary.attention_ms < sum(f.forward_ms for f in summary.forwards)
    text = str(summary)
    assert "blocks.1.attn1" in text and "attention ms" in text

    handle.remove()
    handle = li.apply(model, threshold=THRESHOLD, block_size=tiles)
    loops.wan(model, steps=2)
    assert handle.summary().attention_ms is None


def test_seeded_state_is_used_by_the_next_generation(tiny, loops, tiles):
    """A state prepared through the handle survives the generation start (the benchmark's forced sparsity)."""
    from liteattn import SkipState

    model = tiny.wan()
    handle = li.apply(model, threshold=NO_SKIP, block_size=tiles)
    gen = torch.Generator().manual_seed(9)
    active = torch.rand(1, 2, 10, 10, generator=gen) < 0.5
    active[..., 0] = True
    for layer in handle.layers:
        handle.attention(layer, "cond").state = SkipState.from_dense(active, 160, 160, *tiles)
    loops.wan(model, steps=2, guidance=False)
    expected = 1.0 - active.float().mean().item()
    assert [c.sparsity for c in handle.summary().calls] == pytest.approx([expected] * 4)


def test_shared_processor_gets_a_private_copy(tiny, loops, tiles):
    """One processor shared by self- and cross-attention: only the self-attention copy is routed."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny.wan()
    shared = WanAttnProcessor()
    model.set_attn_processor(shared)
    stock, _ = loops.wan(model, seed=10, steps=2)
    li.apply(model, threshold=THRESHOLD, block_size=tiles)
    assert model.blocks[0].attn1.processor is not shared
    assert model.blocks[0].attn2.processor is shared and shared._attention_backend is None
    li.remove(model)
    assert all(block.attn1.processor is shared for block in model.blocks)
    after, _ = loops.wan(model, seed=10, steps=2)
    assert torch.equal(after, stock)


def test_bad_arguments(tiny):
    model = tiny.wan()
    with pytest.raises(ValueError, match="not a LiteAttentionConfig field"):
        li.apply(model, treshold=-5.0)
    with pytest.raises(ValueError, match="config"):
        li.apply(model, config={"threshold": -5.0})
    with pytest.raises(ValueError, match="pipe_or_transformer"):
        li.apply(object())
    with pytest.raises(ValueError, match="include"):
        li.apply(model, include=(r"no_such_layer",))
    with pytest.raises(ValueError, match="not applied"):
        li.summary(model)
    assert not hasattr(model, PATCH_ATTR) and not _hook_names(model)  # failed calls changed nothing
