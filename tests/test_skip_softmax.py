"""The per-call skip-softmax rule of the reference (``skip_softmax=True``): a tile found negligible in a call is left
out of that very call (its QK computed, its exponentials and P.V not), the same tiles are found as by liteattn's
rule, and nothing is carried: the output is dense attention over the tiles the call used."""
from __future__ import annotations

import torch

from liteattn import SkipState
from liteattn.reference import lite_attention_reference


def test_the_output_is_attention_over_the_tiles_used(local_qkv, dense_attention, active_lists, gen):
    q, k, v = local_qkv(1, 96, 2, 2, 32, dtype=torch.float64, generator=gen)
    full = SkipState.full(1, 2, 96, 96, 16, 16)
    out, lse, (used_counts, used_indices) = lite_attention_reference(
        q, k, v, full, -3.0, compute_dtype=torch.float64, skip_softmax=True)
    _, _, (carried_counts, carried_indices) = lite_attention_reference(q, k, v, full, -3.0,
                                                                        compute_dtype=torch.float64)
    used = SkipState(used_counts, used_indices, 96, 96, 16, 16)
    # the same tiles as liteattn's rule marks for the next call ...
    assert active_lists(used) == active_lists(SkipState(carried_counts, carried_indices, 96, 96, 16, 16))
    assert used_counts.sum() < full.kv_num_blocks.sum(), "inputs should make the rule find negligible tiles"
    # ... but left out of this call: the output is attention over the remaining tiles, not over all of them
    want, want_lse, _ = dense_attention(q, k, v, tile_mask=used.to_dense(), block=(16, 16))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, dense_attention(q, k, v)[0], rtol=1e-10, atol=1e-10)


def test_a_threshold_that_marks_nothing_is_dense_attention(local_qkv, dense_attention, gen):
    q, k, v = local_qkv(1, 80, 2, 1, 32, dtype=torch.float64, generator=gen)
    full = SkipState.full(1, 2, 80, 80, 16, 16)
    out, _, (counts, _) = lite_attention_reference(q, k, v, full, float("-inf"), compute_dtype=torch.float64,
                                                   skip_softmax=True)
    assert torch.equal(counts, full.kv_num_blocks)
    torch.testing.assert_close(out, dense_attention(q, k, v)[0], rtol=1e-10, atol=1e-10)
