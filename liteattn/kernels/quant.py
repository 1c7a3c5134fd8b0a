"""8-bit Q and K for the kernels' ``qk_dtype="int8"`` mode, rounded exactly as :mod:`liteattn.reference` specifies.

Why a separate pass before the kernel: smoothing K needs its mean over every key token, which no single program
of the attention kernel sees; and one scale per tile must be known before a tile's integer product is scaled.
The pass is a handful of elementwise PyTorch operations over Q and K, a group of heads at a time (float32
temporaries of about 64 MiB), linear in the sequence length where the attention call is quadratic; its share of a
call is part of what the bench's ``liteattn-int8`` rows time.

What the kernel receives, per the reference's rules a-d:

- ``q8`` ``(B, H, S_q, D)`` and ``k8`` ``(B, H_kv, S_k, D)`` int8, contiguous: ``round(x / scale)`` in
  ``[-127, 127]``, K smoothed (``k - mu``, ``mu`` its mean over the finite key tokens of each (batch, kv-head));
  a *bad* token (a query row or key holding a non-finite value) is zero there and sets no scale;
- ``q_scale`` ``(B, H, QT)`` and ``k_scale`` ``(B, H_kv, KT)`` float32, one per tile (1 for a tile of zeros);
- ``shift`` ``(B, H, S_q)`` float32: ``q . mu`` per query row, which smoothing took from every score of the row;
  the launcher adds ``scale * shift`` back to the returned log-sum-exp;
- ``sixteen`` ``(B, H, QT)`` int8: 1 for a query tile that holds a bad row or whose kv-head holds a bad key. Such a
  query tile computes all its scores in 16 bits from the unrounded inputs (its ``shift`` is 0): what dense
  attention gives for the non-finite rows, and the decisions of ``qk_dtype=None``, exactly as the reference's
  non-finite rule requires; its finite rows then have 16-bit rather than 8-bit scores. Why a whole query tile:
  one more 16-bit path per tile pair kept both tiles' scores live at once and cost the kernel about 100 registers
  per thread on sm90, for inputs that should not occur.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QK8", "quantize_qk"]

QMAX = 127.0


@dataclass(frozen=True)
class QK8:
    """Q and K rounded to int8 with their scales, for one call (the module docstring says what each holds)."""

    q8: torch.Tensor
    k8: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    shift: torch.Tensor
    sixteen: torch.Tensor


def _round_tiles(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values ``(B, H, S, D)`` and float32 scales ``(B, H, T)`` of ``x`` (float32, bad rows already zero)."""
    b, h, s, d = x.shape
    t = -(-s // block)
    tiles = torch.nn.functional.pad(x, (0, 0, 0, t * block - s)).view(b, h, t, block, d)
    absmax = tiles.abs().amax(dim=(-2, -1))
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    values = torch.round(tiles / scale[..., None, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return values.view(b, h, t * block, d)[:, :, :s].contiguous(), scale


def _bad_tiles(bad: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, T)`` int8: 1 where a tile of ``block`` tokens holds a bad token (``bad``: ``(B, H, S)`` bool)."""
    b, h, s = bad.shape
    t = -(-s // block)
    padded = torch.nn.functional.pad(bad.to(torch.int8), (0, t * block - s))
    return padded.view(b, h, t, block).amax(dim=-1).contiguous()


def quantize_qk(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, chunk_bytes: int = 64 << 20) -> QK8:
    """``q`` ``(B, H, S_q, D)`` and ``k`` ``(B, H_kv, S_k, D)`` (any strides) rounded for the int8 kernels, with one
    scale per ``block_m`` query rows and per ``block_n`` keys (the skip state's tiles).

    Heads are rounded a group at a time, each group's float32 temporaries within about ``chunk_bytes``: every value
    depends only on its own head, and at video lengths all heads at once would hold several times q's memory."""
    bsz, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qt, kt = -(-seq_q // block_m), -(-seq_k // block_n)
    dev = q.device
    out = QK8(torch.empty(bsz, heads, seq_q, dim, dtype=torch.int8, device=dev),
              torch.empty(bsz, kv_heads, seq_k, dim, dtype=torch.int8, device=dev),
              torch.empty(bsz, heads, qt, device=dev), torch.empty(bsz, kv_heads, kt, device=dev),
              torch.empty(bsz, heads, seq_q, device=dev), torch.empty(bsz, heads, qt, dtype=torch.int8, device=dev))
    per_kv_head = 4 * bsz * dim * (group * seq_q + seq_k)
    step = max(1, chunk_bytes // per_kv_head)
    for h0 in range(0, kv_heads, step):
        h1 = min(kv_heads, h0 + step)
        _quantize_heads(q[:, h0 * group:h1 * group], k[:, h0:h1], block_m, block_n, out, h0, h1, group)
    return out


def _quantize_heads(q, k, block_m, block_n, out: QK8, h0: int, h1: int, group: int) -> None:
    """Round kv-heads ``h0:h1`` (and their query heads) into ``out``'s slices."""
    qf, kf = q.float(), k.float()
    bad_q = ~qf.isfinite().all(-1)  # (B, h, S_q)
    bad_k = ~kf.isfinite().all(-1)  # (B, h_kv, S_k)
    good_k = (~bad_k)[..., None]
    count = good_k.sum(2, keepdim=True).clamp(min=1)
    mu = torch.where(good_k, kf, 0.0).sum(2, keepdim=True) / count  # (B, h_kv, 1, D)
    qs = slice(h0 * group, h1 * group)
    out.q8[:, qs], out.q_scale[:, qs] = _round_tiles(torch.where(bad_q[..., None], 0.0, qf), block_m)
    out.k8[:, h0:h1], out.k_scale[:, h0:h1] = _round_tiles(torch.where(good_k, kf - mu, 0.0), block_n)
    head_bad = bad_k.any(-1).repeat_interleave(group, 1)[..., None]  # (B, h, 1): a bad key in the kv-head
    sixteen = _bad_tiles(bad_q, block_m).bool() | head_bad  # (B, h, QT)
    out.sixteen[:, qs] = sixteen.to(torch.int8)
    shift = (qf @ mu.repeat_interleave(group, 1).transpose(-1, -2))[..., 0]  # (B, h, S_q)
    rows_sixteen = sixteen.repeat_interleave(block_m, -1)[..., :shift.shape[-1]]
    out.shift[:, qs] = torch.where(rows_sixteen, 0.0, shift)
