"""8-bit QK in the reference (``qk_dtype="int8"`` / ``"fp8"``), against code written from the rule.

The rule (liteattn.reference, module docstring a-d): K smoothed by its mean over the valid keys, Q and K rounded
symmetric with one scale per tile, the product exact, the lse that of the unsmoothed scores; the skip rule, the
softmax and P.V as without it. Checked here against: dense float64 attention over Q and K rounded by this file's
own code (the semantics, to float64 rounding), dense float64 attention over the unrounded inputs (the accuracy,
within a bound derived from the rounding step), and the unquantized reference (skip decisions, non-finite inputs).
"""
from __future__ import annotations

import math

import pytest
import torch

from liteattn import SkipState
from liteattn.reference import lite_attention_reference

NO_SKIP = float("-inf")
QMAX = {"int8": 127.0, "fp8": 448.0}


def _round_rows(x, block, qk_dtype):
    """x (B, H, S, D) float64 rounded to 8 bits with one symmetric scale per ``block`` rows, dequantized."""
    out = torch.empty_like(x)
    qmax = QMAX[qk_dtype]
    for start in range(0, x.shape[2], block):
        tile = x[:, :, start:start + block]
        absmax = tile.abs().amax(dim=(-2, -1), keepdim=True)
        step = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        y = (tile / step).clamp(-qmax, qmax)
        y = y.round() if qk_dtype == "int8" else y.to(torch.float8_e4m3fn).double()
        out[:, :, start:start + block] = y * step
    return out


def _rounded_dense(q, k, v, tiles, qk_dtype, dense_attention, scale=None, smooth=True, **mask):
    """Dense float64 attention over q and (smoothed) k rounded per tile; lse of the unsmoothed scores."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mu = k.mean(dim=2, keepdim=True) if smooth else torch.zeros_like(k[:, :, :1])
    qr, kr = _round_rows(q, tiles[0], qk_dtype), _round_rows(k - mu, tiles[1], qk_dtype)
    out, lse, _ = dense_attention(qr, kr, v, scale, **mask)
    group = q.shape[1] // k.shape[1]
    correction = scale * (q @ mu.repeat_interleave(group, 1).transpose(-1, -2))[..., 0]
    return out, lse + correction


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _qkv(gen, heads, kv_heads, seq_q, seq_k, dim, offset=3.0):
    """Random q, k, v; the keys share a common vector, as a DiT's do (which is what smoothing is for)."""
    q = _randn(gen, 1, heads, seq_q, dim)
    k = _randn(gen, 1, kv_heads, seq_k, dim) + offset * _randn(gen, 1, kv_heads, 1, dim)
    v = _randn(gen, 1, kv_heads, seq_k, dim)
    return q, k, v


@pytest.mark.parametrize("qk_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("seq_q,seq_k,block", [(100, 131, (16, 32)), (17, 5, (16, 16)), (64, 70, (32, 16))])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_is_dense_attention_over_the_rounded_values(qk_dtype, seq_q, seq_k, block, heads, kv_heads, gen,
                                                    dense_attention):
    """The semantics, to float64 rounding: ragged tiles (the mean and the scales over valid keys only) and GQA
    (K smoothed and rounded per kv-head)."""
    q, k, v = _qkv(gen, heads, kv_heads, seq_q, seq_k, 32)
    state = SkipState.full(1, heads, seq_q, seq_k, *block)
    out, lse, _ = lite_attention_reference(q, k, v, state, NO_SKIP, 0.3, compute_dtype=torch.float64,
                                           qk_dtype=qk_dtype)
    want_out, want_lse = _rounded_dense(q, k, v, block, qk_dtype, dense_attention, 0.3)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)  # lse is returned as float32
    # the rounding did something: the result is not the unrounded one
    assert (out - dense_attention(q, k, v, 0.3)[0]).abs().max() > 1e-4


def test_over_the_tiles_of_a_sparse_state(gen, dense_attention, random_tile_mask):
    q, k, v = _qkv(gen, 2, 1, 90, 77, 16)
    mask = random_tile_mask(1, 2, 90, 77, 16, 16, density=0.6, generator=gen)
    state = SkipState.from_dense(mask, 90, 77, 16, 16)
    out, lse, _ = lite_attention_reference(q, k, v, state, NO_SKIP, compute_dtype=torch.float64, qk_dtype="int8")
    want_out, want_lse = _rounded_dense(q, k, v, (16, 16), "int8", dense_attention, tile_mask=mask, block=(16, 16))
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)


def _score_error_bound(q, k, scale):
    """Per query row, a bound on |rounded score - exact score| over every key, for int8 per-tile rounding.

    Each tile's step is at most the tensor's absmax / 127, and rounding moves a value by at most half a step, so
    |q'.k'' - q.k'| <= |dq|.|k'| + |q'|.|dk'| <= step_q/2 * ||k'||_1 + (||q||_1 + D step_q/2) * step_k/2.
    """
    k = k - k.mean(dim=2, keepdim=True)
    half_q, half_k = q.abs().amax() / 254, k.abs().amax() / 254
    k_l1 = k.abs().sum(-1).amax()
    q_l1 = q.abs().sum(-1) + q.shape[-1] * half_q
    return scale * (half_q * k_l1 + q_l1 * half_k)  # [B, H, S_q]


def test_close_to_unrounded_dense_attention(gen, dense_attention):
    """Within the bound that follows from the rounding step: a score moves by at most ``delta`` (per row), so the
    lse by at most ``delta`` and each softmax weight by a factor within ``e^(+-2 delta)``, the output by at most
    ``(e^(2 delta) - 1) max|v|``; and within SageAttention's accuracy targets (cos >= 0.999, rel. L1 <= 0.02)."""
    q, k, v = _qkv(gen, 4, 2, 150, 150, 64, offset=5.0)
    scale = 64 ** -0.5
    state = SkipState.full(1, 4, 150, 150, 32, 32)
    out, lse, _ = lite_attention_reference(q, k, v, state, NO_SKIP, compute_dtype=torch.float64, qk_dtype="int8")
    want_out, want_lse, _ = dense_attention(q, k, v)
    delta = _score_error_bound(q, k.repeat_interleave(2, 1), scale)
    assert ((lse.double() - want_lse).abs() <= delta + 1e-5).all()
    assert ((out - want_out).abs().amax(-1) <= torch.expm1(2 * delta) * v.abs().amax()).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), want_out.flatten(), dim=0)
    rel_l1 = (out - want_out).abs().sum() / want_out.abs().sum()
    assert cos >= 0.999 and rel_l1 <= 0.02, (cos, rel_l1)


def test_fp8_close_to_unrounded_dense_attention(gen, dense_attention):
    """e4m3 keeps 3 mantissa bits (a relative step of 1/8), coarser than int8 for the tile's largest values: a
    looser target, met with margin on these inputs (cos ~0.9993, rel. L1 ~0.035)."""
    q, k, v = _qkv(gen, 4, 2, 150, 150, 64, offset=5.0)
    state = SkipState.full(1, 4, 150, 150, 32, 32)
    out, _, _ = lite_attention_reference(q, k, v, state, NO_SKIP, compute_dtype=torch.float64, qk_dtype="fp8")
    want_out = dense_attention(q, k, v)[0]
    cos = torch.nn.functional.cosine_similarity(out.flatten(), want_out.flatten(), dim=0)
    rel_l1 = (out - want_out).abs().sum() / want_out.abs().sum()
    assert cos >= 0.998 and rel_l1 <= 0.06, (cos, rel_l1)


def test_a_vector_added_to_every_key_changes_nothing_but_the_lse(gen, dense_attention):
    """Smoothing removes a common key vector before rounding: the output stays put and the lse moves by exactly
    scale * q.c, as dense attention's does. Rounded without smoothing, the same keys lose most of their levels to
    the common vector: several times the error."""
    q, k, v = _qkv(gen, 2, 2, 96, 96, 32, offset=0.0)
    c = 20.0 * _randn(gen, 32)
    state = SkipState.full(1, 2, 96, 96, 32, 32)
    run = lambda keys: lite_attention_reference(q, keys, v, state, NO_SKIP, compute_dtype=torch.float64,  # noqa: E731
                                                qk_dtype="int8")
    out, lse, _ = run(k)
    out_c, lse_c, _ = run(k + c)
    torch.testing.assert_close(out_c, out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse_c.double() - lse.double(), 32 ** -0.5 * (q @ c), rtol=1e-5, atol=1e-4)

    exact = dense_attention(q, k + c, v)[0]
    unsmoothed = _rounded_dense(q, k + c, v, (32, 32), "int8", dense_attention, smooth=False)[0]
    err_smoothed, err_unsmoothed = ((x - exact).abs().sum() / exact.abs().sum() for x in (out_c, unsmoothed))
    assert err_unsmoothed > 4 * err_smoothed, (err_unsmoothed, err_smoothed)


@pytest.mark.parametrize("skip_softmax", [False, True])
def test_skip_decisions_follow_the_unrounded_ones(skip_softmax, gen, local_qkv):
    """From a full list, the tiles marked with 8-bit QK are those marked without it, except where the unrounded
    score lies within the rounding band of the threshold: a margin is a difference of two scores of one row, so it
    moves by at most 2 delta log2(e)."""
    q, k, v = local_qkv(1, 256, 2, 1, 32, dtype=torch.float64, generator=gen, noise=0.3)
    state = SkipState.full(1, 2, 256, 256, 32, 32)
    scale = 32 ** -0.5
    band = float(2 * _score_error_bound(q, k.repeat_interleave(2, 1), scale).amax()) / math.log(2)
    agree = total = marked = 0
    for threshold in (-1.0, -3.0, -6.0):
        results = [lite_attention_reference(q, k, v, state, threshold, scale, compute_dtype=torch.float64,
                                            return_scores=True, skip_softmax=skip_softmax, qk_dtype=qk)
                   for qk in (None, "int8")]
        (_, _, (c0, i0), s0), (_, _, (c1, i1), s1) = results
        # One call from a full list: list positions are key tiles in ascending order in both.
        # (the first tile's score is +inf in both: its margin is taken against an empty running max)
        assert torch.equal(s0.isfinite(), s1.isfinite()) and torch.equal(s0.isnan(), s1.isnan())
        assert (torch.where(s0.isfinite(), s1 - s0, 0.0).abs() <= band).all()
        keep0 = SkipState(c0, i0, 256, 256, 32, 32).to_dense()
        keep1 = SkipState(c1, i1, 256, 256, 32, 32).to_dense()
        differ = keep0 != keep1
        assert not (differ & ((s0 - threshold).abs() > band)).any()
        agree += int((~differ).sum())
        total += differ.numel()
        marked += int((~keep0).sum())
    assert marked > 0.1 * total, "inputs should make the rule mark tiles"
    assert agree >= 0.97 * total, agree / total


@pytest.mark.parametrize("bad", ["int4", "INT8", "", 8, torch.int8, torch.float8_e4m3fn, ("int8",)])
def test_refuses_other_values(bad, gen):
    q, k, v = _qkv(gen, 1, 1, 16, 16, 16)
    state = SkipState.full(1, 1, 16, 16, 16, 16)
    with pytest.raises(ValueError, match=r"qk_dtype: expected one of \(None, 'int8', 'fp8'\)"):
        lite_attention_reference(q, k, v, state, -3.0, qk_dtype=bad)


@pytest.mark.parametrize("qk_dtype", ["int8", "fp8"])
def test_degenerate_finite_inputs_give_no_nan(qk_dtype, gen):
    """Tiles whose absmax is 0 (zero queries; identical keys, which smoothing turns to zero) and values large
    enough to overflow a careless dequantization give what the unrounded reference gives."""
    heads, seq, dim = 2, 70, 16
    state = SkipState.full(1, heads, seq, seq, 16, 16)
    v = _randn(gen, 1, heads, seq, dim).float()
    cases = {
        "zero q": (torch.zeros(1, heads, seq, dim), _randn(gen, 1, heads, seq, dim).float()),
        "equal keys": (_randn(gen, 1, heads, seq, dim).float(), _randn(gen, 1, heads, 1, dim).float().expand(
            1, heads, seq, dim).contiguous()),
        "large": (1e3 * _randn(gen, 1, heads, seq, dim).float(), 1e3 * _randn(gen, 1, heads, seq, dim).float()),
    }
    for name, (q, k) in cases.items():
        out, lse, _ = lite_attention_reference(q, k, v, state, -3.0, qk_dtype=qk_dtype)
        want, want_lse, _ = lite_attention_reference(q, k, v, state, -3.0)
        assert out.isfinite().all() and lse.isfinite().all(), name
        if name != "large":  # all scores equal: nothing to round
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4, msg=name)


NAN, INF = float("nan"), float("inf")


def _poison(q, k, kind):
    if kind == "nan key":
        k[0, 0, 40, 3] = NAN
    elif kind == "inf key":
        k[0, 0, 40, 3] = INF
    elif kind == "-inf key":
        k[0, 0, 40, 3] = -INF
    elif kind == "nan query":
        q[0, 1, 20, 0] = NAN
    elif kind == "inf query":  # signed so that some score is +inf (the keys' shared offset may make every k[..., 0]
        q[0, 1, 20, 0] = INF if k[0, 0, :, 0].max() > 0 else -INF  # one sign): the row's sum is NaN, as in dense
    elif kind == "-inf query":
        q[0, 1, 20, :] = -INF


@pytest.mark.parametrize("kind", ["nan key", "inf key", "-inf key", "nan query", "inf query", "-inf query"])
def test_a_non_finite_token_stays_where_dense_attention_keeps_it(kind, gen):
    """One bad token does not reach the mean or the scales: the rows that are NaN are exactly the unrounded
    reference's (rows whose lists do not hold key 40's tile stay finite), the other rows keep 8-bit accuracy,
    and query tiles that met a NaN or +inf score keep their lists, as without 8-bit QK."""
    q, k, v = (x.float() for x in _qkv(gen, 2, 1, 96, 96, 16))
    _poison(q, k, kind)
    mask = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    mask[0, :, ::2, 2] = False  # even query tiles never visit key tile 2 (keys 32-47)
    state = SkipState.from_dense(mask, 96, 96, 16, 16)
    out, lse, (counts, indices) = lite_attention_reference(q, k, v, state, -2.0, qk_dtype="int8")
    want, want_lse, (want_counts, want_indices) = lite_attention_reference(q, k, v, state, -2.0)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(lse.isnan(), want_lse.isnan())
    assert torch.equal(lse == -INF, want_lse == -INF)
    nan_rows = out.isnan().any(-1).view(1, 2, 6, 16)
    if kind.endswith("key"):  # rows of the tiles that visit key tile 2 meet key 40 (a NaN score, or +inf where
        assert not nan_rows[:, :, ::2].any()  # q_r3 has the infinity's sign); none of the others does
        assert nan_rows[:, :, 1::2].all() if kind == "nan key" else nan_rows[:, :, 1::2].any()
    else:  # only the poisoned query row
        assert nan_rows.sum() == 1 and nan_rows[0, 1, 1, 4]
    finite = want.isfinite().all(-1)
    torch.testing.assert_close(out[finite], want[finite], rtol=0, atol=0.03)
    met_nan = lse.isnan().view(1, 2, 6, 16).any(-1)  # query tiles with a NaN row keep their whole lists
    assert met_nan.any() or kind in ("-inf key", "-inf query")
    assert (counts[met_nan] == state.kv_num_blocks[met_nan]).all()
    assert torch.equal(counts, want_counts) or not met_nan.all()
    assert torch.equal(indices[met_nan], want_indices[met_nan])
