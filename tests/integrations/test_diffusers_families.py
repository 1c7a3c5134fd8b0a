"""liteattn.integrations beyond Wan: LTX-Video (batched CFG), HunyuanVideo (joint
attention with text padding), other transformers through ``include=``, and the
refusals (CogVideoX calls SDPA directly).
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

import liteattn.integrations as li  # noqa: E402
from liteattn.state import num_tiles  # noqa: E402

NO_SKIP = -1e30  # marks nothing, through liteattn (-inf runs the model's own attention: test_never_skip.py)

HUNYUAN_VIDEO_TOKENS = 3 * 4 * 8
HUNYUAN_LAYERS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


# ---------------------------------------------------------------------------- LTX-Video
def test_ltx_no_skip_matches_stock_with_batched_cfg(tiny, loops, tiles):
    model = tiny.ltx(dtype=torch.float64)
    stock = loops.ltx(model, seed=1)
    handle = li.apply(model, threshold=NO_SKIP, block_size=tiles)
    assert handle.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    out = loops.ltx(model, seed=1)
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-12)
    assert {c.context for c in handle.summary().calls} == {"cond_uncond"}


def test_ltx_skips_per_batch_element(tiny, loops, tiles):
    model = tiny.ltx(sharpen=12.0)
    handle = li.apply(model, threshold=-3.0, block_size=tiles)
    first = loops.ltx(model, seed=2, steps=4)
    summary = handle.summary()
    assert summary.per_step()[0]["sparsity"] == 0.0
    assert summary.per_step()[3]["sparsity"] > 0.0
    state = handle.attention("transformer_blocks.1.attn1", "cond_uncond").state
    assert state.shape[:2] == (2, 2)  # [uncond, cond] x heads: one skip set per batch element
    assert not torch.equal(state.to_dense()[0], state.to_dense()[1])
    assert torch.equal(loops.ltx(model, seed=2, steps=4), first)


# ---------------------------------------------------------------------------- HunyuanVideo
def test_hunyuan_honours_the_text_padding_mask(tiny, loops, tiles):
    """A key-padding mask is honoured by attending over the unpadded keys only: stock output, no fallback."""
    model = tiny.hunyuan(dtype=torch.float64)
    stock = loops.hunyuan(model, seed=3, text_lengths=(11,))
    handle = li.apply(model, threshold=NO_SKIP, block_size=tiles)
    assert handle.layers == HUNYUAN_LAYERS  # the token refiner's text-only attention is left alone
    out = loops.hunyuan(model, seed=3, text_lengths=(11,))
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-12)
    summary = handle.summary()
    assert not summary.fallbacks and all(c.mode == "sparse" for c in summary.calls)
    assert {c.context for c in summary.calls} == {"cond", "uncond"}


def test_hunyuan_mask_it_cannot_honour_runs_dense_and_is_counted(tiny, loops, tiles):
    """Different prompt lengths in one batch: no common key prefix, so those calls run dense, never maskless."""
    model = tiny.hunyuan()
    stock = loops.hunyuan(model, seed=4, text_lengths=(11, 7))
    handle = li.apply(model, threshold=-3.0, block_size=tiles)
    with pytest.warns(UserWarning, match=r"ran dense \(mask\)"):
        out = loops.hunyuan(model, seed=4, text_lengths=(11, 7))
    assert torch.equal(out, stock)
    summary = handle.summary()
    assert summary.fallbacks == {"mask": 2 * 2 * 2}  # steps x contexts x layers
    assert all(c.mode == "fallback" and c.sparsity == 0.0 for c in summary.calls)
    assert "mask=8" in str(summary)


@pytest.mark.parametrize("text_tokens", ["must_do", "skippable"])
def test_hunyuan_text_tokens_are_must_do(tiny, loops, tiles, text_tokens):
    text_len, bm, bn = 11, *tiles
    model = tiny.hunyuan(sharpen=20.0)
    handle = li.apply(model, threshold=-2.0, block_size=tiles, text_tokens=text_tokens)
    loops.hunyuan(model, seed=5, steps=4, text_lengths=(text_len,))
    text_keys = slice(HUNYUAN_VIDEO_TOKENS // bn, num_tiles(HUNYUAN_VIDEO_TOKENS + text_len, bn))
    text_queries = slice(HUNYUAN_VIDEO_TOKENS // bm, None)
    skipped_text, skipped_video = [], []
    for layer in HUNYUAN_LAYERS:
        for context in ("cond", "uncond"):
            dense = handle.attention(layer, context).state.to_dense()  # (B, H, QT, KT), True = computed
            assert dense.shape[-1] == num_tiles(HUNYUAN_VIDEO_TOKENS + text_len, bn)  # padded keys dropped
            skipped_text.append(not dense[..., text_keys].all() or not dense[:, :, text_queries].all())
            skipped_video.append(not dense[:, :, : text_queries.start, : text_keys.start].all())
    assert any(skipped_video)
    assert any(skipped_text) == (text_tokens == "skippable")


# ---------------------------------------------------------------------------- other models
class _TwoAttentions(nn.Module):
    """A model liteattn has no family for: one self- and one cross-attention."""

    def __init__(self):
        super().__init__()
        from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

        self.mix = WanAttention(dim=24, heads=2, dim_head=12, processor=WanAttnProcessor())
        self.read = WanAttention(dim=24, heads=2, dim_head=12, cross_attention_dim_head=12,
                                  processor=WanAttnProcessor())

    def forward(self, x, text, timestep):
        return self.read(self.mix(x), text)


def test_unknown_model_needs_include(tiles, gen):
    model = _TwoAttentions().eval()
    with pytest.raises(NotImplementedError, match="include="):
        li.apply(model)
    x, text = torch.randn(1, 64, 24, generator=gen), torch.randn(1, 8, 24, generator=gen)
    with torch.no_grad():
        stock = model(x, text, 1.0)
        handle = li.apply(model, threshold=NO_SKIP, block_size=tiles, include=(r"^(mix|read)$",))
        assert handle.layers == ["mix"]  # "read" is cross-attention: never patched
        out = model(x, text, 1.0)
    torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-6)
    assert [(c.context, c.step) for c in handle.summary().calls] == [("default", 0)]


def test_excluding_every_layer_blames_exclude(tiny, tiles):
    """exclude=['.*'] left nothing to patch and the error named include, which was right."""
    model = tiny.wan()
    with pytest.raises(ValueError, match=r"exclude: \('\.\*',\) leaves no self-attention layer of "
                                         r"WanTransformer3DModel to patch \(it excludes all 2"):
        li.apply(model, exclude=[".*"], block_size=tiles)
    with pytest.raises(ValueError, match=r"^include: no self-attention layer"):  # include matching nothing
        li.apply(model, include=[r"^nothing$"], block_size=tiles)
    assert not hasattr(model, "_liteattn_patch")


def test_processor_shared_by_patched_layers_is_restored(tiles, gen):
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    shared = WanAttnProcessor()
    model = nn.Sequential(WanAttention(dim=24, heads=2, dim_head=12, processor=shared),
                          WanAttention(dim=24, heads=2, dim_head=12, processor=shared)).eval()
    x = torch.randn(1, 64, 24, generator=gen)
    with torch.no_grad():
        stock = model(x)
        handle = li.apply(model, threshold=NO_SKIP, block_size=tiles, include=(r"^\d$",))
        assert handle.layers == ["0", "1"] and model[0].processor is model[1].processor is shared
        torch.testing.assert_close(model(x), stock, rtol=1e-5, atol=1e-6)
        li.remove(model)
        assert "_attention_backend" not in vars(shared)
        assert torch.equal(model(x), stock)


def test_processor_that_bypasses_the_dispatcher_is_refused():
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )
    with pytest.raises(NotImplementedError, match="include="):
        li.apply(model)
    with pytest.raises(NotImplementedError, match="scaled_dot_product_attention directly"):
        li.apply(model, include=(r"attn1$",))
    assert not hasattr(model, "_liteattn_patch")
