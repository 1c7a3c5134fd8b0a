"""The per-call skip-softmax rule of the reference (``skip_softmax=True``): a tile found negligible in a call is left
out of that very call (its QK computed, its exponentials and P.V not), the same tiles are found as by liteattn's
rule, and nothing is carried: the output is dense attention over the tiles the call used."""
from __future__ import annotations

import pytest
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


# The kernels' skip-softmax mode (liteattn.skip_softmax_attention) against the reference. On a CPU the portable
# kernel runs in Triton's interpreter (tiny shapes); on a GPU the same cases run compiled, and the Hopper ones
# (bf16, head_dim 64 or 128, 64-row tiles) run the sm90 kernel, whose consumers decide on their own 64 rows.
ON_GPU = torch.cuda.is_available()
KERNEL_CASES = [
    # dtype, heads, kv_heads, seq_q, seq_k, head_dim, block, must_do
    pytest.param(torch.float16, 2, 1, 75, 70, 32, (16, 16), None, id="fp16-ragged-mqa"),
    pytest.param(torch.bfloat16, 2, 2, 96, 96, 32, (16, 16), [(0, 10), (60, 63)], id="bf16-mustdo"),
    pytest.param(torch.bfloat16, 1, 1, 250, 256, 64, (64, 64), None, id="bf16-d64-tiles64"),
]
if ON_GPU:
    KERNEL_CASES += [
        pytest.param(torch.bfloat16, 4, 2, 1000, 1000, 128, (64, 128), [(0, 77)], id="sm90-d128-gqa-mustdo"),
        pytest.param(torch.bfloat16, 2, 2, 2100, 2048, 64, (64, 64), None, id="sm90-d64-ragged-q"),
        pytest.param(torch.float16, 2, 1, 1500, 1499, 128, (64, 64), None, id="sm90-d128-fp16-ragged-k"),
    ]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize("dtype,heads,kv_heads,seq_q,seq_k,head_dim,block,must_do", KERNEL_CASES)
def test_the_kernel_mode_follows_the_reference(dtype, heads, kv_heads, seq_q, seq_k, head_dim, block, must_do,
                                               local_qkv, gen, kernel_device, threshold_clear_of_scores):
    pytest.importorskip("triton")
    from liteattn import skip_softmax_attention

    q, k, v = (x.to(dtype) for x in local_qkv(1, seq_q, heads, kv_heads, head_dim, seq_len_k=seq_k, generator=gen,
                                              strength=2.0))
    threshold = threshold_clear_of_scores(q, k, v, block, must_do, skip_softmax=True)
    want, want_lse, (want_used, _) = lite_attention_reference(q.float(), k.float(), v.float(),
                                                              SkipState.full(1, heads, seq_q, seq_k, *block),
                                                              threshold, None, must_do, skip_softmax=True)
    out, lse, used = skip_softmax_attention(*(x.to(kernel_device) for x in (q, k, v)), threshold=threshold,
                                            must_do=must_do, layout="bhsd", return_lse=True, block_size=block,
                                            backend="triton")
    assert used.dtype == torch.int32 and used.shape == want_used.shape
    assert torch.equal(used.cpu(), want_used), "the kernel used other tiles than the reference"
    assert int(want_used.sum()) < want_used.numel() * -(-seq_k // block[1]), "inputs should let the rule skip tiles"
    assert not out.isnan().any() and not lse.isnan().any()
    tol = 4e-2 if dtype == torch.bfloat16 else 6e-3
    torch.testing.assert_close(out.float().cpu(), want.float(), rtol=0, atol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=0, atol=2e-3)


def test_the_torch_backend_is_the_reference_with_64_row_tiles(local_qkv, gen):
    from liteattn import skip_softmax_attention

    q, k, v = local_qkv(1, 200, 2, 2, 64, generator=gen)
    out, used = skip_softmax_attention(q, k, v, threshold=-3.0, layout="bhsd", backend="torch")
    want, _, (want_used, _) = lite_attention_reference(q, k, v, SkipState.full(1, 2, 200, 200, 64, 128), -3.0,
                                                       skip_softmax=True)
    assert used.shape == (1, 2, 4) and torch.equal(used, want_used)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_per_call_runs_only_as_a_full_walk_without_state():
    from liteattn.kernels.common import KernelCall
    from liteattn.kernels.dispatch import KernelSpec

    x = torch.zeros(1, 1, 16, 16)
    counts, indices, prot = torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, dtype=torch.int16), \
        torch.zeros(1, dtype=torch.int8)
    for walk, write in (("list", False), ("full", True)):
        with pytest.raises(ValueError, match="per_call"):
            KernelCall(x, x, x, counts, indices, counts, indices, prot, prot, 1.0, -1.0, 16, 16, walk, write, False,
                       per_call=True)
    with pytest.raises(ValueError, match="per_call"):
        KernelSpec("triton", 64, 64, "list", "index", per_call=True)
    sm90 = dict(tma=True, stages=2, regs=(40, 232), max_regs=168)
    with pytest.raises(ValueError, match="64 x 64 or 64 x 128 tiles with per_call"):
        KernelSpec("sm90", 128, 128, "full", "index", per_call=True, **sm90)
    KernelSpec("sm90", 64, 128, "full", "index", per_call=True, **sm90)  # its tiles: one consumer's rows


def test_bad_arguments_are_named():
    from liteattn import skip_softmax_attention

    q = torch.zeros(1, 64, 2, 32)
    with pytest.raises(ValueError, match="threshold"):
        skip_softmax_attention(q, q, q, threshold=1.0)
    with pytest.raises(ValueError, match="block_size"):
        skip_softmax_attention(q, q, q, threshold=-1.0, block_size=(10, 16))
    with pytest.raises(ValueError, match="return_lse: expected True or False, got 'no'"):
        skip_softmax_attention(q, q, q, threshold=-1.0, return_lse="no")


NAN_CASES = [pytest.param((32, 64), id="portable")]
if ON_GPU:
    NAN_CASES += [pytest.param((64, 64), id="sm90")]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("block", NAN_CASES)
def test_a_nan_score_is_never_skipped(block, kernel_device):
    """A tile holding a NaN score is used (its margin is NaN, which decides nothing), so the rows that meet it are
    NaN as in dense attention, and every later tile of the row is used; the torch backend reports the tiles it used
    (not the carried rule's keep-all of a poisoned query tile)."""
    from liteattn import skip_softmax_attention

    gen = torch.Generator().manual_seed(0)
    d = torch.randn(64, generator=gen)
    d = d / d.norm()
    q = d * 8 + 0.1 * torch.randn(1, 1, 256, 64, generator=gen)
    k = 0.1 * torch.randn(1, 1, 256, 64, generator=gen)
    k[..., :64, :] += d * 8  # the first key tile dominates every row: the others are negligible ...
    v = torch.randn(1, 1, 256, 64, generator=gen)
    k[0, 0, 200, 3] = float("nan")  # ... but one of them holds a NaN score for every row
    q, k, v = (x.half() for x in (q, k, v))
    want, (want_used, _) = lite_attention_reference(q, k, v, SkipState.full(1, 1, 256, 256, *block), -5.0,
                                                     skip_softmax=True)[::2]
    out, used = skip_softmax_attention(*(x.to(kernel_device) for x in (q, k, v)), threshold=-5.0, layout="bhsd",
                                       block_size=block, backend="triton")
    assert want.isnan().all(), "every row meets the NaN score"
    assert torch.equal(out.isnan().cpu(), want.isnan())
    assert torch.equal(used.cpu(), want_used)
    torch_out, torch_used = skip_softmax_attention(q, k, v, threshold=-5.0, layout="bhsd", block_size=block,
                                                   backend="torch")
    assert torch.equal(torch_used, want_used) and torch_out.isnan().all()
    # the tile with the NaN and the first one are used; a tile between them with finite, negligible scores is not
    assert (want_used < 256 // block[1]).all() and (want_used >= 2).all()
