"""The Triton kernel against the PyTorch reference.

Without a GPU the kernel runs in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``), which is slow: shapes stay tiny and tiles are 16 or
32 wide so that ragged edges, several tiles per row and GQA still occur.

The ``check`` fixture (conftest.py) runs both and compares output, LSE and
the written state.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

from liteattn import SkipState, lite_attention
from liteattn.kernels import SUPPORTED_HEAD_DIMS
from liteattn.reference import lite_attention_reference

triton = pytest.importorskip("triton")

# The interpreter converts loop bounds with a NumPy call that NumPy deprecates; it is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

CASES = [
    # dtype, batch, heads, kv_heads, seq_q, seq_k, head_dim, block, layout, must_do, threshold
    pytest.param(torch.float16, 1, 2, 2, 75, 75, 32, (16, 16), "bshd", None, -4.0, id="fp16-ragged-bshd"),
    pytest.param(torch.bfloat16, 1, 4, 2, 112, 112, 64, (16, 32), "bhsd", None, -4.0, id="bf16-gqa-d64"),
    pytest.param(torch.float16, 2, 2, 1, 96, 96, 32, (16, 16), "bshd", [(0, 10), (50, 53)], -3.0,
                 id="fp16-mqa-mustdo"),
    pytest.param(torch.bfloat16, 1, 2, 1, 40, 100, 48, (16, 32), "bhsd", None, -3.5, id="bf16-cross-d48"),
    pytest.param(torch.float16, 1, 1, 1, 128, 128, 96, (32, 16), "bhsd", [(100, 128)], -4.0, id="fp16-d96"),
]


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,seq_q,seq_k,head_dim,block,layout,must_do,threshold", CASES)
def test_kernel_matches_reference_over_two_steps(dtype, batch, heads, kv_heads, seq_q, seq_k, head_dim, block,
                                                 layout, must_do, threshold, gen, local_qkv, check):
    assert head_dim in SUPPORTED_HEAD_DIMS
    q, k, v = local_qkv(batch, seq_q, heads, kv_heads, head_dim, seq_len_k=seq_k, generator=gen)
    state = SkipState.full(batch, heads, seq_q, seq_k, *block)
    q16, k16, v16 = (x.to(dtype) for x in (q, k, v))
    nxt, marked = check(q16, k16, v16, state, threshold=threshold, layout=layout, must_do=must_do)
    assert marked > 0, "inputs should make the reference mark tiles, or the state comparison is vacuous"
    # Second step: slightly drifted inputs, read through the sparse list the kernel wrote.
    q2, k2, v2 = (x + 0.05 * torch.randn(x.shape, generator=gen) for x in (q, k, v))
    check(*(x.to(dtype) for x in (q2, k2, v2)), nxt, threshold=threshold, layout=layout, must_do=must_do)


# No shrinking: in the interpreter it would take minutes; the failing example is printed as found.
@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seq_q=st.integers(1, 48), seq_k=st.integers(1, 48), group=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       threshold=st.floats(-6.0, -1.0), shuffle=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference_random_shapes(seq_q, seq_k, group, head_dim, dtype, threshold, shuffle, seed,
                                                random_tile_mask, shuffled_state, check):
    """Random shapes and random (possibly shuffled) sparse input lists."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, seq_q, head_dim, generator=gen) * 2
    k = torch.randn(1, 2 // group, seq_k, head_dim, generator=gen) * 2
    v = torch.randn(1, 2 // group, seq_k, head_dim, generator=gen)
    state = SkipState.from_dense(random_tile_mask(1, 2, seq_q, seq_k, 16, 16, density=0.7, generator=gen),
                                 seq_q, seq_k, 16, 16)
    if shuffle:
        state = shuffled_state(state, generator=gen)
    check(*(x.to(dtype) for x in (q, k, v)), state, threshold=threshold)


def test_shuffled_visiting_order(gen, local_qkv, random_tile_mask, shuffled_state, check):
    """Marks depend on the visiting order (running max); the kernel walks partial lists as given."""
    q, k, v = (x.half() for x in local_qkv(1, 80, 2, 2, 32, generator=gen))
    mask = random_tile_mask(1, 2, 80, 80, 16, 16, density=0.85, generator=gen)
    mask[..., 0, -1] = False  # at least one partial list
    state = shuffled_state(SkipState.from_dense(mask, 80, 80, 16, 16), generator=gen)
    _, marked = check(q, k, v, state, threshold=-4.0)
    assert marked > 0


def test_full_rows_are_visited_in_ascending_order(gen, local_qkv, shuffled_state, check, kernel_device):
    """A full list is walked in ascending order whatever order it stores."""
    q, k, v = (x.half() for x in local_qkv(1, 80, 2, 2, 32, generator=gen))
    shuffled = shuffled_state(SkipState.full(1, 2, 80, 80, 16, 16), generator=gen)
    nxt, marked = check(q, k, v, shuffled, threshold=-4.0)
    _, ascending_next = lite_attention(*(x.to(kernel_device) for x in (q, k, v)),
                                       SkipState.full(1, 2, 80, 80, 16, 16, device=kernel_device),
                                       threshold=-4.0, layout="bhsd", backend="triton")
    assert marked > 0 and torch.equal(nxt.to_dense(), ascending_next.to_dense().cpu())


def test_long_lists(gen, local_qkv, shuffled_state, check):
    """More than 128 key tiles per query tile, marks both before and after visit position 128.

    Survivors are compacted in place in chunks of positions; here survivors from
    the second chunk land in the first one's region. Query tile 0 keeps a full
    list (ascending walk), query tile 1 a shuffled partial one (walk by index).
    """
    mask = torch.ones(1, 1, 2, 132, dtype=torch.bool)
    mask[0, 0, 1, 17] = False
    for _ in range(20):  # ~3 % of draws mark nothing on one side of position 128 (a shuffled walk): redraw
        q, k, v = (x.half() for x in local_qkv(1, 32, 1, 1, 16, seq_len_k=2100, generator=gen))
        state = shuffled_state(SkipState.from_dense(mask, 32, 2100, 16, 16), generator=gen)
        *_, scores = lite_attention_reference(q.float(), k.float(), v.float(), state, -2.0, return_scores=True)
        if (scores[..., :128] < -2.0).any(-1).all() and (scores[..., 128:] < -2.0).any(-1).all():
            break
    else:
        pytest.fail("no draw marks tiles both before and after visit position 128")
    nxt, marked = check(q, k, v, state, threshold=-2.0)
    assert (nxt.kv_num_blocks < 128).all() and marked > 0


def test_disabled_is_dense_and_keeps_state(gen, local_qkv, random_tile_mask, dense_attention, kernel_device):
    q, k, v = (x.half() for x in local_qkv(1, 64, 2, 1, 32, generator=gen))
    state = SkipState.from_dense(random_tile_mask(1, 2, 64, 64, 16, 16, density=0.3, generator=gen),
                                 64, 64, 16, 16).to(kernel_device)
    before = state.clone()
    out, lse, nxt = lite_attention(*(x.to(kernel_device) for x in (q, k, v)), state, layout="bhsd",
                                   enabled=False, return_lse=True, backend="triton")
    assert nxt is state and nxt.calls == 0
    assert torch.equal(state.kv_num_blocks.cpu(), before.kv_num_blocks.cpu())
    assert torch.equal(state.kv_indices.cpu(), before.kv_indices.cpu())
    want_out, want_lse, _ = dense_attention(q, k, v)
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=0, atol=6e-3)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=0, atol=2e-3)


def test_minus_infinity_computes_the_list_and_writes_nothing(gen, random_tile_mask, dense_attention, kernel_device):
    q, k, v = (torch.randn(1, 2, 50, 32, generator=gen).half() for _ in range(3))
    mask = random_tile_mask(1, 2, 50, 50, 16, 16, density=0.5, generator=gen)
    state = SkipState.from_dense(mask, 50, 50, 16, 16).to(kernel_device)
    out, nxt = lite_attention(*(x.to(kernel_device) for x in (q, k, v)), state, threshold=float("-inf"),
                              layout="bhsd", backend="triton")
    assert nxt is state and state._spare is None  # no spare buffers were even allocated
    want, _, _ = dense_attention(q, k, v, tile_mask=mask, block=(16, 16))
    torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=6e-3)


def test_double_buffers_alternate(gen, local_qkv, kernel_device):
    q, k, v = (x.half().to(kernel_device) for x in local_qkv(1, 48, 1, 1, 16, generator=gen))
    s0 = SkipState.full(1, 1, 48, 48, 16, 16, device=kernel_device)
    first_pair = (s0.kv_num_blocks.data_ptr(), s0.kv_indices.data_ptr())
    _, s1 = lite_attention(q, k, v, s0, threshold=-3.0, layout="bhsd", backend="triton")
    _, s2 = lite_attention(q, k, v, s1, threshold=-3.0, layout="bhsd", backend="triton")
    _, s3 = lite_attention(q, k, v, s2, threshold=-3.0, layout="bhsd", backend="triton")
    assert (s1.calls, s2.calls, s3.calls) == (1, 2, 3)
    assert (s2.kv_num_blocks.data_ptr(), s2.kv_indices.data_ptr()) == first_pair  # s0's buffers reused
    assert s3.kv_num_blocks.data_ptr() == s1.kv_num_blocks.data_ptr()
    assert len({s0.kv_num_blocks.data_ptr(), s1.kv_num_blocks.data_ptr()}) == 2


def test_return_lse_false(gen, kernel_device):
    q, k, v = (torch.randn(1, 20, 1, 16, generator=gen).bfloat16().to(kernel_device) for _ in range(3))
    result = lite_attention(q, k, v, threshold=-5.0, block_size=(16, 16), backend="triton")
    assert len(result) == 2 and result[0].shape == q.shape and result[0].dtype == torch.bfloat16


def test_non_contiguous_state(gen, local_qkv, random_tile_mask, kernel_device):
    """A state built from strided views (a head slice of a larger state) computes its own lists.

    The kernel indexes the lists as dense arrays; strided views once made it read
    other heads' lists (and expanded tensors read out of bounds).
    """
    q, k, v = (x.half() for x in local_qkv(2, 48, 2, 2, 32, generator=gen))
    mask = random_tile_mask(2, 4, 48, 48, 16, 16, density=0.5, generator=gen)
    big = SkipState.from_dense(mask.to(kernel_device), 48, 48, 16, 16)  # sliced where it runs: .to() would copy
    sliced = SkipState(big.kv_num_blocks[:, ::2], big.kv_indices[:, ::2], 48, 48, 16, 16)
    want, _ = lite_attention(q, k, v, sliced.to("cpu").clone(), threshold=float("-inf"), layout="bhsd",
                             backend="torch")
    out, _ = lite_attention(*(x.to(kernel_device) for x in (q, k, v)), sliced, threshold=float("-inf"),
                            layout="bhsd", backend="triton")
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=0, atol=6e-3)


def test_a_state_built_from_edited_lists_is_walked_as_a_list(gen, local_qkv, kernel_device):
    """States are values: edited lists go into a new state, which is not fresh however its lists came about, so a
    call that marks nothing reads its lists (list walk) instead of walking every tile (full walk)."""
    q, k, v = (x.half() for x in local_qkv(1, 64, 1, 1, 32, generator=gen))
    full = SkipState.full(1, 1, 64, 64, 16, 16)
    counts = full.kv_num_blocks.clone()
    counts[..., 0] = 1  # query tile 0 keeps only key tile 0
    edited = SkipState(counts, full.kv_indices.clone(), 64, 64, 16, 16)
    assert full.is_fresh() and not edited.is_fresh()
    want, _ = lite_attention(q, k, v, edited.clone(), threshold=float("-inf"), layout="bhsd", backend="torch")
    out, _ = lite_attention(*(x.to(kernel_device) for x in (q, k, v)), edited.to(kernel_device),
                            threshold=float("-inf"), layout="bhsd", backend="triton")
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=0, atol=6e-3)
    dense, _ = lite_attention(q, k, v, full, threshold=float("-inf"), layout="bhsd", backend="torch")
    assert (dense[:, :, :16] - want[:, :, :16]).abs().max() > 0.1, "the edit must change the output it checks"


def test_detection_words_over_lists_longer_than_a_word(gen, local_qkv, shuffled_state, check):
    """The detection bits (32 tiles per word, merged with atomics) agree with the reference on a list longer than
    one 32-tile word, with full and partial rows."""
    q, k, v = (x.half() for x in local_qkv(1, 75, 2, 1, 32, seq_len_k=1100, generator=gen))
    mask = torch.ones(1, 2, 5, 69, dtype=torch.bool)
    mask[0, 1, 2, 40:] = False  # a partial list next to full ones
    state = shuffled_state(SkipState.from_dense(mask, 75, 1100, 16, 16), generator=gen)
    nxt, marked = check(q, k, v, state, threshold=-3.0)
    assert marked > 0
    check(q, k, v, nxt, threshold=-3.0)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_tuned_config_matches_reference(head_dim, monkeypatch, gen, local_qkv, shuffled_state, check):
    """Each (num_warps, num_stages) the autotuner may pick gives the reference's output and state.

    Default tile sizes, a ragged sequence and a shuffled partial list; on a GPU this runs every config of
    the tuning space, in the interpreter its single config. On Hopper the calls pass the portable kernel's spec
    (the warp-specialized kernel has its own tests).
    """
    import liteattn.kernels.op as op
    import liteattn.kernels.portable as portable
    from liteattn.kernels import default_block_sizes, dispatch

    launch = op.lite_attention_fwd
    monkeypatch.setattr(op, "lite_attention_fwd",
                        lambda call: launch(call, spec=dispatch.portable_spec(dispatch.spec_for(call))))

    bm, bn = default_block_sizes(head_dim)
    q, k, v = (x.half() for x in local_qkv(1, 300, 2, 1, head_dim, seq_len_k=700, generator=gen))
    mask = torch.ones(1, 2, -(-300 // bm), -(-700 // bn), dtype=torch.bool)
    mask[0, 1, 1, 2:] = False
    state = shuffled_state(SkipState.from_dense(mask, 300, 700, bm, bn), generator=gen)
    kernel = portable._lite_attention_fwd
    ran = 0
    for config in portable.autotune_configs():
        monkeypatch.setattr(kernel, "configs", [config])
        kernel.cache.clear()
        try:
            nxt, marked = check(q, k, v, state.clone(), threshold=-3.0)
        except triton.runtime.errors.OutOfResources:
            continue  # e.g. 4 stages of 128x128 tiles exceed shared memory; the autotuner skips it as well
        assert marked > 0, "the inputs should make the reference mark tiles"
        check(q, k, v, nxt, threshold=-3.0)
        ran += 1
    kernel.cache.clear()
    assert ran > 0


def test_empty_list_attends_to_nothing(gen, local_qkv, check, kernel_device):
    """A hand-built state may leave a query tile with no active key tile: zero output, LSE -inf, empty next
    list, and the other tiles unaffected."""
    q, k, v = (x.half() for x in local_qkv(1, 64, 2, 2, 32, seq_len_k=80, generator=gen))
    mask = torch.ones(1, 2, 4, 5, dtype=torch.bool)
    mask[0, 1, 2, :] = False
    state = SkipState.from_dense(mask, 64, 80, 16, 16)
    nxt, marked = check(q, k, v, state, threshold=-3.0)
    assert marked > 0
    assert int(nxt.kv_num_blocks[0, 1, 2]) == 0
    out, lse, _ = lite_attention(*(x.to(kernel_device).transpose(1, 2) for x in (q, k, v)), state.to(kernel_device),
                                 threshold=-3.0, return_lse=True, backend="triton")
    rows = slice(32, 48)
    assert torch.equal(out[0, rows, 1].float().cpu(), torch.zeros(16, 32))
    assert torch.isneginf(lse[0, 1, rows].cpu()).all()
