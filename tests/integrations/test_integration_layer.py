"""The per-layer runtime without diffusers: masks it can honour, fallbacks, must-do ranges, generations."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from liteattn import lite_attention
from liteattn.integrations import LiteAttentionConfig
from liteattn.integrations.layer import ForwardInfo, KeyPaddingMasks, LayerRuntime, key_prefix_length, merge_ranges

S, H, D = 48, 2, 16


def _prefix_mask(lengths, seq=S) -> torch.Tensor:
    return torch.arange(seq)[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("make", [
    lambda m: m,  # bool (B, S_k)
    lambda m: m[:, None, None, :],  # bool (B, 1, 1, S_k), HunyuanVideo's
    lambda m: m[:, None, None, :].expand(-1, H, S, -1),  # bool, every head and query row
    lambda m: torch.where(m, 0.0, -math.inf)[:, None, None, :],  # additive, -inf
    lambda m: (1.0 - m.float()) * -10000.0,  # additive, LTX's -10000 bias
])
def test_key_prefix_length_reads_padding_masks(make):
    assert key_prefix_length(make(_prefix_mask([37, 37])), S) == 37
    assert key_prefix_length(make(_prefix_mask([S])), S) == S


@pytest.mark.parametrize("mask", [
    _prefix_mask([37, 30]),  # different lengths per batch element
    ~_prefix_mask([37]),  # hides the head, not the tail
    _prefix_mask([0]),  # hides everything
    torch.where(_prefix_mask([37]), 0.0, -0.5),  # a soft bias, not a mask
    torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None],  # causal: depends on the query row
    _prefix_mask([37], seq=S + 1),  # wrong key length
    _prefix_mask([37]).int(),  # integer masks mean nothing to SDPA
])
def test_key_prefix_length_refuses_other_masks(mask):
    assert key_prefix_length(mask, S) is None


def test_mask_is_read_once_per_tensor():
    masks = KeyPaddingMasks()
    mask = _prefix_mask([20])
    assert masks.key_length(mask, S) == 20
    mask[0, 30] = True  # same object: the cached answer stands until clear()
    assert masks.key_length(mask, S) == 20
    masks.clear()
    assert masks.key_length(mask, S) is None
    assert masks.key_length(None, S) == S


def test_merge_ranges():
    assert merge_ranges([(10, 20), (0, 4), (15, 30), (30, 31), (40, 41)]) == [(0, 4), (10, 31), (40, 41)]
    assert merge_ranges([]) == []


class _DenseSpy:
    """Stands in for the module's original backend: plain SDPA, remembering each call's arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, **kwargs):
        self.calls.append(kwargs)
        mask = kwargs["attn_mask"]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_mask=mask if mask is None or mask.dim() == 4 else mask[:, None, None, :])
        return out.transpose(1, 2)


def _runtime(**config):
    dense = _DenseSpy()
    config.setdefault("block_size", (16, 16))
    runtime = LayerRuntime("blocks.0.attn1", LiteAttentionConfig(**config), "end", dense, KeyPaddingMasks(),
                           Counter())
    return runtime, dense


def _qkv(gen, seq_q=S, seq_k=S, batch=1):
    return (torch.randn(batch, seq_q, H, D, generator=gen), torch.randn(batch, seq_k, H, D, generator=gen),
            torch.randn(batch, seq_k, H, D, generator=gen))


@pytest.mark.parametrize("reason,call", [
    ("context_parallel", dict(parallel_config=object())),
    ("dropout", dict(dropout_p=0.1)),
    ("causal", dict(is_causal=True)),
    ("mask", dict(attn_mask=~_prefix_mask([37]))),
])
def test_calls_liteattn_cannot_compute_run_dense(gen, reason, call):
    runtime, dense = _runtime()
    q, k, v = _qkv(gen)
    runtime.enter(ForwardInfo("cond", 0, 0), None)
    with pytest.warns(UserWarning, match=reason):
        runtime.attend(q, k, v, **call)
    assert runtime.fallbacks == {reason: 1}
    assert len(dense.calls) == 1 and all(dense.calls[0][name] is value for name, value in call.items())
    assert runtime.contexts["cond"].records[0].mode == "fallback"


@pytest.mark.parametrize("dtype,head_dim,qk_dtype,reason", [
    (torch.float32, 16, None, "dtype"), (torch.bfloat16, 12, None, "head_dim"),
    (torch.bfloat16, 16, "int8", "head_dim for 8-bit QK"),  # the int8 products run 32 channels deep
])
def test_inputs_the_kernel_does_not_take_run_dense(gen, kernel_device, dtype, head_dim, qk_dtype, reason):
    runtime, dense = _runtime(backend="triton", qk_dtype=qk_dtype)
    q, k, v = (torch.randn(1, S, H, head_dim, generator=gen).to(kernel_device, dtype) for _ in range(3))
    runtime.enter(ForwardInfo("cond", 0, 0), None)
    with pytest.warns(UserWarning, match=reason):
        runtime.attend(q, k, v)
    assert runtime.fallbacks == {reason: 1} and len(dense.calls) == 1


def test_cross_attention_and_repeated_calls_run_dense(gen):
    runtime, dense = _runtime()
    runtime.enter(ForwardInfo("cond", 0, 0), None)
    with pytest.warns(UserWarning):
        runtime.attend(*_qkv(gen, seq_k=16))
    runtime.enter(ForwardInfo("cond", 1, 0), None)
    runtime.attend(*_qkv(gen))
    with pytest.warns(UserWarning):
        runtime.attend(*_qkv(gen))  # a second dispatch in one module forward would reuse the state
    runtime.exit()
    with pytest.warns(UserWarning):
        runtime.attend(*_qkv(gen))  # outside any transformer forward
    assert runtime.fallbacks == {"cross_attention": 1, "repeated_call": 1, "outside_forward": 1}
    assert [r.mode for r in runtime.contexts["cond"].records] == ["fallback", "sparse", "fallback"]


def test_padding_mask_and_text_tokens_become_key_length_and_must_do(gen):
    """Joint attention [video 32, text 16 of which 5 padding]: the call equals lite_attention on the first 43 keys."""
    runtime, dense = _runtime(threshold=-1.0, must_do=[(0, 4), (100, 200)])
    q, k, v = _qkv(gen)
    mask = _prefix_mask([43])[:, None, None, :]
    runtime.enter(ForwardInfo("cond", 0, 0), text_len=16)
    out = runtime.attend(q, k, v, attn_mask=mask)
    expected, _ = lite_attention(q, k[:, :43], v[:, :43], threshold=-1.0, block_size=(16, 16),
                                 must_do=[(0, 4), (32, 43)])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not dense.calls and not runtime.fallbacks


def test_new_generation_resets_and_seeded_state_is_adopted(gen):
    runtime, _ = _runtime(threshold=-0.5)
    q, k, v = _qkv(gen)
    for step in range(3):
        runtime.enter(ForwardInfo("cond", step, generation=7), None)
        runtime.attend(q, k, v)
    state = runtime.contexts["cond"]
    assert state.attention.step == 3 and len(state.records) == 3
    runtime.enter(ForwardInfo("cond", 0, generation=8), None)
    runtime.attend(q, k, v)
    assert state.attention.step == 1 and [r.step for r in state.records] == [0]

    seeded = runtime.state("uncond")  # prepared before any call: generation unknown
    seeded.attention.state = "sentinel"
    assert runtime.state("uncond", generation=9).attention.state == "sentinel"
    assert runtime.state("uncond", generation=9).generation == 9
