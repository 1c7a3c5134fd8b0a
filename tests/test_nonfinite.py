"""NaN and infinite values in q, k, v, on both backends (the PyTorch path and the Triton kernel, which runs in
Triton's interpreter without a GPU).

The contract (liteattn.reference): the output follows dense attention over the same tiles, as SDPA's math
backend computes it (NaN where a NaN or +inf score makes a row's sum NaN, zero where every score of a row is
-inf); and no skip decision made from non-finite scores is carried: a query tile that met a NaN or +inf score
keeps its whole list, and a tile whose scores in a row are all -inf is never negligible for that row.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liteattn import SkipState, lite_attention

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    # Triton's interpreter computes with NumPy, which warns on every inf - inf and overflow: the point here.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

BACKENDS = ["torch", "triton"]
BLOCK = (64, 64)
NAN, INF = float("nan"), float("inf")


def _dtype(backend):
    return torch.float32 if backend == "torch" else torch.float16


def _call(q, k, v, state, backend, device, threshold=-2.0, must_do=None):
    """BHSD inputs on the CPU; runs on ``device``; returns out, lse (CPU) and the next state (CPU)."""
    out, lse, nxt = lite_attention(*(x.to(device) for x in (q, k, v)), state.to(device), threshold=threshold,
                                   layout="bhsd", return_lse=True, backend=backend, must_do=must_do)
    return out.cpu(), lse.cpu(), nxt.to("cpu")


def _sdpa(q, k, v, tile_mask=None):
    """Dense attention in float64 (GQA through repeated K/V): SDPA's math backend; over the tiles of
    ``tile_mask`` (B, H, QT, KT) if given, with the other keys left out (SDPA's boolean mask would add -inf to
    their scores, which keeps a NaN score NaN), then the same softmax (a row of -inf scores gives zeros)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), *(x.double().repeat_interleave(group, 1) for x in (k, v))
    if tile_mask is None:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    bm, bn = BLOCK
    keep = tile_mask.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :q.shape[2], :k.shape[2]]
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~keep, -INF)
    weights = torch.softmax(scores, -1).masked_fill((scores == -INF).all(-1, keepdim=True), 0.0)
    return weights @ v


def _qkv(gen, seq=150, heads=2, kv_heads=1, dim=32):
    q = torch.randn(1, heads, seq, dim, generator=gen)
    k = torch.randn(1, kv_heads, seq, dim, generator=gen)
    v = torch.randn(1, kv_heads, seq, dim, generator=gen)
    return q, k, v


def _assert_follows(out, ref, dtype, nonfinite_only=False):
    """NaN exactly where the reference is NaN (non-finite where it is non-finite, for values of v), and close
    elsewhere."""
    if nonfinite_only:
        assert torch.equal(~out.isfinite(), ~ref.isfinite())
    else:
        assert torch.equal(out.isnan(), ref.isnan()), (out.isnan().sum(), ref.isnan().sum())
        assert not out.isinf().any()
    finite = ref.isfinite() & out.isfinite()
    atol = {torch.float32: 1e-5, torch.float16: 6e-3, torch.bfloat16: 4e-2}[dtype]  # bf16 rounds P to 8 bits
    torch.testing.assert_close(out.double()[finite], ref[finite], rtol=0, atol=atol)


def _poison_q_row(q, k, v):
    q[0, 1, 70, 5] = NAN  # one query row of query tile 1, head 1


def _poison_k_key(q, k, v):
    k[0, 0, 20, 3] = NAN  # one key: every row of every head that visits key tile 0


def _inf_k_key(q, k, v):
    k[0, 0, 20, :] = INF  # the case: q.k is +inf, -inf or NaN (both signs in q)


def _inf_k_entry(q, k, v):
    k[0, 0, 100, 7] = INF  # rows with q[..., 7] > 0 see +inf, the others -inf


def _neg_inf_q_row(q, k, v):
    q[0, 0, 3, :] = -INF


def _all_neg_inf_row(q, k, v):
    q[0, 1, 40, :] = torch.tensor([-INF] + [0.0] * (q.shape[-1] - 1))
    k[0, 0, :, 0] = 1.0  # row 40 of head 1: -inf against every key, so SDPA gives 0


def _inf_v(q, k, v):
    v[0, 0, 130, 2] = INF


def _nan_v(q, k, v):
    v[0, 0, 10, 0] = NAN


CASES = [_poison_q_row, _poison_k_key, _inf_k_key, _inf_k_entry, _neg_inf_q_row, _all_neg_inf_row, _inf_v, _nan_v]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__[1:])
def test_output_follows_dense_attention(case, backend, gen, kernel_device):
    """From a fresh state (every tile computed) the output equals SDPA's: NaN rows where SDPA has them, zeros for
    a row whose every score is -inf, and values of v reaching the output."""
    q, k, v = _qkv(gen)
    case(q, k, v)
    dtype = _dtype(backend)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    device = "cpu" if backend == "torch" else kernel_device
    out, lse, _ = _call(q, k, v, SkipState.full(1, 2, 150, 150, *BLOCK), backend, device)
    ref = _sdpa(q, k, v)
    _assert_follows(out, ref, dtype, nonfinite_only=case in (_inf_v, _nan_v))
    if case in (_inf_v, _nan_v):
        assert out.isnan().any() or out.isinf().any()
    else:
        assert ref.isnan().any() or case is _all_neg_inf_row, "the case must reach the output"
        assert torch.equal(lse.isnan(), ref.isnan().any(-1))  # NaN rows have a NaN LSE
    if case is _all_neg_inf_row:
        assert (out[0, 1, 40] == 0).all() and lse[0, 1, 40] == -INF


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_over_a_sparse_state_follows_dense_attention_over_its_tiles(backend, gen, kernel_device,
                                                                          random_tile_mask):
    """A NaN key in a tile that some query tiles skip reaches only the rows that compute that tile."""
    q, k, v = _qkv(gen)
    k[0, 0, 75, 1] = NAN  # key tile 1
    mask = random_tile_mask(1, 2, 150, 150, *BLOCK, generator=gen)
    mask[0, 0, :, 1] = torch.tensor([True, False, True])
    mask[0, 1, :, 1] = torch.tensor([False, True, False])
    dtype = _dtype(backend)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    device = "cpu" if backend == "torch" else kernel_device
    out, _, _ = _call(q, k, v, SkipState.from_dense(mask, 150, 150, *BLOCK), backend, device)
    ref = _sdpa(q, k, v, mask)
    _assert_follows(out, ref, dtype)
    rows = out.isnan().any(-1)[0]  # (H, S_q)
    assert rows[0, :64].all() and not rows[0, 64:128].any() and rows[0, 128:].all()
    assert rows[1, 64:128].all() and not rows[1, :64].any() and not rows[1, 128:].any()


def _lists(state: SkipState) -> tuple[list, torch.Tensor]:
    counts = state.kv_num_blocks.flatten().tolist()
    rows = state.kv_indices.flatten(0, 2).tolist()
    return [row[:n] for row, n in zip(rows, counts)], state.to_dense()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [_poison_k_key, _inf_k_key], ids=["nan-key", "inf-key"])
def test_a_bad_call_leaves_no_decision_behind(case, backend, gen, kernel_device, local_qkv):
    """The issue's sequence: a clean step marks tiles, a step with a non-finite key (in key tile 0, which every
    query tile keeps: the first tile visited is never marked) marks nothing, and the next clean step computes
    exactly what it computes without the bad step in between."""
    dtype = _dtype(backend)
    device = "cpu" if backend == "torch" else kernel_device
    clean = tuple(x.to(dtype) for x in local_qkv(1, 150, 2, 1, 32, generator=gen))
    bad = tuple(x.clone() for x in clean)
    case(*bad)
    _, _, state1 = _call(*clean, SkipState.full(1, 2, 150, 150, *BLOCK), backend, device, threshold=-2.0)
    assert state1.sparsity() > 0, "the clean step must mark tiles, or the comparison is vacuous"
    out_bad, _, after_bad = _call(*bad, state1.clone(), backend, device, threshold=-2.0)
    assert out_bad.isnan().any()
    assert _lists(after_bad)[0] == _lists(state1)[0]
    with_bad, _, next_with = _call(*clean, after_bad, backend, device, threshold=-2.0)
    without, _, next_without = _call(*clean, state1.clone(), backend, device, threshold=-2.0)
    assert torch.equal(with_bad, without)
    assert _lists(next_with)[0] == _lists(next_without)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_query_tile_that_met_a_nan_keeps_its_list(backend, gen, kernel_device, local_qkv):
    """A NaN query row poisons its own query tile only: that tile keeps its list, and every other query tile
    decides exactly as with clean inputs (its scores are the same)."""
    dtype = _dtype(backend)
    device = "cpu" if backend == "torch" else kernel_device
    clean = tuple(x.to(dtype) for x in local_qkv(1, 320, 2, 1, 32, generator=gen))  # key tiles 3 and 4 are far
    bad = tuple(x.clone() for x in clean)
    _poison_q_row(*bad)  # head 1, query tile 1
    fresh = SkipState.full(1, 2, 320, 320, *BLOCK)
    _, _, after_clean = _call(*clean, fresh, backend, device, threshold=-1.0)
    _, _, after_bad = _call(*bad, fresh, backend, device, threshold=-1.0)
    clean_dense, bad_dense = after_clean.to_dense(), after_bad.to_dense()
    assert not clean_dense[0, 1, 1].all(), "the clean call must mark tiles of that query tile"
    assert bad_dense[0, 1, 1].all()
    bad_dense[0, 1, 1] = clean_dense[0, 1, 1]
    assert torch.equal(bad_dense, clean_dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_whose_tile_scores_are_all_minus_inf_decides_nothing(backend, gen, kernel_device):
    """The last query tile holds one row (ragged), whose scores in key tile 1 overflow to -inf (bf16 values near
    its maximum; the product overflows fp32) while its other scores are finite. Dense attention weighs that tile
    0; the tile is not marked (its margin is -inf, not a measurement), though it would be at any threshold if
    -inf margins counted. A row starting with -inf scores still attends to the later tiles (no NaN)."""
    seq = 129  # query tiles of 64, 64 and 1 rows
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(gen, seq=seq))
    q[..., 0] = 0.0
    k[..., 0] = 0.0
    q[0, :, 128, 0] = 3e38
    k[0, 0, 64:128, 0] = -3e38
    if backend == "torch":
        q, k, v = (x.float() for x in (q, k, v))
    device = "cpu" if backend == "torch" else kernel_device
    fresh = SkipState.full(1, 2, seq, seq, *BLOCK)
    out, _, nxt = _call(q, k, v, fresh, backend, device, threshold=-1e-3)
    _assert_follows(out, _sdpa(q, k, v), torch.float32 if backend == "torch" else torch.bfloat16)
    assert nxt.to_dense()[0, :, 2, 1].all(), "key tile 1 stays active for the one-row query tile"
    # Key tiles 1 then 2 (tile 0 skipped): the row's running max is -inf after tile 1, and tile 2 still counts.
    listed = SkipState(torch.full((1, 2, 3), 2, dtype=torch.int32),
                       torch.tensor([1, 2, 0], dtype=torch.int16).expand(1, 2, 3, 3).clone(), seq, seq, *BLOCK)
    out, _, _ = _call(q, k, v, listed, backend, device, threshold=-1e-3)
    ref = _sdpa(q, k, v, listed.to_dense())
    _assert_follows(out, ref, torch.float32 if backend == "torch" else torch.bfloat16)
    assert not out.isnan().any() and out[0, :, 128].abs().sum() > 0
