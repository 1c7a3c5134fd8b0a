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

    qs = _tiles(q.to(compute_dtype), bm)  # [B, H, QT, BM, D]
    ks = _tiles(k.to(compute_dtype).repeat_interleave(group, 1), bn)  # [B, H, KT, BN, D]
    vs = _tiles(v.to(compute_dtype).repeat_interleave(group, 1), bn)
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
        s = torch.einsum("bhqmd,bhqnd->bhqmn", qs, ks[bi, hi, j]) * scale  # [B, H, QT, BM, BN]
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
        acc = torch.where(upd[..., None], acc * alpha[..., None] + p @ vs[bi, hi, j], acc)
        m = torch.where(upd, m_new, m)

        keep = active & ~mark
        pos = next_counts.clamp(max=kt - 1)[..., None]
        next_indices.scatter_(-1, pos, torch.where(keep, j, next_indices.gather(-1, pos)[..., 0])[..., None])
        next_counts += keep.long()

    has_mass = l != 0  # True for NaN: such rows are NaN, as in SDPA; rows that attended to nothing are 0
    safe_l = torch.where(has_mass, l, torch.ones_like(l))
    out = torch.where(has_mass[..., None], acc / safe_l[..., None], torch.zeros_like(acc))
    lse = torch.where(has_mass, m + torch.log(safe_l), neg_inf)
    out = out.reshape(bsz, nheads, qt * bm, dim)[:, :, :seq_q].to(q.dtype)
    lse = lse.reshape(bsz, nheads, qt * bm)[:, :, :seq_q].float()
    if write_state:
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

