"""PyTorch reference of the LiteAttention tile semantics.

This is the specification the Triton kernel is tested against, and the path
the public API takes on a CPU. It is written for clarity first but stays
vectorised over (batch, head, query tile): step ``t`` processes the ``t``-th
entry of every active list at once, so it runs in ``O(KT)`` batched steps.

Semantics, per (batch b, head h, query tile i), in the order of its active list
(a full list, with every key tile active, is visited in ascending order):

1. ``s = scale * q_i @ k_jᵀ`` (columns past ``seq_len_k`` are ``-inf``).
2. The tile's *score* is ``max over valid rows r of (max_c s_rc - m_r) * log2(e)``
   where ``m_r`` is the running row maximum over the tiles visited before it.
3. The tile is *marked* when ``score < threshold``, every valid row's margin
   ``(max_c s_rc - m_r) * log2(e)`` is finite, it is not the first tile
   visited, and neither the query tile nor the key tile overlaps a must-do
   range. A marked tile is still used in this call (steps 4-5).
4. Online softmax: ``m' = max(m, rowmax s)``, ``l = l e^{m-m'} + Σ e^{s-m'}``,
   ``acc = acc e^{m-m'} + e^{s-m'} v_j`` (with ``m'`` taken as 0 while it is
   -inf, so a row whose scores so far are all -inf keeps zero weights).
5. Tiles not marked are appended, in visiting order, to the next state's list.

With ``skip_softmax`` (the serving stacks' per-call rule, NVIDIA's BLASST),
a marked tile is instead left out of this call (no exponentials, no P.V: its
weights are below ``2**threshold`` of the row maximum), its QK having been
computed as every tile's is, and the returned lists hold the tiles that were
used: the caller carries nothing to the next call.

Output ``acc / l``, log-sum-exp ``m + log l`` (natural log); a row that
attended to nothing (an empty list, or every score -inf) gives zeros and -inf.

Non-finite inputs. The output follows dense attention over the same tiles
(SDPA's math backend): a row is NaN where a NaN or +inf score makes its sum
NaN, zero where every score is -inf, and NaN or infinite values of ``v``
reach the output through ``acc``. No skip decision made from non-finite scores is carried:
a margin that is not finite (a tile whose scores in a row are all -inf, a
running maximum that is +inf or NaN) never finds a tile negligible (step 3),
and a query tile any of whose valid rows ends with a NaN sum (it met a NaN
or +inf score) keeps its whole list, so the next call computes exactly what
it would have without this one. A -inf score beside finite ones weighs
nothing, as in dense attention, and leaves the decision to the finite ones.

8-bit QK (``qk_dtype="int8"`` or ``"fp8"``; opt-in, the default ``None`` is
everything above). Only step 1 changes: the scores come from Q and K rounded
to 8 bits, as SageAttention computes them; the skip rule, the online softmax
and P.V (in ``compute_dtype``, from the unrounded ``v``) are as above.

a. *Smoothing.* ``mu = mean of k over the key tokens`` per (batch, kv-head),
   per channel, over the ``seq_len_k`` valid keys only (never the padding of a
   ragged last tile), and ``k' = k - mu``. Why: the keys of a DiT share a large
   common component; a per-tile scale sized for it leaves few levels for what
   tells keys apart. Why it is exact: ``q.k' = q.k - q.mu`` subtracts one
   constant per query row, which cancels in the softmax *and* in the skip
   rule (a margin is a difference of two scores of one row).
b. *Quantization*, symmetric, one scale per tile: ``q`` per query tile
   (``block_m`` rows of one (batch, head)), ``k'`` per key tile (``block_n``
   rows of one (batch, kv-head)). int8: ``scale = absmax / 127``, values
   ``round(x / scale)`` (ties to even) in ``[-127, 127]``; fp8 (torch's
   ``float8_e4m3fn``): ``scale = absmax / 448``, values ``x / scale`` rounded
   to e4m3 (nearest, ties to even). A tile whose absmax is 0 holds zeros
   (scale 1). Why per tile: the kernel loads one tile of Q and one of K per
   step, so one scale each costs two scalars per tile and the dequantization
   is one multiply of the score tile; finer (per-token) scales are measured
   against it in ``lab/qk8_accuracy.py`` (``lab/results/qk8``).
c. ``s = ((Q8 @ K8^T) * scale_q * scale_k) * softmax_scale``: the integer
   (or e4m3) product is exact (int8: ``|sum| <= 127^2 * D < 2^24`` for
   ``D <= 1040``, exact in int32 and float32; e4m3: every product is a
   multiple of ``2^-18`` below ``2^18``, so the sum is exact in float64 for
   ``D < 2^17``; the reference computes it in float64), then rounded once to
   ``compute_dtype`` for the dequantization. A kernel may round the
   dequantization differently, never the product.
d. The returned ``lse`` is that of the unsmoothed scores, ``m + log l +
   softmax_scale * q.mu`` (the correction from the unrounded ``q`` and ``mu`` in
   ``compute_dtype``), so that partial results over key chunks (ring
   attention) merge as before. The per-tile scores of ``return_scores`` are
   margins and need no correction.

Non-finite values with 8-bit QK. One NaN or infinity must not spread through
``mu`` or a tile's scale to tokens dense attention keeps finite (a NaN mean
would make every score of every row NaN). So a *bad* token (a query row or a
key holding a non-finite value) is left out: ``mu`` is the mean of the other
keys (0 if none), each absmax is over the other rows of its tile, and the
bad token's scores are not quantized: a bad query row's scores are its dense
scores ``softmax_scale * q.k`` (unsmoothed, the whole row, so the row stays
one softmax) and its ``lse`` gets no correction; a good row's score against
a bad key is ``softmax_scale * (q.k - q.mu)``, unrounded. Every non-finite
score is then the one dense attention has (minus a finite constant of its
row), so the rows that are NaN or zero, and the lists a query tile keeps for
meeting a NaN or +inf score, are exactly those of ``qk_dtype=None``; the
finite rows keep 8-bit accuracy (tests/test_qk_int8_reference.py). The
kernels flag bad tokens when they quantize and compute every query tile that
meets one (a bad row of its own, or a bad key of its kv-head) by the rules
without 8-bit QK: the same non-finite rows and kept lists, and 16-bit scores
for that tile's finite rows (liteattn.kernels.quant).

fp8 P.V (``pv_dtype="fp8"``, opt-in, only with an 8-bit ``qk_dtype``): step
4's product ``e^{s-m'} v_j`` takes P and V rounded to float8 e4m3, as
SageAttention2 computes it; the running max, the sums ``l`` (from the
unrounded P), the skip rule and the lse are as above.

e. *V*, one scale per (batch, kv-head, channel) over the valid keys:
   ``scale = absmax / 448`` (1 for a channel of zeros), values ``v / scale``
   rounded to e4m3 (nearest, ties to even). Why per channel: V's channels
   differ in range and the scale is one multiply of the output's channel.
f. *P* of each tile, ``e^{s-m'}`` in ``[0, 1]``, times 448 (the e4m3 range),
   rounded to float16 and then to e4m3, divided by 448: the kernel's exp2
   gives P in float32, which crosses its loop as float16 pairs and is rounded
   to e4m3 where the product is issued, and the reference rounds the same
   two ways. The sums use the unrounded P, so a row's weights need not sum
   to one exactly (their error is P's rounding, about 3 % per weight). Each
   term of the product is exact; the sum is rounded as the kernel's tensor
   cores accumulate (Hopper's fp8 products keep fewer bits than float32),
   which the reference does not model.
g. A kv-head whose V holds a non-finite value computes P.V unrounded (one
   NaN would otherwise set the scale of its channel). The kernels compute
   every query tile they compute in 16 bits (a bad query row or key, as
   above, or a non-finite value of its kv-head's V) without 8-bit QK and
   without fp8 P.V: the same non-finite rows, and 16-bit P.V for that
   tile's finite rows where the reference rounds it.
"""
from __future__ import annotations

import math

import torch

from .state import SkipState, num_tiles, tile_protection

__all__ = ["lite_attention_reference"]

LOG2E = 1.0 / math.log(2.0)


def _tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, T, block, D), zero-padded."""
    b, h, s, d = x.shape
    t = num_tiles(s, block)
    x = torch.nn.functional.pad(x, (0, 0, 0, t * block - s))
    return x.view(b, h, t, block, d)


QK_DTYPES = (None, "int8", "fp8")
PV_DTYPES = (None, "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}
_FP8_MAX = 448.0


def _check_qk_dtype(qk_dtype):
    if qk_dtype is None or (isinstance(qk_dtype, str) and qk_dtype in _QMAX):
        if qk_dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise ValueError("qk_dtype='fp8': this torch has no torch.float8_e4m3fn; use 'int8' or None")
        return qk_dtype
    hint = " (pass the string, e.g. 'int8')" if isinstance(qk_dtype, torch.dtype) else ""
    raise ValueError(f"qk_dtype: expected one of {QK_DTYPES} (None: Q and K unrounded; 'int8' or 'fp8': "
                     f"8-bit Q.K^T with smoothed K, one scale per tile), got {qk_dtype!r}{hint}")


def check_pv_dtype(pv_dtype, qk_dtype):
    """None or ``"fp8"``, which needs an 8-bit ``qk_dtype`` (the rule for every entry point; ValueError naming
    ``pv_dtype`` otherwise)."""
    if pv_dtype is None:
        return None
    if not (isinstance(pv_dtype, str) and pv_dtype in PV_DTYPES):
        hint = " (pass the string 'fp8')" if isinstance(pv_dtype, torch.dtype) else ""
        raise ValueError(f"pv_dtype: expected None or 'fp8' (None: P.V in 16 bits; 'fp8': P and V rounded to float8 "
                         f"e4m3), got {pv_dtype!r}{hint}")
    if qk_dtype is None:
        raise ValueError("pv_dtype='fp8': fp8 P.V comes with 8-bit Q.K^T; expected qk_dtype='int8' (or 'fp8') with "
                         "it, got qk_dtype=None")
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError("pv_dtype='fp8': this torch has no torch.float8_e4m3fn; use pv_dtype=None")
    return pv_dtype


def _nonfinite_heads(v: torch.Tensor) -> torch.Tensor:
    """Rule g's kv-heads: ``[B, H_kv]``, True where V (B, H_kv, S_k, D) holds a non-finite value."""
    return ~v.isfinite().flatten(2).all(-1)


def _rounded_v(v: torch.Tensor) -> torch.Tensor:
    """V (B, H_kv, S_k, D) as fp8 P.V reads it (rules e, g): rounded to e4m3 per channel and scaled back, or
    unrounded for a kv-head holding a non-finite value."""
    absmax = torch.where(v.isfinite(), v.abs(), 0.0).amax(2, keepdim=True)  # [B, H_kv, 1, D]
    scale = torch.where(absmax > 0, absmax / _FP8_MAX, torch.ones_like(absmax))
    rounded = (v / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).to(v.dtype) * scale
    return torch.where(_nonfinite_heads(v)[..., None, None], v, rounded)


def _rounded_p(p: torch.Tensor) -> torch.Tensor:
    """P in [0, 1] as fp8 P.V reads it (rule f): times 448, to float16, to e4m3, divided by 448."""
    return (p * _FP8_MAX).to(torch.float16).to(torch.float8_e4m3fn).to(p.dtype) / _FP8_MAX


def _round8(x: torch.Tensor, block: int, qk_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit rounding of (B, H, S, D) with one scale per ``block`` rows.

    Returns the rounded values as float64 tiles (B, H, T, block, D) (integers for int8, e4m3 values for fp8)
    and the scales (B, H, T) in x's dtype. Padding rows are zero, so they never set a scale.
    """
    tiles = _tiles(x, block)
    qmax = _QMAX[qk_dtype]
    absmax = tiles.abs().amax(dim=(-2, -1))
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = (tiles / scale[..., None, None]).clamp(-qmax, qmax)
    if qk_dtype == "int8":
        values = torch.round(scaled)
    else:
        values = scaled.to(torch.float8_e4m3fn)
    return values.double(), scale


class _RoundedQK:
    """Step 1 with 8-bit Q and K (the module docstring's a-d and its non-finite rule)."""

    def __init__(self, q, k, bm, bn, group, scale, qk_dtype, compute_dtype):
        qf, kf = q.to(compute_dtype), k.to(compute_dtype)
        bad_q = ~qf.isfinite().all(-1)  # [B, H, S_q]
        bad_k = ~kf.isfinite().all(-1)  # [B, H_kv, S_k]
        good_k = (~bad_k)[..., None]
        count = good_k.sum(2).clamp(min=1)  # [B, H_kv, 1]
        mu = torch.where(good_k, kf, 0.0).sum(2, keepdim=True) / count[..., None]  # [B, H_kv, 1, D]
        self.q8, self.q_scale = _round8(torch.where(bad_q[..., None], 0.0, qf), bm, qk_dtype)
        k8, k_scale = _round8(torch.where(good_k, kf - mu, 0.0), bn, qk_dtype)
        self.k8, self.k_scale = k8.repeat_interleave(group, 1), k_scale.repeat_interleave(group, 1)
        self.scale, self.dtype = scale, compute_dtype
        # Added back to the lse: scale * q.mu per query row, 0 for bad rows (their scores are not smoothed).
        corr = scale * (qf @ mu.repeat_interleave(group, 1).transpose(-1, -2))[..., 0]  # [B, H, S_q]
        self.correction = torch.where(bad_q, 0.0, corr)
        self.any_bad = bool(bad_q.any() or bad_k.any())
        if self.any_bad:
            self.q_raw = _tiles(qf, bm)
            self.k_raw = _tiles(kf.repeat_interleave(group, 1), bn)
            self.bad_q = _tiles(bad_q[..., None].float(), bm)[..., 0] > 0  # [B, H, QT, BM]
            bad_k = bad_k.repeat_interleave(group, 1)
            self.bad_k = _tiles(bad_k[..., None].float(), bn)[..., 0] > 0  # [B, H, KT, BN]
            self.corr_tiles = _tiles(self.correction[..., None], bm)[..., 0]  # [B, H, QT, BM]

    def scores(self, bi, hi, j):
        """Scaled scores (B, H, QT, BM, BN) of every query tile against key tile ``j`` (B, H, QT)."""
        exact = torch.einsum("bhqmd,bhqnd->bhqmn", self.q8, self.k8[bi, hi, j])
        dequant = (self.q_scale * self.k_scale[bi, hi, j])[..., None, None]
        s = exact.to(self.dtype) * dequant * self.scale
        if self.any_bad:
            raw = torch.einsum("bhqmd,bhqnd->bhqmn", self.q_raw, self.k_raw[bi, hi, j]) * self.scale
            raw = raw - self.corr_tiles[..., None]
            s = torch.where(self.bad_q[..., None] | self.bad_k[bi, hi, j][..., None, :], raw, s)
        return s


def lite_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SkipState,
    threshold: float,
    scale: float | None = None,
    must_do: list[tuple[int, int]] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    write_state: bool = True,
    return_scores: bool = False,
    skip_softmax: bool = False,
    qk_dtype: str | None = None,
    pv_dtype: str | None = None,
):
    """Reference forward on BHSD tensors.

    Args:
        q: ``(B, H, S_q, D)``; k, v: ``(B, H_kv, S_k, D)`` with ``H % H_kv == 0``.
        state: the :class:`SkipState` read by this call (not modified).
        threshold: log2-domain threshold (negative; ``-inf`` marks nothing).
        scale: softmax scale, default ``D ** -0.5``.
        must_do: token ranges ``[(start, end), ...]`` never skipped.
        compute_dtype: float32 or float64 arithmetic.
        write_state: if False, return the input counts/indices as the "next" pair.
        return_scores: also return the per-visited-tile scores ``(B, H, QT, KT)``
            (NaN where a list position is unused), useful for calibration.
        skip_softmax: a marked tile is not used in this call (its exponentials
            and P.V skipped) rather than in the next ones; the returned lists
            are the tiles used.
        qk_dtype: ``None`` (default) computes Q.K^T from q and k in ``compute_dtype``; ``"int8"`` or ``"fp8"``
            from q and mean-smoothed k rounded to 8 bits with one scale per tile (module docstring, a-d).
        pv_dtype: ``None`` (default) computes P.V in ``compute_dtype``; ``"fp8"`` from P and V rounded to float8
            e4m3 (module docstring, e-g); needs an 8-bit ``qk_dtype``.

    Returns:
        ``out (B, H, S_q, D)`` in q's dtype, ``lse (B, H, S_q)`` float32,
        ``(next_counts, next_indices)`` int32 / int16, and the scores if asked.
    """
    bsz, nheads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    group = nheads // k.shape[1]
    bm, bn = state.block_m, state.block_n
    qt, kt = num_tiles(seq_q, bm), num_tiles(seq_k, bn)
    dev = q.device
    scale = dim ** -0.5 if scale is None else scale
    qk_dtype = _check_qk_dtype(qk_dtype)
    pv_dtype = check_pv_dtype(pv_dtype, qk_dtype)

    if qk_dtype is None:
        rounded = None
        qs = _tiles(q.to(compute_dtype), bm)  # [B, H, QT, BM, D]
        ks = _tiles(k.to(compute_dtype).repeat_interleave(group, 1), bn)  # [B, H, KT, BN, D]
    else:
        rounded = _RoundedQK(q, k, bm, bn, group, scale, qk_dtype, compute_dtype)
    vf = v.to(compute_dtype)
    v8 = pv_dtype is not None
    vs = _tiles((_rounded_v(vf) if v8 else vf).repeat_interleave(group, 1), bn)
    v_bad = None
    if v8:  # rule g: a kv-head with a non-finite value of V computes P.V from the unrounded P
        v_bad = _nonfinite_heads(vf).repeat_interleave(group, 1)[..., None, None]  # [B, H, 1, 1]
    row_valid = (torch.arange(qt * bm, device=dev) < seq_q).view(qt, bm)  # [QT, BM]
    col_valid = (torch.arange(kt * bn, device=dev) < seq_k).view(kt, bn)  # [KT, BN]
    q_prot = tile_protection(must_do, seq_q, bm, dev).bool()  # [QT]
    k_prot = tile_protection(must_do, seq_k, bn, dev).bool()  # [KT]

    counts = state.kv_num_blocks.long()  # [B, H, QT]
    # A full row is visited in ascending order whatever its list holds (see SkipState).
    ascending = torch.arange(kt, device=dev).expand(bsz, nheads, qt, kt)
    indices = torch.where((counts == kt)[..., None], ascending, state.kv_indices.long())  # [B, H, QT, KT]
    neg_inf = torch.tensor(float("-inf"), dtype=compute_dtype, device=dev)
    m = torch.full((bsz, nheads, qt, bm), float("-inf"), dtype=compute_dtype, device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(bsz, nheads, qt, bm, dim, dtype=compute_dtype, device=dev)
    next_counts = torch.zeros_like(counts)
    next_indices = torch.zeros_like(indices)
    scores = torch.full((bsz, nheads, qt, kt), float("nan"), dtype=compute_dtype, device=dev) if return_scores else None
    bi = torch.arange(bsz, device=dev)[:, None, None]
    hi = torch.arange(nheads, device=dev)[None, :, None]

    for t in range(int(counts.max()) if counts.numel() else 0):
        active = t < counts  # [B, H, QT]
        j = torch.where(active, indices[..., t], 0).clamp_(0, kt - 1)  # [B, H, QT]
        if rounded is None:
            s = torch.einsum("bhqmd,bhqnd->bhqmn", qs, ks[bi, hi, j]) * scale  # [B, H, QT, BM, BN]
        else:
            s = rounded.scores(bi, hi, j)
        s = torch.where(col_valid[j][..., None, :], s, neg_inf)
        tile_max = s.amax(-1)  # [B, H, QT, BM]
        margin = (tile_max - m) * LOG2E
        score = torch.where(row_valid, margin, neg_inf).amax(-1)  # [B, H, QT]
        negligible = ((margin < threshold) & (margin > neg_inf)) | ~row_valid  # a non-finite margin decides nothing
        mark = active & (t > 0) & negligible.all(-1) & ~q_prot[None, None, :] & ~k_prot[j]
        if scores is not None:
            scores[..., t] = torch.where(active, score, float("nan"))

        m_new = torch.maximum(m, tile_max)
        m_use = torch.where(m_new == neg_inf, 0.0, m_new)  # -inf - -inf would be NaN
        p = torch.exp(s - m_use[..., None])
        alpha = torch.exp(m - m_use)
        upd = (active & ~mark if skip_softmax else active)[..., None]
        l = torch.where(upd, l * alpha + p.sum(-1), l)
        p_v = torch.where(v_bad[..., None], p, _rounded_p(p)) if v8 else p
        acc = torch.where(upd[..., None], acc * alpha[..., None] + p_v @ vs[bi, hi, j], acc)
        m = torch.where(upd, m_new, m)

        keep = active & ~mark
        pos = next_counts.clamp(max=kt - 1)[..., None]
        next_indices.scatter_(-1, pos, torch.where(keep, j, next_indices.gather(-1, pos)[..., 0])[..., None])
        next_counts += keep.long()

    has_mass = l != 0  # True for NaN: such rows are NaN, as in SDPA; rows that attended to nothing are 0
    safe_l = torch.where(has_mass, l, torch.ones_like(l))
    out = torch.where(has_mass[..., None], acc / safe_l[..., None], torch.zeros_like(acc))
    lse = torch.where(has_mass, m + torch.log(safe_l), neg_inf)
    if rounded is not None:  # the lse of the unsmoothed scores (docstring, d); -inf and NaN stay so
        lse = lse + _tiles(rounded.correction[..., None], bm)[..., 0]
    out = out.reshape(bsz, nheads, qt * bm, dim)[:, :, :seq_q].to(q.dtype)
    lse = lse.reshape(bsz, nheads, qt * bm)[:, :, :seq_q].float()
    if write_state:
        if not skip_softmax:  # skip-softmax reports the tiles it used, and carries nothing
            # A query tile that met a NaN or +inf score (a valid row's sum is NaN) keeps its list as visited.
            poisoned = (l.isnan() & row_valid).any(-1)  # [B, H, QT]
            next_counts = torch.where(poisoned, counts, next_counts)
            next_indices = torch.where(poisoned[..., None], indices, next_indices)
        nxt = (next_counts.to(torch.int32), next_indices.to(torch.int16))
    else:
        nxt = (state.kv_num_blocks.clone(), state.kv_indices.clone())
    if return_scores:
        return out, lse, nxt, scores
    return out, lse, nxt

