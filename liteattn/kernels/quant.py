"""8-bit Q and K for the kernels' ``qk_dtype="int8"`` mode, and V for ``pv_dtype="fp8"``, rounded as
:mod:`liteattn.reference` specifies.

Why a separate pass before the attention kernel: smoothing K needs its mean over every key token, which no single
program of the attention kernel sees; and one scale per tile must be known before a tile's integer product is
scaled. The pass is four small Triton kernels, linear in the sequence length where the attention call is quadratic:
per-chunk sums of the finite keys, their mean per kv-head, then one program per K tile and one per Q tile, each
sweeping its tile twice (its scale, then the rounding) a few rows at a time and writing int8. Its share of a call is
part of what the bench's ``liteattn-int8`` rows time.

What the attention kernels receive, per the reference's rules a-d:

- ``q8`` ``(B, H, S_q, D)`` and ``k8`` ``(B, H_kv, S_k, D)`` int8, contiguous: ``round(x / scale)`` in
  ``[-127, 127]`` (half to even, IEEE division, as ``torch.round`` of the reference), K smoothed (``k - mu``,
  ``mu`` its mean over the finite key tokens of each (batch, kv-head)); a *bad* token (a query row or key holding
  a non-finite value) is zero there and sets no scale;
- ``q_scale`` ``(B, H, QT)`` and ``k_scale`` ``(B, H_kv, KT)`` float32, one per tile (1 for a tile of zeros);
- ``shift`` ``(B, H, S_q)`` float32: ``q . mu`` per query row, which smoothing took from every score of the row;
  the caller adds ``scale * shift`` back to the returned log-sum-exp;
- ``sixteen`` ``(B, H, QT)`` int8: 1 for a query tile that holds a bad row or whose kv-head holds a bad key. Such a
  query tile computes all its scores in 16 bits from the unrounded inputs (its ``shift`` is 0): what dense
  attention gives for the non-finite rows, and the decisions of ``qk_dtype=None``, exactly as the reference's
  non-finite rule requires; its finite rows then have 16-bit rather than 8-bit scores. Why a whole query tile:
  one more 16-bit path per tile pair kept both tiles' scores live at once and cost the kernel about 100 registers
  per thread on sm90, for inputs that should not occur.

``mu`` is a float32 sum in another order than the reference's, so a smoothed key that lands within an ulp of a
rounding tie may round to the neighbouring integer; everything else is bit for bit the reference's.

V (:func:`quantize_v`, rules e and g of the reference) is three more kernels: per-chunk channel maxima, the scales
(IEEE division, as the reference divides), and one program per key tile writing e4m3 transposed (:class:`V8`). A
kv-head whose V holds a non-finite value sets ``sixteen`` for all its query tiles, which then compute without
8-bit arithmetic: its non-finite outputs are dense attention's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["QK8", "V8", "quantize_qk", "quantize_v"]

QMAX = tl.constexpr(127.0)
# The largest float8 e4m3 value: V rounds into [-FP8_MAX, FP8_MAX] per channel, and P is scaled up to it.
FP8_MAX = tl.constexpr(448.0)
_KEYS_PER_CHUNK = 512  # keys summed by one program of the mean pass
# Elements a rounding program holds at once (16 rows at head_dim 128, 32 at 64): few registers per thread, so enough
# programs share an SM to hide the loads (on an H200 the fastest at head_dim 128, equal to 4096 at head_dim 64:
# lab/results/qk8/rounding-h200).
_CHUNK_ELEMENTS = 2048


@dataclass(frozen=True)
class QK8:
    """Q and K rounded to int8 with their scales, for one call (the module docstring says what each holds)."""

    q8: torch.Tensor
    k8: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    shift: torch.Tensor
    sixteen: torch.Tensor
    v8: "V8 | None" = None


@dataclass(frozen=True)
class V8:
    """V rounded to float8 e4m3 for an fp8 P.V product (:func:`quantize_v`).

    - ``vt`` ``(B, H_kv, D, KT * block_n)`` float8 e4m3: V transposed (an fp8 wgmma reads its B operand only
      K-major, and the keys are P.V's K), ``v / v_scale`` per channel, zero past ``S_k`` and for a non-finite
      value. Within each group of 32 keys the keys are stored in the order :func:`_pv8_key` gives, the order in
      which an fp8 product's A operand takes P's columns from the registers of the score product's accumulator,
      so the kernel hands P over without moving it between threads;
    - ``v_scale`` ``(B, H_kv, D)`` float32: the channel's absmax over the finite values / 448 (1 for zeros);
    - ``bad`` ``(B * H_kv,)`` int8: 1 for a kv-head with a non-finite value (its query tiles compute in 16 bits).
    """

    vt: torch.Tensor
    v_scale: torch.Tensor
    bad: torch.Tensor


@triton.jit
def _tile(x_ptr, bh, rows0, stride_b, stride_h, stride_s, H, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``rows0 ..`` of head ``bh`` (batch * H + head) in fp32, their validity and finiteness (zero past S, D)."""
    rows = rows0 + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    valid = rows < S
    ptr = (x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
           + rows[:, None].to(tl.int64) * stride_s + cols[None, :])
    x = tl.load(ptr, mask=valid[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    finite = tl.min((tl.abs(x) < float("inf")).to(tl.int32), 1) != 0  # NaN compares false
    return x, rows, cols, valid, finite


@triton.jit
def _tile_scale(absmax):
    """A tile's scale from its absolute maximum (elementwise over a block): absmax / 127, or 1 for a tile of zeros."""
    top = tl.max(tl.max(absmax, 1), 0)
    return tl.where(top > 0, tl.math.div_rn(top, QMAX), 1.0)


@triton.jit
def _round_rows(x, rows, cols, valid, scale, out_ptr, D):
    """Round rows of a tile with its scale into int8 rows of a contiguous (.., S, D) head."""
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds |y| < 2^22 to the nearest integer, half to even
    ptr = out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(ptr, y.to(tl.int8), mask=valid[:, None] & (cols < D)[None, :])


@triton.jit
def _key_sums(K, SUMS, COUNTS, BAD, stride_b, stride_h, stride_s, H_KV, S_K, D, CHUNKS,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, KEYS_PER_CHUNK: tl.constexpr):
    """Per (batch * kv-head, chunk of keys): the sum of the finite keys, their count and whether a key is bad.
    Accumulates elementwise and reduces across rows once, not once per block of rows."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    total = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_S], dtype=tl.int32)
    bad = tl.zeros([BLOCK_S], dtype=tl.int32)
    for r in range(0, KEYS_PER_CHUNK, BLOCK_S):
        x, rows, cols, valid, finite = _tile(K, bh, chunk * KEYS_PER_CHUNK + r, stride_b, stride_h, stride_s, H_KV,
                                             S_K, D, BLOCK_S, BLOCK_D)
        good = valid & finite
        total += tl.where(good[:, None], x, 0.0)
        count += good.to(tl.int32)
        bad = bad | (valid & ~finite).to(tl.int32)
    out = bh.to(tl.int64) * CHUNKS + chunk
    tl.store(SUMS + out * BLOCK_D + tl.arange(0, BLOCK_D), tl.sum(total, 0))
    tl.store(COUNTS + out, tl.sum(count, 0))
    tl.store(BAD + out, tl.max(bad, 0))


@triton.jit
def _key_means(SUMS, COUNTS, BAD, MU, HEAD_BAD, CHUNKS, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (batch * kv-head): the mean of its finite keys (0 if none) from the chunks' sums, and whether a key is
    bad. One launch where the tensor arithmetic on the sums would take five."""
    bh = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.int32)
    bad = tl.zeros([BLOCK_C], dtype=tl.int32)
    for c in range(0, CHUNKS, BLOCK_C):
        chunk = c + tl.arange(0, BLOCK_C)
        inside = chunk < CHUNKS
        at = bh.to(tl.int64) * CHUNKS + chunk
        total += tl.load(SUMS + at[:, None] * BLOCK_D + cols[None, :], mask=inside[:, None], other=0.0)
        count += tl.load(COUNTS + at, mask=inside, other=0)
        bad = bad | tl.load(BAD + at, mask=inside, other=0)
    n = tl.maximum(tl.sum(count, 0), 1).to(tl.float32)
    tl.store(MU + bh.to(tl.int64) * BLOCK_D + cols, tl.math.div_rn(tl.sum(total, 0), n))
    tl.store(HEAD_BAD + bh, tl.max(bad, 0).to(tl.int8))


@triton.jit
def _round_keys(K, MU, K8, K_SCALE, stride_b, stride_h, stride_s, H_KV, S_K, D, KT,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """One key tile: ``k - mu`` (zero for a bad key), rounded with the tile's scale. Two sweeps of ``ROWS`` rows
    each (the scale, then the rounding; the second reads the tile from cache)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    mu = tl.load(MU + bh.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D))
    absmax = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for r in range(0, BLOCK_N, ROWS):
        x, rows, cols, valid, finite = _tile(K, bh, tile * BLOCK_N + r, stride_b, stride_h, stride_s, H_KV, S_K, D,
                                             ROWS, BLOCK_D)
        absmax = tl.maximum(absmax, tl.abs(tl.where((valid & finite)[:, None], x - mu[None, :], 0.0)))
    scale = _tile_scale(absmax)
    tl.store(K_SCALE + bh.to(tl.int64) * KT + tile, scale)
    for r in range(0, BLOCK_N, ROWS):
        x, rows, cols, valid, finite = _tile(K, bh, tile * BLOCK_N + r, stride_b, stride_h, stride_s, H_KV, S_K, D,
                                             ROWS, BLOCK_D)
        x = tl.where((valid & finite)[:, None], x - mu[None, :], 0.0)
        _round_rows(x, rows, cols, valid, scale, K8 + bh.to(tl.int64) * S_K * D, D)


@triton.jit
def _round_queries(Q, MU, HEAD_BAD, Q8, Q_SCALE, SHIFT, SIXTEEN, stride_b, stride_h, stride_s, H, GROUP, S_Q, D, QT,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """One query tile: its rows rounded (zero for a bad row), whether it computes in 16 bits, and ``q . mu``. Two
    sweeps, as :func:`_round_keys`."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    kv = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    absmax = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    bad_rows = tl.zeros([ROWS], dtype=tl.int32)
    for r in range(0, BLOCK_M, ROWS):
        x, rows, cols, valid, finite = _tile(Q, bh, tile * BLOCK_M + r, stride_b, stride_h, stride_s, H, S_Q, D,
                                             ROWS, BLOCK_D)
        absmax = tl.maximum(absmax, tl.abs(tl.where(finite[:, None], x, 0.0)))
        bad_rows = bad_rows | (valid & ~finite).to(tl.int32)
    sixteen = tl.max(bad_rows, 0) | tl.load(HEAD_BAD + kv).to(tl.int32)
    scale = _tile_scale(absmax)
    tl.store(Q_SCALE + bh.to(tl.int64) * QT + tile, scale)
    tl.store(SIXTEEN + bh.to(tl.int64) * QT + tile, sixteen.to(tl.int8))
    mu = tl.load(MU + kv.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D))
    for r in range(0, BLOCK_M, ROWS):
        x, rows, cols, valid, finite = _tile(Q, bh, tile * BLOCK_M + r, stride_b, stride_h, stride_s, H, S_Q, D,
                                             ROWS, BLOCK_D)
        _round_rows(tl.where(finite[:, None], x, 0.0), rows, cols, valid, scale, Q8 + bh.to(tl.int64) * S_Q * D, D)
        shift = tl.where(sixteen != 0, 0.0, tl.sum(x * mu[None, :], 1))
        tl.store(SHIFT + bh.to(tl.int64) * S_Q + rows, shift, mask=valid)


@triton.jit
def _value_absmax(V, AMAX, BAD, stride_b, stride_h, stride_s, H_KV, S_K, D, CHUNKS,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, KEYS_PER_CHUNK: tl.constexpr):
    """Per (batch * kv-head, chunk of keys): each channel's absmax over the finite values, and whether one is not.
    Accumulates elementwise and reduces across rows once, as :func:`_key_sums`."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    amax = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    bad = tl.zeros([BLOCK_S], dtype=tl.int32)
    for r in range(0, KEYS_PER_CHUNK, BLOCK_S):
        x, rows, cols, valid, finite = _tile(V, bh, chunk * KEYS_PER_CHUNK + r, stride_b, stride_h, stride_s, H_KV,
                                             S_K, D, BLOCK_S, BLOCK_D)
        a = tl.abs(x)
        amax = tl.maximum(amax, tl.where(a < float("inf"), a, 0.0))  # NaN compares false
        bad = bad | (valid & ~finite).to(tl.int32)
    out = bh.to(tl.int64) * CHUNKS + chunk
    tl.store(AMAX + out * BLOCK_D + tl.arange(0, BLOCK_D), tl.max(amax, 0))
    tl.store(BAD + out, tl.max(bad, 0))


@triton.jit
def _value_scales(AMAX, BAD, V_SCALE, V_BAD, CHUNKS, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (batch * kv-head): each channel's scale, absmax / 448 with IEEE division as the reference divides (1 for
    a channel of zeros), and whether a value is not finite, from the chunks' maxima."""
    bh = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    top = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    bad = tl.zeros([BLOCK_C], dtype=tl.int32)
    for c in range(0, CHUNKS, BLOCK_C):
        chunk = c + tl.arange(0, BLOCK_C)
        inside = chunk < CHUNKS
        at = bh.to(tl.int64) * CHUNKS + chunk
        top = tl.maximum(top, tl.load(AMAX + at[:, None] * BLOCK_D + cols[None, :], mask=inside[:, None], other=0.0))
        bad = bad | tl.load(BAD + at, mask=inside, other=0)
    top1 = tl.max(top, 0)
    scale = tl.where(top1 > 0, tl.math.div_rn(top1, FP8_MAX), 1.0)
    tl.store(V_SCALE + bh.to(tl.int64) * D + cols, scale, mask=cols < D)
    tl.store(V_BAD + bh, tl.max(bad, 0).to(tl.int8))


@triton.jit
def _pv8_key(a):
    """The key stored at position ``a`` of a group of 32 (:class:`V8`). An fp8 product's A operand holds, per
    thread, 4 consecutive columns ``4 q .. 4 q + 3`` (and 16 further on); the score accumulator holds columns
    ``2 q, 2 q + 1`` of each 8. So position ``16 h + 4 q + 2 u + e`` takes key ``16 h + 8 u + 2 q + e``."""
    r = a % 32
    return a - r + (r // 16) * 16 + ((r % 4) // 2) * 8 + ((r % 16) // 4) * 2 + r % 2


@triton.jit
def _round_values(V, V_SCALE, VT, stride_b, stride_h, stride_s, H_KV, S_K, D, S_PAD,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key tile of V: each channel divided by its scale, rounded to e4m3 and stored transposed, keys in
    :func:`_pv8_key`'s order."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    pos = tl.arange(0, BLOCK_N)
    keys = tile * BLOCK_N + _pv8_key(pos)
    cols = tl.arange(0, BLOCK_D)
    valid = keys < S_K
    ptr = (V + (bh // H_KV).to(tl.int64) * stride_b + (bh % H_KV).to(tl.int64) * stride_h
           + keys[:, None].to(tl.int64) * stride_s + cols[None, :])
    x = tl.load(ptr, mask=valid[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    scale = tl.load(V_SCALE + bh.to(tl.int64) * D + cols, mask=cols < D, other=1.0)
    y = tl.where(tl.abs(x) < float("inf"), tl.math.div_rn(x, scale[None, :]), 0.0)
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    out = VT + bh.to(tl.int64) * D * S_PAD + cols[None, :].to(tl.int64) * S_PAD + (tile * BLOCK_N + pos)[:, None]
    tl.store(out, y.to(tl.float8e4nv), mask=(cols < D)[None, :])


def quantize_v(v: torch.Tensor, block_n: int) -> V8:
    """``v`` ``(B, H_kv, S_k, D)`` (unit stride along D) rounded for an fp8 P.V product with ``block_n``-key tiles
    (:class:`V8`)."""
    bsz, kv_heads, seq_k, dim = v.shape
    kt = -(-seq_k // block_n)
    block_d = triton.next_power_of_2(dim)
    dev = v.device
    chunks = -(-seq_k // _KEYS_PER_CHUNK)
    amax = torch.empty(bsz * kv_heads, chunks, block_d, device=dev)
    bad = torch.empty(bsz * kv_heads, chunks, dtype=torch.int32, device=dev)
    _value_absmax[(bsz * kv_heads, chunks)](v, amax, bad, v.stride(0), v.stride(1), v.stride(2), kv_heads, seq_k, dim,
                                            chunks, BLOCK_S=32, BLOCK_D=block_d, KEYS_PER_CHUNK=_KEYS_PER_CHUNK)
    v_scale = torch.empty(bsz, kv_heads, dim, device=dev)
    v_bad = torch.empty(bsz * kv_heads, dtype=torch.int8, device=dev)
    _value_scales[(bsz * kv_heads,)](amax, bad, v_scale, v_bad, chunks, dim, BLOCK_C=8, BLOCK_D=block_d)
    vt = torch.empty(bsz, kv_heads, dim, kt * block_n, dtype=torch.float8_e4m3fn, device=dev)
    _round_values[(kt, bsz * kv_heads)](v, v_scale, vt, v.stride(0), v.stride(1), v.stride(2), kv_heads, seq_k, dim,
                                        kt * block_n, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8)
    return V8(vt, v_scale, v_bad)


def quantize_qk(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, v8: V8 | None = None) -> QK8:
    """``q`` ``(B, H, S_q, D)`` and ``k`` ``(B, H_kv, S_k, D)`` (unit stride along D) rounded for the int8 kernels,
    with one scale per ``block_m`` query rows and per ``block_n`` keys (the skip state's tiles)."""
    bsz, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    qt, kt = -(-seq_q // block_m), -(-seq_k // block_n)
    block_d = triton.next_power_of_2(dim)
    dev = q.device
    chunks = -(-seq_k // _KEYS_PER_CHUNK)
    sums = torch.empty(bsz * kv_heads, chunks, block_d, device=dev)
    counts = torch.empty(bsz * kv_heads, chunks, dtype=torch.int32, device=dev)
    bad = torch.empty(bsz * kv_heads, chunks, dtype=torch.int32, device=dev)
    _key_sums[(bsz * kv_heads, chunks)](k, sums, counts, bad, k.stride(0), k.stride(1), k.stride(2), kv_heads, seq_k,
                                        dim, chunks, BLOCK_S=32, BLOCK_D=block_d, KEYS_PER_CHUNK=_KEYS_PER_CHUNK)
    mu = torch.empty(bsz * kv_heads, block_d, device=dev)
    head_bad = torch.empty(bsz * kv_heads, dtype=torch.int8, device=dev)
    _key_means[(bsz * kv_heads,)](sums, counts, bad, mu, head_bad, chunks, BLOCK_C=8, BLOCK_D=block_d)
    if v8 is not None:  # a non-finite value of V: its kv-head's query tiles compute in 16 bits (P.V as well)
        head_bad = head_bad | v8.bad
    out = QK8(torch.empty(bsz, heads, seq_q, dim, dtype=torch.int8, device=dev),
              torch.empty(bsz, kv_heads, seq_k, dim, dtype=torch.int8, device=dev),
              torch.empty(bsz, heads, qt, device=dev), torch.empty(bsz, kv_heads, kt, device=dev),
              torch.empty(bsz, heads, seq_q, device=dev), torch.empty(bsz, heads, qt, dtype=torch.int8, device=dev),
              v8)
    rows = min(max(_CHUNK_ELEMENTS // block_d, 1), block_m, block_n)
    _round_keys[(kt, bsz * kv_heads)](k, mu, out.k8, out.k_scale, k.stride(0), k.stride(1), k.stride(2), kv_heads,
                                      seq_k, dim, kt, BLOCK_N=block_n, BLOCK_D=block_d, ROWS=rows)
    _round_queries[(qt, bsz * heads)](q, mu, head_bad, out.q8, out.q_scale, out.shift, out.sixteen, q.stride(0),
                                      q.stride(1), q.stride(2), heads, heads // kv_heads, seq_q, dim, qt,
                                      BLOCK_M=block_m, BLOCK_D=block_d, ROWS=rows)
    return out
