"""The Hopper (sm90) kernel: warp-specialized, one persistent program per SM, written in Gluon (Triton's
explicit-layout dialect).

Same tile semantics as the portable kernel (:mod:`.portable`): a query tile walks its key tiles (the list, or every
tile by position in the full walk), marks the negligible ones and compacts the survivors into the next list. It is
scheduled the way FlashAttention-3 schedules Hopper, because the plain Triton loop runs one warpgroup at its
register limit and cannot overlap the softmax with tensor-core work (lab/kernel-notes.md, v5-v7). Each program
keeps three partitions alive over many work items (query tile x batch*head):

- a one-warp *producer* claims the next item from a global counter (heads in sequence, a head's query tiles in
  index order or, with ``USE_ORDER``, longest list first), loads the item's Q into one of two buffers and streams
  its K and V tiles by TMA into a ring of shared-memory stages guarded by mbarriers ("ready" when the bytes landed,
  "empty" when both consumers are done with them). It reads the next list entry one tile ahead, keeps the ring full
  across the item boundary, and between two copies compacts the previous item's survivors into the next list, 32
  entries at a time, while it would otherwise wait for a free stage;
- two *consumer* partitions (one warpgroup, 64 query rows each) issue tile t's Q·Kᵀ wgmma before the softmax of
  tile t, which then runs while P·V of tile t-1 is in flight; with ``PINGPONG`` the two take turns issuing their
  products, so one's softmax overlaps the other's tensor-core work. Each row ORs its detection bit of 32 tiles into
  a register word merged with atomics (as the portable kernel); each consumer normalises its rows and stores them
  through the Q buffer it just finished, released once the next item's Q has arrived;
- register budgets are split (``setmaxnreg``): the producer keeps few registers and the consumers get the rest,
  so the detection bits cost no spills.

With ``QK8`` (``qk_dtype="int8"``) Q and K arrive rounded to int8 (:mod:`.quant`): Q·Kᵀ is an integer wgmma whose
int32 scores, read as floats (:func:`_tile_scores`), are scaled by the query and key tiles' scales, the output
leaves through a bf16 buffer of its own, and the producer passes over query tiles flagged to compute in 16 bits,
which the launcher leaves to the portable kernel. With ``PV8`` (``pv_dtype="fp8"``, with ``QK8``) V arrives rounded to
float8 e4m3 and transposed (:func:`.quant.quantize_v`), P is scaled to e4m3's range through the exp2's bias and
reaches the fp8 P·V wgmma from the score registers without shuffles (:func:`_p_operand`), and each output channel is
multiplied by V's scale once per item.

Ordering within a consumer partition: its four warps issue the detection atomics and the two halves of the output
store, but one thread arrives on ``flags_bars`` and ``q_empty``; Triton precedes every ``mbarrier.arrive`` of a
multi-warp partition with a barrier over that partition's warps, which is what makes all warps' atomics and store
reads complete before the arrive (checked in the PTX of every tested Triton, tests/test_hopper_kernel.py).

Descriptors are built on the host over the whole ``(B, H, S, D)`` tensors (rank-4 TMA), so a program addresses any
head without creating descriptors on the device. Which settings a call uses (ring depth, registers, turn-taking,
row-max tree, lane sums, work order, program count) is :mod:`liteattn.kernels.dispatch`'s decision, carried by its
:class:`~liteattn.kernels.dispatch.KernelSpec`; this module only launches it.
"""
from __future__ import annotations

import functools
import math
from types import MappingProxyType

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._gluon import tma_load, tma_store
from .common import FULL_WALK, LOG2E, KernelCall, LaunchBuffers, sm_count
from .quant import FP8_MAX, QK8

__all__ = ["compile_offline", "launch"]

LOG2_FP8_MAX = gl.constexpr(math.log2(FP8_MAX.value))  # P's scale with PV8, as a bias of its exp2
# With QK8, Q·Kᵀ accumulates onto the int32 bits of 1.5 * 2^23 (_score_init, _tile_scores).
QK8_OFFSET = gl.constexpr(12582912.0)
QK8_OFFSET_BITS = gl.constexpr(0x4B400000)

# The producer's compaction: 32 list positions per step, one per lane of its single warp.
ONE_WARP = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _tile_at(idx_ptr, full_row, t, KT):
    """The key tile visited ``t``-th: ``t`` on a full row, else the list's entry. ``t`` is clamped to the list's
    buffer, so reading one entry ahead of the last one stays in bounds.

    A full row's list is not read at all (a uniform branch instead of a load): the consumers' ragged-tile check
    needs the index before each tile's scores and would otherwise wait for that load every tile (on an H200
    full-row calls ran 0-1 % faster, lab/kernel-notes.md v12)."""
    j = gl.to_tensor(t)
    if not full_row:
        j = gl.load(idx_ptr + gl.minimum(t, KT - 1)).to(gl.int32)
    return j


@gluon.jit
def _copy_when_free(desc, coord, ready, empty, dst, phase):
    """TMA-copy one tile into a ring stage once both consumers released it (``phase``: the pass over the ring).

    A fresh mbarrier is in phase 0, and waiting on parity 1 (the phase before it) returns at once: the first
    pass over the ring does not wait."""
    mbarrier.wait(empty, phase ^ 1)
    mbarrier.expect(ready, desc.block_type.nbytes)
    tma_load(desc, coord, ready, dst)


@gluon.jit
def _row_max(s, TREE: gl.constexpr, s_layout: gl.constexpr):
    """Row maxima of a score tile; with ``TREE`` each thread's columns are folded as a tree, not as one chain.

    Why: the softmax cannot start its exp2s before the max, and Triton folds a thread's columns of a row (32 at
    128-wide tiles) as one chain of dependent FMNMX (31 deep); halving the columns twice first (16 + 8
    independent FMNMX) leaves a chain of 7, for the same instruction count (at 64-wide tiles: 8 + 4, then 3)."""
    if not TREE:
        return gl.max(s, axis=1)
    ROWS: gl.constexpr = s.shape[0]
    N: gl.constexpr = s.shape[1]
    x = gl.max(gl.reshape(s, [ROWS, 2, N // 2]), axis=1)
    x = gl.max(gl.reshape(x, [ROWS, 2, N // 4]), axis=1)
    return gl.convert_layout(gl.max(x, axis=1), gl.SliceLayout(1, s_layout), assert_trivial=True)


@gluon.jit
def _lane_sums(p, LANE_SUMS: gl.constexpr):
    """Per-lane partial row sums of a P tile: shape (ROWS, 4), the four lanes that share a row in the wgmma
    layout each keep the sum of their own columns; or with ``LANE_SUMS`` off, full row sums (ROWS,).

    Why: a full row sum costs two shuffles and two adds per row and tile on top of the 31 in-thread adds; the
    row sum is only needed at the end, and the partials are rescaled by the same factor as the full sum, so
    the lanes are added once per query tile instead (FlashAttention-3 does the same)."""
    if LANE_SUMS:
        ROWS: gl.constexpr = p.shape[0]
        N: gl.constexpr = p.shape[1]
        # Column c = 8 k + 2 lane + e in the wgmma accumulator layout: k and e are register bits, lane the lane
        # within the row's quad. Summing over k and e stays inside the thread.
        sums = gl.sum(gl.sum(gl.reshape(p, [ROWS, N // 8, 4, 2]), axis=3), axis=1)
    else:
        sums = gl.sum(p, axis=1)
    return sums


@gluon.jit
def _rescaled_sums(l_i, alpha, part, LANE_SUMS: gl.constexpr):
    """``l_i * alpha + part`` for full row sums or lane partials (``alpha`` is per row)."""
    if LANE_SUMS:
        alpha = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, part.type.layout), assert_trivial=True), 1)
    return l_i * alpha + part


@gluon.jit
def _row_sums(l_i, row_layout: gl.constexpr, LANE_SUMS: gl.constexpr):
    """Full row sums from :func:`_lane_sums`' partials (the once-per-item quad reduction)."""
    if LANE_SUMS:
        l_i = gl.convert_layout(gl.sum(l_i, axis=1), row_layout, assert_trivial=True)
    return l_i


@gluon.jit
def _mask_columns(s, j, SEQ_K, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Key tile ``j``'s scores with -inf past ``SEQ_K``, in instructions the compiler may not move out of the branch
    that runs this on the last key tile only.

    Why: in the int8 build LLVM speculated that branch into two selects per score plus predicate copies on every
    tile, 130-200 instructions per tile (the 16-bit build keeps its branch). Assembly with side effects stays where
    it is written: the mask is an ``add.f32`` of 0 or -inf, and the tile index passes an opaque move, so that the
    column offsets are not hoisted out of the loop as invariants (kept live, they spilled registers)."""
    j = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [j], dtype=gl.int32, is_pure=False, pack=1)
    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s, add = gl.broadcast(s, gl.expand_dims(gl.where(cols < SEQ_K, 0.0, float("-inf")), 0))
    return gl.inline_asm_elementwise("add.f32 $0, $1, $2;", "=r,r,r", [s, add], dtype=gl.float32, is_pure=False,
                                     pack=1)


@gluon.jit
def _scores(s, t, j, m_i, bits, row_valid, flag_words, n_active, qk_scale, threshold, SEQ_K, KT,
            BLOCK_N: gl.constexpr, RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr, TREE_MAX: gl.constexpr,
            QK8: gl.constexpr, PV8: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax step on one raw score tile (the ``t``-th visited, key tile ``j``): mask, detection bits,
    new max, P in fp32, row scale. With ``QK8`` the raw scores carry :data:`QK8_OFFSET` (:func:`_tile_scores`),
    taken off the row maxima and folded into each row's exp2 bias. With ``PV8`` P is scaled by 448
    (:data:`.quant.FP8_MAX`, through the same bias: no multiply) to use the e4m3 range; the row sums carry the
    same factor, so it cancels."""
    if RAGGED_K:
        if j == KT - 1:  # only the last key tile has columns past SEQ_K
            if QK8:
                s = _mask_columns(s, j, SEQ_K, BLOCK_N, s_layout)
            else:
                cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                s = gl.where(gl.expand_dims(cols < SEQ_K, 0), s, float("-inf"))
    row_max = _row_max(s, TREE_MAX, s_layout)
    if QK8:
        row_max = row_max - QK8_OFFSET  # exact before the scale (one binade)
    tile_max = row_max * qk_scale
    if WRITE_STATE:
        # Per row, bit (t % 32) says "this tile is not negligible for me"; merged across rows in memory
        # once per 32 tiles (lab/kernel-notes.md, v5). Only a finite margin below the threshold finds the tile
        # negligible: a -inf tile max or a non-finite running max decides nothing (see liteattn.reference).
        margin = tile_max - m_i
        negligible = (margin < threshold) & (margin > float("-inf"))
        row_keep = (negligible == 0) & row_valid
        bits = bits | (row_keep.to(gl.int32) << (t % 32))
        if (t % 32 == 31) | (t == n_active - 1):
            word_ptrs = flag_words + t // 32 + gl.zeros_like(bits)
            gl.atomic_or(word_ptrs, bits, mask=bits != 0, sem="relaxed")
            bits = gl.zeros_like(bits)
    m_new = gl.maximum(m_i, tile_max)
    # A row whose scores so far are all -inf subtracts 0, not -inf (-inf - -inf is NaN): its weights stay 0 and a
    # later finite score counts as in dense attention.
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    bias = m_use
    if PV8:
        bias = m_use - LOG2_FP8_MAX
    if QK8:
        bias = gl.fma(gl.full_like(m_use, QK8_OFFSET), qk_scale, bias)
    p = gl.exp2(s * qk_scale - gl.expand_dims(bias, 1))
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, m_new, bits


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, PV8: gl.constexpr):
    """P as the A operand of P·V, from the score product's accumulator registers: a conversion in place; with
    ``PV8`` in fp16, which :func:`_fp8_operand` rounds to e4m3 where the product is issued.

    Why the order and the fp16 step: the fp8 operand takes 4 consecutive columns per thread where the accumulator
    holds pairs 8 apart, so P's columns are renamed to the order in which :func:`.quant.quantize_v` stores the keys
    of V, which makes the layout change a renaming of registers (checked at compile time), no shuffles between
    threads. And P crosses a loop iteration before its product: carried as single bytes, Triton takes every
    register apart and packs it again (about 200 more instructions per tile); fp16 pairs cross as whole registers."""
    if PV8:
        ROWS: gl.constexpr = p.shape[0]
        N: gl.constexpr = p.shape[1]
        # Column 32 b + 16 h + 8 u + 2 q + e goes to position 32 b + 16 h + 4 q + 2 u + e.
        p16 = gl.reshape(p.to(gl.float16), [ROWS, N // 32, 2, 2, 4, 2])
        p16 = gl.reshape(gl.permute(p16, [0, 1, 2, 4, 3, 5]), [ROWS, N])
        op = gl.convert_layout(p16, p_layout, assert_trivial=True)
    else:
        op = gl.convert_layout(p.to(dtype), p_layout)
    return op


@gluon.jit
def _fp8_operand(p_op, PV8: gl.constexpr):
    """:func:`_p_operand`'s P for the product: with ``PV8`` four fp16 columns rounded to e4m3 into one operand
    register (two paired conversions and a move)."""
    if PV8:
        p_op = gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f16x2 lo, $1; cvt.rn.satfinite.e4m3x2.f16x2 hi, $2; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r", [p_op], dtype=gl.float8e4nv, is_pure=True, pack=4)
    return p_op


@gluon.jit
def _v_operand(v_buf, PV8: gl.constexpr):
    """A V stage as P·V's B operand: ``(keys, D)`` as stored, or with ``PV8`` the transposed fp8 tile viewed so."""
    if PV8:
        v_buf = v_buf.permute((1, 0))
    return v_buf


@gluon.jit
def _tile_scale(qk_scale, k_scales, j, QK8: gl.constexpr):
    """The factor from a tile's raw scores to log2 units: ``qk_scale``, times key tile ``j``'s scale with ``QK8``
    (``qk_scale`` then already holds the query tile's; :mod:`liteattn.kernels.quant`)."""
    if QK8:
        qk_scale = qk_scale * gl.load(k_scales + j)
    return qk_scale


@gluon.jit
def _score_init(ROWS: gl.constexpr, BLOCK_N: gl.constexpr, QK8: gl.constexpr, s_layout: gl.constexpr):
    """What Q·Kᵀ accumulates onto: nothing (``use_acc=False``) in 16 bits; with ``QK8`` the int32 bits of
    :data:`QK8_OFFSET`, so that the integer sum ``d`` leaves the product as the bits of the float ``QK8_OFFSET + d``
    (:func:`_tile_scores`)."""
    if QK8:
        init = gl.full([ROWS, BLOCK_N], QK8_OFFSET_BITS, gl.int32, layout=s_layout)
    else:
        init = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    return init


@gluon.jit
def _tile_scores(s, QK8: gl.constexpr):
    """Raw scores in fp32. With ``QK8`` the product's int32 result, read as a float, is ``QK8_OFFSET + d`` exactly:
    ``|d| <= 127^2 * D < 2^22`` keeps every sum in the binade [2^23, 2^24), where a float's bits count its integers.

    Why not convert: a conversion per score (I2FP) sits on each score's dependency chain and cost 3 % of a dense
    call at head_dim 128 on an H200; converting by two adds cost 7 % (lab/kernel-notes.md, v17, v20). The offset
    costs a constant accumulator (register moves before the product, off the chain), and per row only: the row max
    subtracts it, and the exp2's bias absorbs it (:func:`_scores`)."""
    if QK8:
        s = s.to(gl.float32, bitcast=True)
    return s


@gluon.jit
def _compact_chunk(c, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW, KT,
                   BLOCK_C: gl.constexpr, c_layout: gl.constexpr):
    """List positions ``c .. c+BLOCK_C-1`` of one query tile: append the survivors (flagged, first visited or
    must-do; all of them where a consumer met a NaN or +inf score, :func:`_flag_nonfinite`) to the ``n_keep``
    already written to the next list, in visiting order; returns the new count."""
    offs_c = c + gl.arange(0, BLOCK_C, layout=c_layout)
    in_range = offs_c < n_active
    # Merged by the consumers' atomics at L2: read past L1.
    words = gl.load(FLAGS + state_off * NW + offs_c // 32, mask=in_range, other=0, cache_modifier=".cg")
    keep_all = gl.load(Q_PROT + pid_m).to(gl.int32) | gl.load(FLAGS + state_off * NW + NW - 1, cache_modifier=".cg")
    flag = (words >> (offs_c % 32)) & 1
    # A full row is visited in ascending order (the full walk, which reads no list, writes no state).
    listed = gl.load(KV_IDX + state_off * KT + offs_c, mask=in_range, other=0).to(gl.int32)
    ids = gl.where(n_active == KT, offs_c, listed)
    protected = (gl.load(K_PROT + ids, mask=in_range, other=0).to(gl.int32) | keep_all) != 0
    keep = in_range & ((flag != 0) | (offs_c == 0) | protected)
    keep_i = keep.to(gl.int32)
    pos = n_keep + gl.associative_scan(keep_i, 0, _add) - keep_i
    gl.store(NEXT_IDX + state_off * KT + pos, ids.to(gl.int16), mask=keep)
    return n_keep + gl.sum(keep_i, axis=0)


@gluon.jit
def _attend_tiles(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, g, idx_ptr, n_active,
                  full_row, flag_words, row_valid, acc, m_i, qk_scale, k_scales, threshold, SEQ_K, KT,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr,
                  TURN: gl.constexpr, PINGPONG: gl.constexpr, TREE_MAX: gl.constexpr, LANE_SUMS: gl.constexpr,
                  QK8: gl.constexpr, PV8: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """One consumer's rows over a query tile's ``n_active`` (> 0) listed key tiles; returns acc, m, l.

    Q·Kᵀ of tile t is issued before the softmax of tile t runs behind P·V of tile t-1 (FA3's
    intra-warpgroup overlap). With ``PINGPONG``, two consumers take turns issuing their tensor-core work, so
    one's softmax runs while the other's products do. Ring stages and barrier phases count from ``g``, the
    tiles this program consumed before; every stage is released. With ``QK8`` the scores are int8 products
    (:func:`_tile_scores`), ``qk_scale`` includes the query tile's scale and ``k_scales`` points at the kv-head's."""
    ROWS: gl.constexpr = q_rows.shape[0]
    dtype: gl.constexpr = v_bufs.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4 if PV8 else 2)
    s_init = _score_init(ROWS, BLOCK_N, QK8, s_layout)
    bits = gl.zeros([ROWS], gl.int32, layout=gl.SliceLayout(1, s_layout))
    # Tile 0: no P·V to overlap yet.
    stage = g % STAGES
    if PINGPONG:
        mbarrier.wait(turn_bars.index(TURN), (g & 1) ^ TURN ^ 1)
    mbarrier.wait(k_ready.index(stage), (g // STAGES) & 1)
    s_tok = warpgroup_mma(q_rows, k_bufs.index(stage).permute((1, 0)), s_init, use_acc=QK8, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
    j = 0
    if RAGGED_K or QK8:  # the ragged-tile check and the key tile's scale need the tile's index
        j = _tile_at(idx_ptr, full_row, 0, KT)
    tile_scale = _tile_scale(qk_scale, k_scales, j, QK8)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, alpha, m_i, bits = _scores(_tile_scores(s, QK8), 0, j, m_i, bits, row_valid, flag_words, n_active, tile_scale,
                                  threshold, SEQ_K, KT, BLOCK_N, RAGGED_K, WRITE_STATE, TREE_MAX, QK8, PV8,
                                  s_layout)
    l_part = _lane_sums(p, LANE_SUMS)
    p_op = _p_operand(p, dtype, p_layout, PV8)
    for t in range(1, n_active):
        gt = g + t
        stage = gt % STAGES
        prev = (gt - 1) % STAGES
        j = t
        if RAGGED_K or QK8:  # read tile t's list entry (and scale) before the waits, not after the scores arrive
            j = _tile_at(idx_ptr, full_row, t, KT)
        tile_scale = _tile_scale(qk_scale, k_scales, j, QK8)
        if PINGPONG:  # consumer TURN issues its t-th products after the other one issued theirs
            mbarrier.wait(turn_bars.index(TURN), (gt & 1) ^ TURN ^ 1)
        mbarrier.wait(k_ready.index(stage), (gt // STAGES) & 1)
        s_tok = warpgroup_mma(q_rows, k_bufs.index(stage).permute((1, 0)), s_init, use_acc=QK8, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((gt - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(_fp8_operand(p_op, PV8), _v_operand(v_bufs.index(prev), PV8), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(stage), count=1)
        p, alpha, m_i, bits = _scores(_tile_scores(s, QK8), t, j, m_i, bits, row_valid, flag_words, n_active,
                                      tile_scale, threshold, SEQ_K, KT, BLOCK_N, RAGGED_K, WRITE_STATE, TREE_MAX,
                                      QK8, PV8, s_layout)
        l_part = _rescaled_sums(l_part, alpha, _lane_sums(p, LANE_SUMS), LANE_SUMS)
        acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = _p_operand(p, dtype, p_layout, PV8)
    last_g = g + n_active - 1
    last = last_g % STAGES
    mbarrier.wait(v_ready.index(last), (last_g // STAGES) & 1)
    o_tok = warpgroup_mma(_fp8_operand(p_op, PV8), _v_operand(v_bufs.index(last), PV8), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    mbarrier.arrive(v_empty.index(last), count=1)
    return acc, m_i, _row_sums(l_part, gl.SliceLayout(1, s_layout), LANE_SUMS)


@gluon.jit
def _max_keep_nan(a, b):
    return gl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@gluon.jit
def _decide(s, t, m_i, row_valid, protected, qk_scale, threshold, SEQ_K, KT, BLOCK_N: gl.constexpr,
            RAGGED_K: gl.constexpr, s_layout: gl.constexpr):
    """Skip-softmax's decision on one raw score tile (the ``t``-th, key tile ``t`` of the full walk): returns the
    masked scores, their scaled row maxima and whether the tile is used. It is used unless every valid row's finite
    margin is below the threshold; the first tile and ``protected`` (must-do) ones always are."""
    if RAGGED_K:
        if t == KT - 1:  # only the last key tile has columns past SEQ_K
            cols = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < SEQ_K, 0), s, float("-inf"))
    # A NaN score must reach the decision: the row max keeps it (gl.max would drop it), its margin is NaN and the
    # tile is used, so the row is NaN as in dense attention (and every later margin of the row, through m_i).
    tile_max = gl.reduce(s, 1, _max_keep_nan) * qk_scale
    margin = tile_max - m_i
    negligible = (margin < threshold) & (margin > float("-inf"))
    # One decision for the partition's rows: a reduction over its warps.
    keeps = gl.max(((negligible == 0) & row_valid).to(gl.int32), axis=0)
    return s, tile_max, (keeps != 0) | (t == 0) | protected


@gluon.jit
def _softmax_tile(s, tile_max, m_i, qk_scale):
    """P of a used tile in fp32, its row scale and the new running max (as :func:`_scores`)."""
    m_new = _max_keep_nan(m_i, tile_max)  # NaN once the row met a NaN score (see _decide)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    return gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1)), gl.exp2(m_i - m_use), m_new


@gluon.jit
def _take(p, alpha, acc, l_part, dtype: gl.constexpr, LANE_SUMS: gl.constexpr, p_layout: gl.constexpr,
          o_layout: gl.constexpr):
    """Fold a used tile's P into the row sums, rescale the accumulator (no P·V in flight) and make P the next P·V's
    operand."""
    l_part = _rescaled_sums(l_part, alpha, _lane_sums(p, LANE_SUMS), LANE_SUMS)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    return acc, l_part, gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _attend_tiles_per_call(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, g, n_active,
                           row_valid, q_protected, K_PROT, acc, m_i, qk_scale, threshold, SEQ_K, KT,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, RAGGED_K: gl.constexpr, TURN: gl.constexpr,
                           PINGPONG: gl.constexpr, LANE_SUMS: gl.constexpr, s_layout: gl.constexpr,
                           o_layout: gl.constexpr):
    """:func:`_attend_tiles` with the skip-softmax rule and nothing carried: every key tile's Q·Kᵀ is computed, and
    the softmax and P·V only of the tiles :func:`_decide` uses (P·V one tile behind, overlapping the next tile's
    softmax, as there). The ring's stages are waited for and released as there, used or not, so the producer's
    copies stay in step. P never leaves the branch that computed it (yielding it from both sides of a branch
    spilled registers). Returns acc, m, l and the number of tiles used."""
    ROWS: gl.constexpr = q_rows.shape[0]
    dtype: gl.constexpr = q_rows.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    stage = g % STAGES
    if PINGPONG:
        mbarrier.wait(turn_bars.index(TURN), (g & 1) ^ TURN ^ 1)
    mbarrier.wait(k_ready.index(stage), (g // STAGES) & 1)
    s_tok = warpgroup_mma(q_rows, k_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    s, tile_max, used = _decide(s, 0, m_i, row_valid, q_protected, qk_scale, threshold, SEQ_K, KT, BLOCK_N, RAGGED_K,
                                s_layout)  # the first tile is always used
    p, alpha, m_i = _softmax_tile(s, tile_max, m_i, qk_scale)
    l_part = _lane_sums(p, LANE_SUMS)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    n_used = gl.to_tensor(1)
    for t in range(1, n_active):
        gt = g + t
        stage = gt % STAGES
        prev = (gt - 1) % STAGES
        protected = q_protected | (gl.load(K_PROT + t) != 0)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(TURN), (gt & 1) ^ TURN ^ 1)
        mbarrier.wait(k_ready.index(stage), (gt // STAGES) & 1)
        s_tok = warpgroup_mma(q_rows, k_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        # V of the previous tile must have landed before its stage is released, used or not (its barrier's phase).
        mbarrier.wait(v_ready.index(prev), ((gt - 1) // STAGES) & 1)
        if used:  # P·V of the previous tile runs behind this tile's softmax
            o_tok = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(stage), count=1)
            s, tile_max, use = _decide(s, t, m_i, row_valid, protected, qk_scale, threshold, SEQ_K, KT, BLOCK_N,
                                       RAGGED_K, s_layout)
            if use:
                p, alpha, m_i = _softmax_tile(s, tile_max, m_i, qk_scale)
                acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
                acc, l_part, p_op = _take(p, alpha, acc, l_part, dtype, LANE_SUMS, p_layout, o_layout)
            else:
                acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        else:
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
            s = warpgroup_mma_wait(0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(stage), count=1)
            s, tile_max, use = _decide(s, t, m_i, row_valid, protected, qk_scale, threshold, SEQ_K, KT, BLOCK_N,
                                       RAGGED_K, s_layout)
            if use:
                p, alpha, m_i = _softmax_tile(s, tile_max, m_i, qk_scale)
                acc, l_part, p_op = _take(p, alpha, acc, l_part, dtype, LANE_SUMS, p_layout, o_layout)
        mbarrier.arrive(v_empty.index(prev), count=1)
        n_used += use.to(gl.int32)
        used = use
    last_g = g + n_active - 1
    last = last_g % STAGES
    mbarrier.wait(v_ready.index(last), (last_g // STAGES) & 1)
    if used:
        o_tok = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    mbarrier.arrive(v_empty.index(last), count=1)
    return acc, m_i, _row_sums(l_part, gl.SliceLayout(1, s_layout), LANE_SUMS), n_used


@gluon.jit
def _normalize(acc, m_i, l_i, o_layout: gl.constexpr):
    """Output rows (acc / l) and their natural-log LSE: zero and -inf where nothing was attended (an empty list,
    or every score -inf, as SDPA), NaN where the sum is NaN (a NaN or +inf score, as SDPA)."""
    has_mass = l_i != 0  # True for NaN
    safe_l = gl.where(has_mass, l_i, 1.0)
    inv_l = gl.convert_layout(gl.where(has_mass, 1.0 / safe_l, 0.0), gl.SliceLayout(1, o_layout))
    lse = gl.where(has_mass, (m_i + gl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
    return acc * gl.expand_dims(inv_l, 1), lse


@gluon.jit
def _flag_nonfinite(flag_words, NW, l_i, row_valid):
    """Rows whose sum is NaN met a NaN or +inf score: set the query tile's last flag word (one past its tile
    bits), so the compaction keeps the whole list and no skip decision made from such scores is carried."""
    bad = ((l_i != l_i) & row_valid).to(gl.int32)
    gl.atomic_or(flag_words + (NW - 1) + gl.zeros_like(bad), bad, mask=bad != 0, sem="relaxed")


@gluon.jit
def _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, FULL_WALK: gl.constexpr, USE_ORDER: gl.constexpr):
    """Work item ``w`` (heads in sequence, query tiles of a head in launch order) -> its coordinates."""
    pid_bh = w // QT
    if USE_ORDER:
        pid_m = gl.load(ORDER + w)
    else:
        pid_m = w % QT
    state_off = pid_bh.to(gl.int64) * QT + pid_m
    if FULL_WALK:  # every tile by position: the lists are not read
        n_active = KT
    else:
        n_active = gl.load(KV_COUNT + state_off)
    b = pid_bh // H
    h = pid_bh % H
    return b, h, h // GROUP, pid_bh, pid_m, state_off, n_active


@gluon.jit
def _compact_rest(c0, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW,
                  KT):
    """The item's list from position ``c0`` on (one warp, in visiting order), then its count."""
    for c in range(c0, n_active, 32):
        n_keep = _compact_chunk(c, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW,
                                KT, 32, ONE_WARP)
    gl.store(NEXT_COUNT + state_off, n_keep)


@gluon.jit
def _compact_item(w, i, flags_bars, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW, H,
                  GROUP, QT, KT, FULL_WALK: gl.constexpr, USE_ORDER: gl.constexpr):
    """Compact this program's ``i``-th item (work index ``w``) once both consumers' atomics are issued."""
    _, _, _, _, pid_m, state_off, n_active = _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, FULL_WALK, USE_ORDER)
    mbarrier.wait(flags_bars.index(i % 2), (i // 2) & 1)
    _compact_rest(0, gl.to_tensor(0), state_off, pid_m, n_active, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, FLAGS,
                  NW, KT)


@gluon.jit
def _claim(COUNTER, SIXTEEN, ORDER, QT, n_items, USE_ORDER: gl.constexpr, QK8: gl.constexpr):
    """The next work item of the dynamic schedule (``n_items`` or past it: none left). With ``QK8`` an item whose
    query tile computes in 16 bits (``SIXTEEN``, :mod:`liteattn.kernels.quant`) is passed over: the launcher leaves
    those to the portable kernel, which reads the unrounded inputs."""
    w = gl.atomic_add(COUNTER, 1, sem="relaxed")
    if QK8:
        while _in_sixteen(w, SIXTEEN, ORDER, QT, n_items, USE_ORDER):
            w = gl.atomic_add(COUNTER, 1, sem="relaxed")
    return w


@gluon.jit
def _in_sixteen(w, SIXTEEN, ORDER, QT, n_items, USE_ORDER: gl.constexpr):
    """Whether work item ``w`` exists and its query tile is flagged to compute in 16 bits."""
    last = gl.minimum(w, n_items - 1)
    pid_m = last % QT
    if USE_ORDER:
        pid_m = gl.load(ORDER + last)
    return (w < n_items) & (gl.load(SIXTEEN + (last // QT).to(gl.int64) * QT + pid_m) != 0)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, item_ids, k_ready, v_ready,
              k_empty, v_empty, flags_bars, COUNTER, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT,
              FLAGS, SIXTEEN, NW, H, GROUP, QT, KT, n_items,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
              FULL_WALK: gl.constexpr, WRITE_STATE: gl.constexpr, USE_ORDER: gl.constexpr, QK8: gl.constexpr,
              PV8: gl.constexpr):
    """Q of each item (two buffers), then its K/V tiles into the ring (V transposed with ``PV8``); then the
    previous item's compaction."""
    id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    g = 0  # tiles issued so far by this program: ring position and phase
    i = 0  # items so far
    prev_w = 0
    w = _claim(COUNTER, SIXTEEN, ORDER, QT, n_items, USE_ORDER, QK8)  # dynamic: a free program takes the next item
    while w < n_items:
        b, h, hk, pid_bh, pid_m, state_off, n_active = _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, FULL_WALK,
                                                             USE_ORDER)
        qb = i % 2
        mbarrier.wait(q_empty.index(qb), ((i // 2) & 1) ^ 1)
        # The consumers learn the item from the slot beside its Q buffer, published by the barrier's arrive.
        item_ids.index(qb).store(gl.full([1], w, gl.int32, layout=id_layout))
        mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
        for half in gl.static_range(2):
            tma_load(q_desc, [b, h, pid_m * (2 * ROWS) + half * ROWS, 0],
                                            q_ready.index(qb),
                                            q_bufs.index(2 * qb + half).reshape([1, 1, ROWS, BLOCK_D]))
        full_row = n_active == KT
        idx_ptr = KV_IDX + state_off * KT
        # The previous item's list is compacted 32 entries at a time between this item's copies, from the
        # STAGES-th on (by then both consumers have finished the previous item), so the ring never drains.
        _, _, _, _, prev_m, prev_off, prev_n = _item(prev_w, ORDER, KV_COUNT, H, GROUP, QT, KT, FULL_WALK, USE_ORDER)
        n_keep = gl.to_tensor(0)
        c = gl.to_tensor(0)
        j_next = _tile_at(idx_ptr, full_row, 0, KT)
        for t in range(n_active):
            # Tile t+1's list entry is read before waiting for tile t's stage, so its latency hides behind the wait
            # instead of delaying the copy (the ring is only 2 deep at 128x128 tiles, head_dim 128).
            j = j_next
            j_next = _tile_at(idx_ptr, full_row, t + 1, KT)
            stage = g % STAGES
            phase = (g // STAGES) & 1
            _copy_when_free(k_desc, [b, hk, j * BLOCK_N, 0], k_ready.index(stage), k_empty.index(stage),
                            k_bufs.index(stage).reshape([1, 1, BLOCK_N, BLOCK_D]), phase)
            if PV8:
                _copy_when_free(v_desc, [b, hk, 0, j * BLOCK_N], v_ready.index(stage), v_empty.index(stage),
                                v_bufs.index(stage).reshape([1, 1, BLOCK_D, BLOCK_N]), phase)
            else:
                _copy_when_free(v_desc, [b, hk, j * BLOCK_N, 0], v_ready.index(stage), v_empty.index(stage),
                                v_bufs.index(stage).reshape([1, 1, BLOCK_N, BLOCK_D]), phase)
            g += 1
            if WRITE_STATE:
                if (t >= STAGES - 1) & (i > 0) & (c < prev_n):
                    if c == 0:
                        mbarrier.wait(flags_bars.index((i - 1) % 2), ((i - 1) // 2) & 1)
                    n_keep = _compact_chunk(c, n_keep, prev_off, prev_m, prev_n, KV_IDX, NEXT_IDX, Q_PROT, K_PROT,
                                            FLAGS, NW, KT, 32, ONE_WARP)
                    c += 32
        # The ring is as full as it gets: claim the next item and finish the previous one's list.
        w_next = _claim(COUNTER, SIXTEEN, ORDER, QT, n_items, USE_ORDER, QK8)
        if WRITE_STATE:
            if i > 0:
                if c == 0:  # no chunk done yet (short item or empty list): its flags are not waited for yet
                    mbarrier.wait(flags_bars.index((i - 1) % 2), ((i - 1) // 2) & 1)
                _compact_rest(c, n_keep, prev_off, prev_m, prev_n, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT,
                              FLAGS, NW, KT)
            prev_w = w
        i += 1
        w = w_next
    # No items left: an id past the end, with a plain arrive instead of a Q copy, tells the consumers to stop.
    qb = i % 2
    mbarrier.wait(q_empty.index(qb), ((i // 2) & 1) ^ 1)
    item_ids.index(qb).store(gl.full([1], n_items, gl.int32, layout=id_layout))
    mbarrier.arrive(q_ready.index(qb), count=1)
    if WRITE_STATE:
        if i > 0:
            _compact_item(prev_w, i - 1, flags_bars, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT,
                          FLAGS, NW, H, GROUP, QT, KT, FULL_WALK, USE_ORDER)


@gluon.jit
def _consumer(o_desc, q_bufs, o_bufs, q_ready, q_empty, item_ids, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
              turn_bars, flags_bars, ORDER, KV_COUNT, KV_IDX, FLAGS, NW, LSE, NEXT_COUNT, Q_PROT, K_PROT, Q_SCALE,
              K_SCALE, V_SCALE, H, GROUP, SEQ_Q, SEQ_K, QT, KT, n_items, qk_scale, threshold,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
              FULL_WALK: gl.constexpr, RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr, RETURN_LSE: gl.constexpr,
              USE_ORDER: gl.constexpr, TURN: gl.constexpr, PINGPONG: gl.constexpr, TREE_MAX: gl.constexpr,
              LANE_SUMS: gl.constexpr, PER_CALL: gl.constexpr, QK8: gl.constexpr, PV8: gl.constexpr):
    """Rows ``TURN * ROWS`` to ``(TURN + 1) * ROWS`` of every item's query tile
    (:func:`_attend_tiles`, ring and turn phases counted over the whole program), then
    their output and LSE. With ``PER_CALL`` (:func:`_attend_tiles_per_call`) these rows are one query tile of the
    call (the skip decision's granularity), whose used-tile count goes to ``NEXT_COUNT``. With ``QK8`` the Q
    buffers hold int8 rows and the output leaves through ``o_bufs`` (one per consumer) instead."""
    NUM_WARPS: gl.constexpr = ROWS // 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 32 if QK8 else 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_D, 32 if PV8 else 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = o_desc.dtype
    id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    g = 0
    i = 0
    mbarrier.wait(q_ready.index(0), 0)
    w = gl.max(item_ids.index(0).load(id_layout), axis=0)
    while w < n_items:
        b, h, hk, pid_bh, pid_m, state_off, n_active = _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, FULL_WALK,
                                                             USE_ORDER)
        full_row = n_active == KT
        idx_ptr = KV_IDX + state_off * KT
        flag_words = FLAGS + state_off * NW
        row0 = pid_m * (2 * ROWS) + TURN * ROWS
        offs_m = row0 + gl.arange(0, ROWS, layout=row_layout)
        row_valid = offs_m < SEQ_Q
        qb = i % 2
        q_rows = q_bufs.index(2 * qb + TURN)
        acc = gl.zeros([ROWS, BLOCK_D], gl.float32, layout=o_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
        if PER_CALL:
            tiles = (SEQ_Q + ROWS - 1) // ROWS  # the call's query tiles per head: ROWS rows each
            tile = pid_m * 2 + TURN
            q_protected = gl.load(Q_PROT + gl.minimum(tile, tiles - 1)) != 0
            acc, m_i, l_i, n_used = _attend_tiles_per_call(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                                                           turn_bars, g, n_active, row_valid, q_protected, K_PROT,
                                                           acc, m_i, qk_scale, threshold, SEQ_K, KT, BLOCK_N, STAGES,
                                                           RAGGED_K, TURN, PINGPONG, LANE_SUMS, s_layout, o_layout)
            if tile < tiles:
                gl.store(NEXT_COUNT + pid_bh.to(gl.int64) * tiles + tile, n_used)
        elif n_active > 0:
            scale = qk_scale
            k_scales = K_SCALE
            if QK8:  # the query tile's scale, and the key tiles' of its kv-head
                scale = qk_scale * gl.load(Q_SCALE + state_off)
                k_scales = K_SCALE + (b * (H // GROUP) + hk).to(gl.int64) * KT
            acc, m_i, l_i = _attend_tiles(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, g,
                                          idx_ptr, n_active, full_row, flag_words, row_valid, acc, m_i,
                                          scale, k_scales, threshold, SEQ_K, KT, BLOCK_N, STAGES, RAGGED_K,
                                          WRITE_STATE, TURN, PINGPONG, TREE_MAX, LANE_SUMS, QK8, PV8, s_layout,
                                          o_layout)
        if WRITE_STATE:  # this consumer's detection atomics for the item are issued
            _flag_nonfinite(flag_words, NW, l_i, row_valid)
            mbarrier.arrive(flags_bars.index(i % 2), count=1)

        out, lse = _normalize(acc, m_i, l_i, o_layout)
        if PV8:  # P carried a factor 448 into its sums; each channel of V its scale
            lse = lse - LOG2_FP8_MAX * 0.6931471805599453
            cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, o_layout))
            v_scale = gl.load(V_SCALE + (b * (H // GROUP) + hk).to(gl.int64) * BLOCK_D + cols)
            out = out * gl.expand_dims(v_scale, 0)
        if QK8:
            o_rows = o_bufs.index(TURN)
        else:
            o_rows = q_rows
        o_rows.store(out.to(dtype))
        fence_async_shared()
        tma_store(o_desc, [b, h, row0, 0], o_rows.reshape([1, 1, ROWS, BLOCK_D]))
        if RETURN_LSE:
            gl.store(LSE + pid_bh.to(gl.int64) * SEQ_Q + offs_m, lse, mask=row_valid)
        g += n_active
        i += 1
        # The next item (or the stop signal); then this item's Q buffer goes back once its output has left it.
        mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
        tma.store_wait(0)
        mbarrier.arrive(q_empty.index(qb), count=1)
        w = gl.max(item_ids.index(i % 2).load(id_layout), axis=0)


@gluon.jit
def _lite_attention_fwd_sm90_persistent(
    q_desc, k_desc, v_desc, o_desc, LSE,
    KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, ORDER, FLAGS, NW, COUNTER, Q_SCALE, K_SCALE, V_SCALE,
    SIXTEEN,
    H, GROUP, SEQ_Q, SEQ_K, QT, KT, n_items,
    qk_scale, threshold,
    BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    FULL_WALK: gl.constexpr, WRITE_STATE: gl.constexpr, RETURN_LSE: gl.constexpr,
    RAGGED_K: gl.constexpr, USE_ORDER: gl.constexpr, PINGPONG: gl.constexpr, TREE_MAX: gl.constexpr,
    LANE_SUMS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PER_CALL: gl.constexpr = False, QK8: gl.constexpr = False,
    PV8: gl.constexpr = False,
):
    dtype: gl.constexpr = o_desc.dtype
    v_dtype: gl.constexpr = v_desc.dtype  # float8 e4m3 with PV8 (V rounded and transposed by the launcher)
    qk_dtype: gl.constexpr = q_desc.dtype  # int8 with QK8 (Q and K rounded by the launcher)
    ROWS: gl.constexpr = BLOCK_M // 2
    NUM_WARPS: gl.constexpr = ROWS // 16
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_D], qk_dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], qk_dtype)
    if PV8:
        v_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_D, BLOCK_N], v_dtype)
        v_bufs = gl.allocate_shared_memory(v_dtype, [STAGES, BLOCK_D, BLOCK_N], v_layout)
    else:
        v_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], v_dtype)
        v_bufs = gl.allocate_shared_memory(v_dtype, [STAGES, BLOCK_N, BLOCK_D], v_layout)
    # Two Q buffers of two halves (one per consumer); a half also stages that consumer's output, or with QK8 (int8
    # rows) a buffer of its own does.
    q_bufs = gl.allocate_shared_memory(qk_dtype, [4, ROWS, BLOCK_D], q_layout)
    if QK8:
        o_bufs = gl.allocate_shared_memory(dtype, [2, ROWS, BLOCK_D],
                                           gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_D], dtype))
    else:
        o_bufs = q_bufs
    k_bufs = gl.allocate_shared_memory(qk_dtype, [STAGES, BLOCK_N, BLOCK_D], k_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    flags_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    item_ids = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for x in gl.static_range(2):
        mbarrier.init(q_ready.index(x), count=1)
        mbarrier.init(q_empty.index(x), count=2)
        mbarrier.init(flags_bars.index(x), count=2)
        mbarrier.init(turn_bars.index(x), count=1)
    for x in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(x), count=1)
        mbarrier.init(v_ready.index(x), count=1)
        mbarrier.init(k_empty.index(x), count=2)
        mbarrier.init(v_empty.index(x), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (o_desc, q_bufs, o_bufs, q_ready, q_empty, item_ids, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                     v_empty, turn_bars, flags_bars, ORDER, KV_COUNT, KV_IDX, FLAGS, NW, LSE, NEXT_COUNT, Q_PROT,
                     K_PROT, Q_SCALE, K_SCALE, V_SCALE, H, GROUP, SEQ_Q, SEQ_K, QT, KT, n_items, qk_scale, threshold,
                     ROWS,
                     BLOCK_N, BLOCK_D, STAGES, FULL_WALK, RAGGED_K, WRITE_STATE, RETURN_LSE, USE_ORDER, 0, PINGPONG,
                     TREE_MAX, LANE_SUMS, PER_CALL, QK8, PV8)),
        (_consumer, (o_desc, q_bufs, o_bufs, q_ready, q_empty, item_ids, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                     v_empty, turn_bars, flags_bars, ORDER, KV_COUNT, KV_IDX, FLAGS, NW, LSE, NEXT_COUNT, Q_PROT,
                     K_PROT, Q_SCALE, K_SCALE, V_SCALE, H, GROUP, SEQ_Q, SEQ_K, QT, KT, n_items, qk_scale, threshold,
                     ROWS,
                     BLOCK_N, BLOCK_D, STAGES, FULL_WALK, RAGGED_K, WRITE_STATE, RETURN_LSE, USE_ORDER, 1, PINGPONG,
                     TREE_MAX, LANE_SUMS, PER_CALL, QK8, PV8)),
        (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, item_ids, k_ready, v_ready,
                     k_empty, v_empty, flags_bars, COUNTER, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT,
                     K_PROT, FLAGS, SIXTEEN, NW, H, GROUP, QT, KT, n_items, ROWS, BLOCK_N, BLOCK_D, STAGES, FULL_WALK,
                     WRITE_STATE, USE_ORDER, QK8, PV8)),
    ], [NUM_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


_GL_DTYPES = MappingProxyType({torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.int8: gl.int8,
                                torch.float8_e4m3fn: gl.float8e4nv})


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, dim: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of one ``rows`` x ``dim`` tile, built once per shape: Gluon derives it anew on
    every request, which took a quarter of the persistent launch's host time (four descriptors per call)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, dim], _GL_DTYPES[dtype])


def _descriptor(x: torch.Tensor, rows: int, cols: int | None = None) -> TensorDescriptor:
    """Rank-4 ``(B, H, S, D)`` descriptor over any TMA-ready strides; one tile is ``rows`` x D of one head (``rows``
    x ``cols`` of a transposed V, whose last dimension is the keys)."""
    cols = x.shape[-1] if cols is None else cols
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, cols], _tile_layout(rows, cols, x.dtype))



def launch(spec, call: KernelCall, buffers: LaunchBuffers, order: torch.Tensor | None, qk8: QK8 | None = None) -> None:
    """Run the kernel on one call as ``spec`` (an ``"sm90"`` :class:`~liteattn.kernels.dispatch.KernelSpec`) says:
    ``spec.max_programs`` programs, or one per SM (fewer when there are fewer work items), claiming each head's
    query tiles in ``order`` (:func:`.common.launch_order`; None: index order). The last word of the zeroed flags
    buffer is the work counter of the dynamic schedule.

    With ``spec.qk8``, ``qk8`` holds Q and K rounded for this spec's tiles (:func:`.quant.quantize_qk`); query tiles
    it flags to compute in 16 bits are left untouched (output, LSE and next list) for the caller to run, and the
    caller adds the rows' smoothing shift to the LSE."""
    q, k, v, out, flags = buffers.q, buffers.k, buffers.v, buffers.out, buffers.flags
    if spec.qk8 != (qk8 is not None):
        raise ValueError(f"qk8: expected the rounded Q and K exactly when spec.qk8 (spec.qk8={spec.qk8}), got "
                         f"{type(qk8).__name__}")
    q_in, k_in = (qk8.q8, qk8.k8) if qk8 is not None else (q, k)
    if spec.pv8 != (qk8 is not None and qk8.v8 is not None):
        raise ValueError(f"qk8: expected V rounded exactly when spec.pv8 (spec.pv8={spec.pv8})")
    bsz, nheads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    rows, item_rows = _rows(spec)
    items_per_head = -(-seq_q // item_rows)
    n_items = bsz * nheads * items_per_head
    programs = sm_count(q.device) if spec.max_programs is None else spec.max_programs
    _lite_attention_fwd_sm90_persistent[(min(n_items, programs),)](
        q_desc=_descriptor(q_in, rows), k_desc=_descriptor(k_in, spec.block_n),
        v_desc=_descriptor(qk8.v8.vt, dim, spec.block_n) if spec.pv8 else _descriptor(v, spec.block_n),
        o_desc=_descriptor(out, rows), LSE=buffers.lse,
        KV_COUNT=call.kv_num_blocks, KV_IDX=call.kv_indices, NEXT_COUNT=call.next_num_blocks,
        NEXT_IDX=call.next_indices, Q_PROT=call.q_protect, K_PROT=call.k_protect,
        ORDER=call.kv_num_blocks if order is None else order,  # a placeholder the kernel does not read
        FLAGS=flags, NW=buffers.n_words, COUNTER=flags[flags.numel() - 1:],
        Q_SCALE=qk8.q_scale if qk8 else flags, K_SCALE=qk8.k_scale if qk8 else flags,  # placeholders without qk8
        V_SCALE=qk8.v8.v_scale if spec.pv8 else flags,
        SIXTEEN=qk8.sixteen if qk8 else call.q_protect,
        H=nheads, GROUP=nheads // k.shape[1], SEQ_Q=seq_q, SEQ_K=seq_k, QT=items_per_head, KT=buffers.kt,
        n_items=n_items, qk_scale=call.scale * LOG2E, threshold=call.threshold,
        BLOCK_D=dim, BLOCK_M=item_rows, BLOCK_N=spec.block_n, STAGES=spec.stages,
        FULL_WALK=spec.walk == FULL_WALK, WRITE_STATE=call.write_state, RETURN_LSE=call.return_lse,
        RAGGED_K=seq_k % spec.block_n != 0, USE_ORDER=order is not None, PINGPONG=spec.pingpong,
        TREE_MAX=spec.tree_max, LANE_SUMS=spec.lane_sums,
        PRODUCER_REGS=spec.regs[0], CONSUMER_REGS=spec.regs[1], PER_CALL=spec.per_call, QK8=spec.qk8, PV8=spec.pv8,
        num_warps=item_rows // 32, maxnreg=spec.max_regs, enable_fp_fusion=spec.fp_fusion,
    )


def _rows(spec) -> tuple[int, int]:
    """(rows of one consumer, rows of one work item). An item is two consumers' rows: a 128-row query tile of the
    state, or with ``spec.per_call`` two 64-row query tiles of the call, one per consumer (the skip decision is
    each consumer's own, without a handoff between them)."""
    if spec.per_call:
        return spec.block_m, 2 * spec.block_m
    return spec.block_m // 2, spec.block_m


def compile_offline(spec, *, head_dim: int, write_state: bool = True, return_lse: bool = True, ragged: bool = True,
                    use_order: bool = False, dtype: str = "bf16"):
    """Compile one specialization of the kernel for sm90a without a GPU (Triton's bundled assembler), for compiler
    reports, code comparisons and the tests that check the generated code on machines without a Hopper GPU.

    ``ragged``: a key length that is not a multiple of the key tile (the last tile's column mask is compiled in);
    False gives the specialization of, e.g., the head_dim-64 bench shape (16384 keys). ``use_order``: claim a
    head's query tiles in a given order (offline there is no L2 to apply the spec's rule to). Returns Triton's
    compiled kernel (``.asm`` has ``ttgir``, ``ptx``, ``cubin``)."""
    from triton.runtime.jit import mangle_type

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    x = torch.empty(1, 1, 256, head_dim, dtype=torch_dtype)
    x_qk = torch.empty(1, 1, 256, head_dim, dtype=torch.int8) if spec.qk8 else x
    rows, item_rows = _rows(spec)
    v_desc = (_descriptor(torch.empty(1, 1, head_dim, 256, dtype=torch.float8_e4m3fn), head_dim, spec.block_n)
              if spec.pv8 else _descriptor(x, spec.block_n))
    descs = {"q_desc": _descriptor(x_qk, rows), "k_desc": _descriptor(x_qk, spec.block_n), "v_desc": v_desc,
             "o_desc": _descriptor(x, rows)}
    constexprs = dict(BLOCK_D=head_dim, BLOCK_M=item_rows, BLOCK_N=spec.block_n, STAGES=spec.stages,
                      FULL_WALK=spec.walk == FULL_WALK, WRITE_STATE=write_state, RETURN_LSE=return_lse,
                      RAGGED_K=ragged, USE_ORDER=use_order, PINGPONG=spec.pingpong, TREE_MAX=spec.tree_max,
                      LANE_SUMS=spec.lane_sums, PRODUCER_REGS=spec.regs[0], CONSUMER_REGS=spec.regs[1],
                      PER_CALL=spec.per_call, QK8=spec.qk8, PV8=spec.pv8)
    types = {name: mangle_type(desc) for name, desc in descs.items()}
    return compile_sm90a(_lite_attention_fwd_sm90_persistent, constexprs, types, num_warps=item_rows // 32,
                         max_regs=spec.max_regs, fp_fusion=spec.fp_fusion)


# Pointer and scalar arguments of the kernel, and their types.
POINTER_TYPES = MappingProxyType({"LSE": "*fp32", "KV_COUNT": "*i32", "KV_IDX": "*i16", "NEXT_COUNT": "*i32",
                                  "NEXT_IDX": "*i16", "Q_PROT": "*i8", "K_PROT": "*i8", "ORDER": "*i32",
                                  "FLAGS": "*i32", "COUNTER": "*i32", "Q_SCALE": "*fp32", "K_SCALE": "*fp32",
                                  "V_SCALE": "*fp32", "SIXTEEN": "*i8", "qk_scale": "fp32", "threshold": "fp32"})


def compile_sm90a(fn, constexprs: dict, types: dict, *, num_warps: int, max_regs: int, fp_fusion: bool):
    """Compile a Gluon kernel for sm90a with Triton's bundled assembler (no GPU needed).

    Arguments not in ``constexprs`` take their type from ``types`` or :data:`POINTER_TYPES`, else i32; pointers
    are declared 16-byte divisible, as the launcher specializes them for the tensors it passes.
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name) or POINTER_TYPES.get(name, "i32")
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "maxnreg": max_regs, "enable_fp_fusion": fp_fusion})
