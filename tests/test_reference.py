"""The PyTorch reference against attention written from its definition.

The reference is the specification the kernel is tested against, so it is
itself checked against independent code: naive float64 softmax attention for
the outputs, and a per-tile Python loop for which tiles get marked.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from liteattn import SkipState, lite_attention
from liteattn.reference import lite_attention_reference
from liteattn.state import num_tiles

NO_SKIP = float("-inf")


def _qkv(gen, batch, heads, kv_heads, seq_q, seq_k, dim, dtype=torch.float64):
    q = torch.randn(batch, heads, seq_q, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq_k, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq_k, dim, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q, k, v))


@pytest.mark.parametrize("seq_len", [1, 17, 100, 131])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_dense_when_nothing_skipped(seq_len, heads, kv_heads, scale, gen, dense_attention):
    q, k, v = _qkv(gen, 2, heads, kv_heads, seq_len, seq_len, 32)
    state = SkipState.full(2, heads, seq_len, seq_len, 16, 32)
    out, lse, (counts, indices) = lite_attention_reference(
        q, k, v, state, NO_SKIP, scale, compute_dtype=torch.float64)
    want_out, want_lse, _ = dense_attention(q, k, v, scale)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)  # lse is returned as float32
    assert lse.dtype == torch.float32 and lse.shape == (2, heads, seq_len)
    # -inf marks nothing: the next lists are the input lists.
    assert torch.equal(counts, state.kv_num_blocks) and torch.equal(indices, state.kv_indices)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("seq_q,seq_k", [(17, 17), (100, 131), (131, 5)])
def test_public_api_torch_backend_is_dense_attention(layout, seq_q, seq_k, gen, dense_attention):
    q, k, v = _qkv(gen, 1, 4, 2, seq_q, seq_k, 16, dtype=torch.float32)
    args = (q, k, v) if layout == "bhsd" else tuple(x.transpose(1, 2) for x in (q, k, v))
    out, lse, state = lite_attention(*args, threshold=NO_SKIP, scale=0.7, layout=layout, return_lse=True,
                                     block_size=(16, 16), backend="torch")
    if layout == "bshd":
        assert out.shape == args[0].shape
        out = out.transpose(1, 2)
    want_out, want_lse, _ = dense_attention(q, k, v, 0.7)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32
    assert state.sparsity() == 0.0


def test_float16_inputs_computed_in_float32(gen, dense_attention):
    q, k, v = _qkv(gen, 1, 2, 2, 40, 40, 32, dtype=torch.float16)
    state = SkipState.full(1, 2, 40, 40, 16, 16)
    out, lse, _ = lite_attention_reference(q, k, v, state, NO_SKIP)
    want_out, want_lse, _ = dense_attention(q, k, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(
    seq_q=st.integers(1, 70), seq_k=st.integers(1, 70), block_m=st.sampled_from([16, 32]),
    block_n=st.sampled_from([16, 32]), group=st.sampled_from([1, 2]), density=st.floats(0.0, 1.0),
    shuffle=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_block_sparse_equals_masked_dense(seq_q, seq_k, block_m, block_n, group, density, shuffle, seed,
                                          dense_attention, random_tile_mask, shuffled_state, active_lists,
                                          visiting_lists):
    """Inactive tiles contribute nothing; the visiting order does not change the result."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(gen, 2, 2, 2 // group, seq_q, seq_k, 16)
    mask = random_tile_mask(2, 2, seq_q, seq_k, block_m, block_n, density=density, generator=gen)
    state = SkipState.from_dense(mask, seq_q, seq_k, block_m, block_n)
    if shuffle:
        state = shuffled_state(state, generator=gen)
    out, lse, (counts, indices) = lite_attention_reference(
        q, k, v, state, NO_SKIP, compute_dtype=torch.float64)
    want_out, want_lse, _ = dense_attention(q, k, v, tile_mask=mask, block=(block_m, block_n))
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)
    # Nothing marked: the next lists are the lists as visited.
    nxt = SkipState(counts, indices, seq_q, seq_k, block_m, block_n)
    assert active_lists(nxt) == visiting_lists(state)


def _naive_marks(q, k, state, threshold, scale, must_do, visiting_lists):
    """Next active lists and per-position scores by walking every list in Python, float64.

    Written from the rule: a visited tile is marked when, for every valid query
    row, ``(max_c s_rc - m_r) * log2(e) < threshold`` with ``m_r`` the running
    max of the tiles visited before; never the first visited tile, never a
    tile whose query or key tokens touch a must-do range.
    """
    order = iter(visiting_lists(state))
    bm, bn = state.block_m, state.block_n
    seq_q, seq_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    touches = lambda lo, hi: any(s < hi and lo < e for s, e in must_do)  # noqa: E731
    lists, scores = [], []
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(num_tiles(seq_q, bm)):
                qi = q[b, h, i * bm:(i + 1) * bm].double()
                running = torch.full((qi.shape[0],), -math.inf, dtype=torch.float64)
                kept, tile_scores = [], []
                for t, j in enumerate(next(order)):
                    kj = k[b, h // group, j * bn:(j + 1) * bn].double()
                    s = (qi @ kj.T) * scale
                    tile_max = s.max(dim=1).values
                    score = float(((tile_max - running) / math.log(2.0)).max())
                    tile_scores.append(score)
                    protected = touches(i * bm, min((i + 1) * bm, seq_q)) or touches(j * bn, min((j + 1) * bn, seq_k))
                    if t == 0 or protected or not score < threshold:
                        kept.append(j)
                    running = torch.maximum(running, tile_max)
                lists.append(kept)
                scores.append(tile_scores)
    return lists, scores


@settings(max_examples=12, deadline=None)
@given(
    seq_len=st.integers(20, 90), threshold=st.floats(-8.0, -1.0), use_must_do=st.booleans(),
    shuffle=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_marks_follow_the_rule(seq_len, threshold, use_must_do, shuffle, seed, local_qkv, shuffled_state,
                               random_tile_mask, active_lists, visiting_lists):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = local_qkv(1, seq_len, 2, 1, 16, dtype=torch.float64, generator=gen)
    mask = random_tile_mask(1, 2, seq_len, seq_len, 16, 16, density=0.8, generator=gen)
    state = SkipState.from_dense(mask, seq_len, seq_len, 16, 16)
    if shuffle:
        state = shuffled_state(state, generator=gen)
    must_do = [(3, 9), (seq_len - 5, seq_len)] if use_must_do else []
    scale = 16 ** -0.5
    _, _, (counts, indices), scores = lite_attention_reference(
        q, k, v, state, threshold, scale, must_do, compute_dtype=torch.float64, return_scores=True)
    want_lists, want_scores = _naive_marks(q, k, state, threshold, scale, must_do, visiting_lists)
    got = SkipState(counts, indices, seq_len, seq_len, 16, 16)
    assert active_lists(got) == want_lists
    flat_scores = scores.flatten(0, 2)
    for row, want in zip(flat_scores, want_scores):
        torch.testing.assert_close(row[: len(want)], torch.tensor(want, dtype=torch.float64))
        assert torch.isnan(row[len(want):]).all()


def test_full_rows_are_visited_in_ascending_order(gen, local_qkv, shuffled_state, active_lists):
    """A full list is walked in ascending order whatever order it stores; a partial one as stored."""
    q, k, v = local_qkv(1, 80, 2, 2, 32, dtype=torch.float64, generator=gen)
    ascending = SkipState.full(1, 2, 80, 80, 16, 16)
    shuffled = shuffled_state(ascending, generator=gen)
    assert not torch.equal(shuffled.kv_indices, ascending.kv_indices)
    out_a, _, (counts_a, indices_a) = lite_attention_reference(q, k, v, ascending, -4.0, compute_dtype=torch.float64)
    out_s, _, (counts_s, indices_s) = lite_attention_reference(q, k, v, shuffled, -4.0, compute_dtype=torch.float64)
    assert torch.equal(out_a, out_s) and torch.equal(counts_a, counts_s)
    assert active_lists(SkipState(counts_s, indices_s, 80, 80, 16, 16)) == \
        active_lists(SkipState(counts_a, indices_a, 80, 80, 16, 16))
    assert (counts_a < 5).any()  # marks happened, so the walk order mattered
    # A partial list (one tile dropped) is walked as stored: reversing it changes the marks.
    mask = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    mask[..., 2] = False
    forward = SkipState.from_dense(mask, 80, 80, 16, 16)
    backward = SkipState(forward.kv_num_blocks, forward.kv_indices.flip(-1).roll(-1, -1).contiguous(), 80, 80, 16, 16)
    assert backward.kv_indices[0, 0, 0, :4].tolist() == [4, 3, 1, 0]
    _, _, (counts_f, _) = lite_attention_reference(q, k, v, forward, -4.0, compute_dtype=torch.float64)
    _, _, (counts_b, _) = lite_attention_reference(q, k, v, backward, -4.0, compute_dtype=torch.float64)
    assert not torch.equal(counts_f, counts_b)


def test_marked_tile_is_still_used_in_the_marking_call(local_qkv, dense_attention, gen):
    """Marking affects only the next call: this call's output is full attention."""
    q, k, v = local_qkv(1, 96, 2, 2, 32, dtype=torch.float64, generator=gen)
    state = SkipState.full(1, 2, 96, 96, 16, 16)
    out, _, (counts, _) = lite_attention_reference(q, k, v, state, -3.0, compute_dtype=torch.float64)
    assert counts.sum() < state.kv_num_blocks.sum(), "inputs should make the reference mark tiles"
    torch.testing.assert_close(out, dense_attention(q, k, v)[0], rtol=1e-10, atol=1e-10)


def test_write_state_false_returns_input_lists(local_qkv, gen):
    q, k, v = local_qkv(1, 64, 2, 2, 32, generator=gen)
    state = SkipState.full(1, 2, 64, 64, 16, 16)
    _, _, (counts, indices) = lite_attention_reference(q, k, v, state, -3.0, write_state=False)
    assert torch.equal(counts, state.kv_num_blocks) and torch.equal(indices, state.kv_indices)
    assert counts.data_ptr() != state.kv_num_blocks.data_ptr()  # a copy, not the state's buffer
