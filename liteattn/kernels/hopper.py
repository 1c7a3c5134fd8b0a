"""Warp-specialized forward kernel for Hopper (sm90), written in Gluon (Triton's explicit-layout dialect).

Same tile semantics as :mod:`liteattn.kernels.forward` (one program per 128-row query tile and batch*head,
walking the tile's active list, marking negligible tiles into the next list), scheduled the way
FlashAttention-3 schedules Hopper. The plain Triton kernel runs one warpgroup at its register limit and
cannot overlap the softmax with tensor-core work (KERNEL_NOTES.md, v5-v7); here

- a one-warp *producer* partition walks the active list and issues TMA copies of K and V tiles into a ring
  of shared-memory stages, guarded by mbarriers ("ready" when the bytes landed, "empty" when both
  consumers are done with them);
- two *consumer* partitions (one warpgroup, 64 query rows each) issue tile t's Q·Kᵀ wgmma before the
  softmax of tile t, which then runs while P·V of tile t-1 is in flight; with ``PINGPONG`` the two take
  turns issuing their products, so one's softmax overlaps the other's tensor-core work;
- register budgets are split (``setmaxnreg``): the producer keeps 24 registers per thread and each
  consumer gets 240, so the detection bits cost no spills (the Triton kernel spills there).

Detection is the Triton kernel's (per-row 32-tile bit words merged with atomics); each consumer normalises
and stores its own rows of the output and LSE; after the partitions join, the first consumer's warps
compact the survivors into the next list. :mod:`liteattn.kernels.hopper_persistent` runs the same partitions
as one persistent program per SM (the default on Hopper); this module also holds the pieces both share. K/V/Q/O are read and written through device-side TMA
descriptors, which need Triton's scratch allocator (set by :func:`liteattn.kernels.forward.lite_attention_fwd`).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._gluon import cta_barrier, tma_load, tma_store
from .forward import FP_FUSION, device_capability

PRODUCER_REGS = gl.constexpr(24)
CONSUMER_REGS = gl.constexpr(240)
# The two consumers take turns issuing tensor-core work (FlashAttention-3's inter-warpgroup overlap).
PINGPONG = True
# Read list entries one tile ahead (producer) and before the barrier waits (consumers' ragged-tile check).
PREFETCH = True
# A full row's t-th tile is t: take it without reading the list (:func:`_tile_at`).
BY_POSITION = True
# Fold each row's maximum as a tree (:func:`_row_max`). None: in the dense walk at head_dim 64 only; True / False
# force it. On an H200 the dense walk ran 1.7-2.4 % faster with it at head_dim 64 and 4-6 % slower at head_dim 128,
# and list walks at head_dim 64 ran 4.5-10 % slower (KERNEL_NOTES.md v13).
TREE_MAX: bool | None = None
# Keep each lane's share of a row's softmax sum and add the four lanes of a row once per query tile, not per key
# tile (:func:`_lane_sums`). None: in list walks only (``lane_sums_for``); True / False force it. On an H200 it made
# detection 2.3 % faster at head_dim 64 and sparse calls there and at Wan 1.3B up to 2.4 %, equal within 1 % at
# Wan 14B and HunyuanVideo; but the dense walk was no faster at head_dim 64 and 9-11 % slower at HunyuanVideo,
# with the same tile loop apart from the 8 instructions it removes (KERNEL_NOTES.md v16).
LANE_SUMS: bool | None = None
# Registers per thread over all warps (consumers + the producer's warpgroup) of one program: one program
# per SM, so the whole register file (64 K) is split between them.
MAX_REGS = 168
# Shared memory the K/V ring may fill beside Q (bytes). At 128x128 tiles and head_dim 128 this allows 2 stages
# (the measured configuration); 226 KiB would allow 3 (not measured yet).
SMEM_BUDGET = 220 * 1024


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _tile_at(idx_ptr, full_row, t, KT, BY_POSITION: gl.constexpr):
    """The key tile visited ``t``-th: ``t`` on a full row, else the list's entry. ``t`` is clamped to the
    list's buffer, so reading one entry ahead of the last one stays in bounds.

    With ``BY_POSITION`` a full row's list is not read at all (a uniform branch instead of a load): the
    consumers' ragged-tile check needs the index before each tile's scores and would otherwise wait for that
    load every tile (on an H200 full-row calls ran 0-1 % faster, KERNEL_NOTES.md v12)."""
    if BY_POSITION:
        j = gl.to_tensor(t)
        if not full_row:
            j = gl.load(idx_ptr + gl.minimum(t, KT - 1)).to(gl.int32)
    else:
        listed = gl.load(idx_ptr + gl.minimum(t, KT - 1)).to(gl.int32)
        j = gl.where(full_row, t, listed)
    return j


@gluon.jit
def _next_tile(idx_ptr, full_row, t, KT, j_next, PREFETCH: gl.constexpr, BY_POSITION: gl.constexpr):
    """The key tile to copy t-th, and the list entry read ahead for t+1.

    With ``PREFETCH`` the entry of tile t+1 is read before waiting for tile t's stage, so its latency hides
    behind the wait instead of delaying the copy (the ring is only 2 deep at 128x128 tiles)."""
    if PREFETCH:
        j = j_next
        j_next = _tile_at(idx_ptr, full_row, t + 1, KT, BY_POSITION)
    else:
        j = _tile_at(idx_ptr, full_row, t, KT, BY_POSITION)
    return j, j_next


@gluon.jit
def _copy_when_free(desc, coord, ready, empty, dst, phase):
    """TMA-copy one tile into a ring stage once both consumers released it (``phase``: the pass over the ring).

    A fresh mbarrier is in phase 0, and waiting on parity 1 (the phase before it) returns at once: the first
    pass over the ring does not wait."""
    mbarrier.wait(empty, phase ^ 1)
    mbarrier.expect(ready, desc.block_type.nbytes)
    tma_load(desc, coord, ready, dst)


@gluon.jit
def _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, idx_ptr, n_active, full_row, KT,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr, BY_POSITION: gl.constexpr):
    """Issue the K and V copies of every active tile, ``STAGES`` tiles ahead of the consumers at most."""
    j_next = _tile_at(idx_ptr, full_row, 0, KT, BY_POSITION)
    for t in range(n_active):
        j, j_next = _next_tile(idx_ptr, full_row, t, KT, j_next, PREFETCH, BY_POSITION)
        stage = t % STAGES
        phase = (t // STAGES) & 1
        _copy_when_free(k_desc, [j * BLOCK_N, 0], k_ready.index(stage), k_empty.index(stage), k_bufs.index(stage),
                        phase)
        _copy_when_free(v_desc, [j * BLOCK_N, 0], v_ready.index(stage), v_empty.index(stage), v_bufs.index(stage),
                        phase)


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
def _scores(s, t, j, m_i, bits, row_valid, flag_words, n_active, qk_scale, threshold, SEQ_K, KT,
            BLOCK_N: gl.constexpr, RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr, TREE_MAX: gl.constexpr,
            s_layout: gl.constexpr):
    """Online-softmax step on one raw score tile (the ``t``-th visited, key tile ``j``): mask, detection bits,
    new max, P in fp32, row scale."""
    if RAGGED_K:
        if j == KT - 1:  # only the last key tile has columns past SEQ_K
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < SEQ_K, 0), s, float("-inf"))
    tile_max = _row_max(s, TREE_MAX, s_layout) * qk_scale
    if WRITE_STATE:
        # Per row, bit (t % 32) says "this tile is not negligible for me"; merged across rows in memory
        # once per 32 tiles (KERNEL_NOTES.md, v5). Only a finite margin below the threshold finds the tile
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
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, m_new, bits


@gluon.jit
def _compact_chunk(c, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW, KT,
                   DENSE: gl.constexpr, BLOCK_C: gl.constexpr, c_layout: gl.constexpr):
    """List positions ``c .. c+BLOCK_C-1`` of one query tile: append the survivors (flagged, first visited or
    must-do; all of them where a consumer met a NaN or +inf score, :func:`_flag_nonfinite`) to the ``n_keep``
    already written to the next list, in visiting order; returns the new count."""
    offs_c = c + gl.arange(0, BLOCK_C, layout=c_layout)
    in_range = offs_c < n_active
    # Merged by the consumers' atomics at L2: read past L1.
    words = gl.load(FLAGS + state_off * NW + offs_c // 32, mask=in_range, other=0, cache_modifier=".cg")
    keep_all = gl.load(Q_PROT + pid_m).to(gl.int32) | gl.load(FLAGS + state_off * NW + NW - 1, cache_modifier=".cg")
    flag = (words >> (offs_c % 32)) & 1
    if DENSE:
        ids = offs_c
    else:
        listed = gl.load(KV_IDX + state_off * KT + offs_c, mask=in_range, other=0).to(gl.int32)
        ids = gl.where(n_active == KT, offs_c, listed)  # a full row is visited in ascending order
    protected = (gl.load(K_PROT + ids, mask=in_range, other=0).to(gl.int32) | keep_all) != 0
    keep = in_range & ((flag != 0) | (offs_c == 0) | protected)
    keep_i = keep.to(gl.int32)
    pos = n_keep + gl.associative_scan(keep_i, 0, _add) - keep_i
    gl.store(NEXT_IDX + state_off * KT + pos, ids.to(gl.int16), mask=keep)
    return n_keep + gl.sum(keep_i, axis=0)


@gluon.jit
def _attend_tiles(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, g, idx_ptr, n_active,
                  full_row, flag_words, row_valid, acc, m_i, qk_scale, threshold, SEQ_K, KT,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr,
                  TURN: gl.constexpr, PINGPONG: gl.constexpr, PREFETCH: gl.constexpr, BY_POSITION: gl.constexpr,
                  TREE_MAX: gl.constexpr, LANE_SUMS: gl.constexpr, s_layout: gl.constexpr,
                  o_layout: gl.constexpr):
    """One consumer's rows over a query tile's ``n_active`` (> 0) listed key tiles; returns acc, m, l.

    Q·Kᵀ of tile t is issued before the softmax of tile t runs behind P·V of tile t-1 (FA3's
    intra-warpgroup overlap). With ``PINGPONG``, two consumers take turns issuing their tensor-core work, so
    one's softmax runs while the other's products do. Ring stages and barrier phases count from ``g``, the
    tiles this program consumed before (0 with one query tile per program); every stage is released."""
    ROWS: gl.constexpr = q_rows.shape[0]
    dtype: gl.constexpr = q_rows.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    bits = gl.zeros([ROWS], gl.int32, layout=gl.SliceLayout(1, s_layout))
    # Tile 0: no P·V to overlap yet.
    stage = g % STAGES
    if PINGPONG:
        mbarrier.wait(turn_bars.index(TURN), (g & 1) ^ TURN ^ 1)
    mbarrier.wait(k_ready.index(stage), (g // STAGES) & 1)
    s_tok = warpgroup_mma(q_rows, k_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
    j = 0
    if RAGGED_K:  # only the ragged-tile check needs the tile's index
        j = _tile_at(idx_ptr, full_row, 0, KT, BY_POSITION)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, alpha, m_i, bits = _scores(s, 0, j, m_i, bits, row_valid, flag_words, n_active, qk_scale, threshold, SEQ_K,
                                  KT, BLOCK_N, RAGGED_K, WRITE_STATE, TREE_MAX, s_layout)
    l_part = _lane_sums(p, LANE_SUMS)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for t in range(1, n_active):
        gt = g + t
        stage = gt % STAGES
        prev = (gt - 1) % STAGES
        j = t
        if RAGGED_K and PREFETCH:  # read tile t's list entry before the waits, not after the scores arrive
            j = _tile_at(idx_ptr, full_row, t, KT, BY_POSITION)
        if PINGPONG:  # consumer TURN issues its t-th products after the other one issued theirs
            mbarrier.wait(turn_bars.index(TURN), (gt & 1) ^ TURN ^ 1)
        mbarrier.wait(k_ready.index(stage), (gt // STAGES) & 1)
        s_tok = warpgroup_mma(q_rows, k_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((gt - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - TURN), count=1)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(stage), count=1)
        if RAGGED_K and not PREFETCH:
            j = _tile_at(idx_ptr, full_row, t, KT, BY_POSITION)
        p, alpha, m_i, bits = _scores(s, t, j, m_i, bits, row_valid, flag_words, n_active, qk_scale, threshold,
                                      SEQ_K, KT, BLOCK_N, RAGGED_K, WRITE_STATE, TREE_MAX, s_layout)
        l_part = _rescaled_sums(l_part, alpha, _lane_sums(p, LANE_SUMS), LANE_SUMS)
        acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    last_g = g + n_active - 1
    last = last_g % STAGES
    mbarrier.wait(v_ready.index(last), (last_g // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))
    mbarrier.arrive(v_empty.index(last), count=1)
    return acc, m_i, _row_sums(l_part, gl.SliceLayout(1, s_layout), LANE_SUMS)


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
def _consumer(row0, q_rows, q_bar, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, idx_ptr, n_active,
              full_row, flag_words, NW, qk_scale, threshold, o_desc, LSE, lse_off, SEQ_Q, SEQ_K, KT,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
              RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr, RETURN_LSE: gl.constexpr,
              TURN: gl.constexpr, PINGPONG: gl.constexpr, PREFETCH: gl.constexpr, BY_POSITION: gl.constexpr,
              TREE_MAX: gl.constexpr, LANE_SUMS: gl.constexpr):
    """``ROWS`` query rows starting at ``row0`` (:func:`_attend_tiles`), then their output and LSE."""
    NUM_WARPS: gl.constexpr = ROWS // 16
    dtype: gl.constexpr = q_rows.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_D, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    offs_m = row0 + gl.arange(0, ROWS, layout=row_layout)
    row_valid = offs_m < SEQ_Q
    acc = gl.zeros([ROWS, BLOCK_D], gl.float32, layout=o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
    mbarrier.wait(q_bar, 0)
    # An empty list (possible in a hand-built state) attends to nothing: zero output, LSE -inf, and no
    # waits on tiles that never come.
    if n_active > 0:
        acc, m_i, l_i = _attend_tiles(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, 0,
                                      idx_ptr, n_active, full_row, flag_words, row_valid, acc, m_i, qk_scale,
                                      threshold, SEQ_K, KT, BLOCK_N, STAGES, RAGGED_K, WRITE_STATE, TURN, PINGPONG,
                                      PREFETCH, BY_POSITION, TREE_MAX, LANE_SUMS, s_layout, o_layout)
    if WRITE_STATE:  # read by the compaction after the partitions join
        _flag_nonfinite(flag_words, NW, l_i, row_valid)

    # Epilogue: stage through this consumer's rows of Q's shared memory (no longer read) and store with TMA,
    # which clips the rows past SEQ_Q.
    out, lse = _normalize(acc, m_i, l_i, o_layout)
    q_rows.store(out.to(dtype))
    fence_async_shared()
    tma_store(o_desc, [row0, 0], q_rows)
    if RETURN_LSE:
        gl.store(LSE + lse_off + offs_m, lse, mask=row_valid)
    tma.store_wait(0)


@gluon.jit
def _lite_attention_fwd_sm90(
    Q, K, V, O, LSE,
    KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, ORDER, FLAGS, NW,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    H, GROUP, SEQ_Q, SEQ_K, QT, KT,
    qk_scale, threshold,
    BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    DENSE: gl.constexpr, WRITE_STATE: gl.constexpr, RETURN_LSE: gl.constexpr,
    RAGGED_K: gl.constexpr, BLOCK_C: gl.constexpr, USE_ORDER: gl.constexpr,
    PINGPONG: gl.constexpr, PREFETCH: gl.constexpr, BY_POSITION: gl.constexpr, TREE_MAX: gl.constexpr,
    LANE_SUMS: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    ROWS: gl.constexpr = BLOCK_M // 2  # two consumer partitions (one warpgroup each) share a query tile
    NUM_WARPS: gl.constexpr = ROWS // 16
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_D], dtype)
    o_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_D], dtype)
    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], dtype)

    pid_bh = gl.program_id(1)
    if USE_ORDER:  # heaviest query tiles of a head first, so short ones fill the tail
        pid_m = gl.load(ORDER + pid_bh.to(gl.int64) * QT + gl.program_id(0))
    else:
        pid_m = gl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_ptr = Q + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
    k_ptr = K + b.to(gl.int64) * stride_kb + hk.to(gl.int64) * stride_kh
    v_ptr = V + b.to(gl.int64) * stride_vb + hk.to(gl.int64) * stride_vh
    o_ptr = O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    q_desc = tma.make_tensor_descriptor(q_ptr, shape=[SEQ_Q, BLOCK_D], strides=[stride_qs, 1],
                                        block_shape=[BLOCK_M, BLOCK_D], layout=q_smem_layout)
    k_desc = tma.make_tensor_descriptor(k_ptr, shape=[SEQ_K, BLOCK_D], strides=[stride_ks, 1],
                                        block_shape=[BLOCK_N, BLOCK_D], layout=kv_smem_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr, shape=[SEQ_K, BLOCK_D], strides=[stride_vs, 1],
                                        block_shape=[BLOCK_N, BLOCK_D], layout=kv_smem_layout)
    o_desc = tma.make_tensor_descriptor(o_ptr, shape=[SEQ_Q, BLOCK_D], strides=[stride_os, 1],
                                        block_shape=[ROWS, BLOCK_D], layout=o_smem_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], q_smem_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], kv_smem_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], kv_smem_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turn_bars.index(0), count=1)
    mbarrier.init(turn_bars.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [pid_m * BLOCK_M, 0], q_bar, q_smem)

    state_off = pid_bh.to(gl.int64) * QT + pid_m
    if DENSE:
        n_active = KT
    else:
        n_active = gl.load(KV_COUNT + state_off)
    full_row = n_active == KT  # a full row is visited in ascending order, whatever its list holds
    idx_ptr = KV_IDX + state_off * KT
    flag_words = FLAGS + state_off * NW
    lse_off = pid_bh.to(gl.int64) * SEQ_Q
    row0 = pid_m * BLOCK_M

    gl.warp_specialize([
        (_consumer, (row0, q_smem.slice(0, ROWS), q_bar, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                     turn_bars, idx_ptr, n_active, full_row, flag_words, NW, qk_scale, threshold, o_desc, LSE,
                     lse_off, SEQ_Q, SEQ_K, KT, ROWS, BLOCK_N, BLOCK_D, STAGES, RAGGED_K, WRITE_STATE,
                     RETURN_LSE, 0, PINGPONG, PREFETCH, BY_POSITION, TREE_MAX, LANE_SUMS)),
        (_consumer, (row0 + ROWS, q_smem.slice(ROWS, ROWS), q_bar, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                     v_empty, turn_bars, idx_ptr, n_active, full_row, flag_words, NW, qk_scale, threshold, o_desc,
                     LSE, lse_off, SEQ_Q, SEQ_K, KT, ROWS, BLOCK_N, BLOCK_D, STAGES, RAGGED_K, WRITE_STATE,
                     RETURN_LSE, 1, PINGPONG, PREFETCH, BY_POSITION, TREE_MAX, LANE_SUMS)),
        (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, idx_ptr, n_active,
                     full_row, KT, BLOCK_N, STAGES, PREFETCH, BY_POSITION)),
    ], [NUM_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])
    if WRITE_STATE:
        # Compact the survivors in visiting order into the next list (after every consumer's atomics).
        cta_barrier()
        c_layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        n_keep = gl.to_tensor(0)
        for c in range(0, n_active, BLOCK_C):
            n_keep = _compact_chunk(c, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_IDX, Q_PROT, K_PROT, FLAGS,
                                    NW, KT, DENSE, BLOCK_C, c_layout)
        gl.store(NEXT_COUNT + state_off, n_keep)


def tree_max_for(head_dim: int, dense: bool, forced: bool | None) -> bool:
    """Whether row maxima are folded as a tree in this specialization: ``forced`` (a module's ``TREE_MAX``) if
    set, else in the dense walk at head_dim 64 (:data:`TREE_MAX`)."""
    return (head_dim <= 64 and dense) if forced is None else forced


def lane_sums_for(dense: bool, forced: bool | None) -> bool:
    """Whether row sums stay per lane until the end in this specialization: ``forced`` (a module's
    ``LANE_SUMS``) if set, else in list walks only (:data:`LANE_SUMS`)."""
    return (not dense) if forced is None else forced


def supports(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int) -> bool:
    """Whether this kernel runs the call: an sm90 GPU, fp16/bf16, head_dim 64 or 128, and the skip state's
    tiles 128 query rows by 64 or 128 keys (two 64-row consumers per query tile). Anything else runs the
    Triton kernel, which has the same semantics."""
    if q.device.type != "cuda" or torch.version.hip is not None:
        return False
    if device_capability(q.device) != (9, 0):
        return False
    dim = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and dim in (64, 128) and block_m == 128
            and block_n in (64, 128))


def stages_for(block_m: int, block_n: int, head_dim: int) -> int:
    """Ring depth: as many K/V stages as fit beside Q in shared memory, capped at 4.

    A program takes a whole SM's registers (one per SM), so it may use the whole shared memory.
    """
    budget = SMEM_BUDGET
    tile_bytes = block_n * head_dim * 2
    q_bytes = block_m * head_dim * 2
    return max(2, min(4, (budget - q_bytes) // (2 * tile_bytes)))


def launch(grid, args, *, dim, seq_k, block_m, block_n, dense, write_state, return_lse, use_order):
    """Launch with the runtime arguments :func:`liteattn.kernels.forward.lite_attention_fwd` builds for both
    kernels (on BHSD-strided views it has already made TMA-ready)."""
    warps = block_m // 32  # per consumer partition
    _lite_attention_fwd_sm90[grid](
        *args,
        BLOCK_D=dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages_for(block_m, block_n, dim),
        DENSE=dense, WRITE_STATE=write_state, RETURN_LSE=return_lse,
        RAGGED_K=seq_k % block_n != 0, BLOCK_C=32 * warps, USE_ORDER=use_order,
        PINGPONG=PINGPONG, PREFETCH=PREFETCH, BY_POSITION=BY_POSITION,
        TREE_MAX=tree_max_for(dim, dense, TREE_MAX), LANE_SUMS=lane_sums_for(dense, LANE_SUMS),
        num_warps=warps, maxnreg=MAX_REGS, enable_fp_fusion=FP_FUSION,
    )


def compile_offline(block_n: int = 128, head_dim: int = 128, dense: bool = False, write_state: bool = True,
                    pingpong: bool | None = None, dtype: str = "bf16"):
    """Compile one specialization for sm90a without a GPU (Triton's bundled assembler).

    For compiler reports and for the test that keeps the kernel free of register spills on machines
    without a Hopper GPU. Returns Triton's compiled kernel (``.asm`` has ``ttgir``, ``ptx``, ``cubin``).
    """
    constexprs = dict(BLOCK_D=head_dim, BLOCK_M=128, BLOCK_N=block_n, STAGES=stages_for(128, block_n, head_dim),
                      DENSE=dense, WRITE_STATE=write_state, RETURN_LSE=True, RAGGED_K=True, BLOCK_C=128,
                      USE_ORDER=not dense, PINGPONG=PINGPONG if pingpong is None else pingpong, PREFETCH=PREFETCH,
                      BY_POSITION=BY_POSITION, TREE_MAX=tree_max_for(head_dim, dense, TREE_MAX),
                      LANE_SUMS=lane_sums_for(dense, LANE_SUMS))
    fn = _lite_attention_fwd_sm90
    types = {name: "*" + dtype for name in ("Q", "K", "V", "O")}
    return compile_sm90a(fn, constexprs, types, aligned={n for n in fn.arg_names if n.startswith("stride")})


# Pointer arguments shared by both Gluon kernels, and their element types.
POINTER_TYPES = {"LSE": "*fp32", "KV_COUNT": "*i32", "KV_IDX": "*i16", "NEXT_COUNT": "*i32", "NEXT_IDX": "*i16",
                 "Q_PROT": "*i8", "K_PROT": "*i8", "ORDER": "*i32", "FLAGS": "*i32", "COUNTER": "*i32",
                 "qk_scale": "fp32", "threshold": "fp32"}


def compile_sm90a(fn, constexprs: dict, types: dict, aligned=()):
    """Compile a Gluon kernel for sm90a with Triton's bundled assembler (no GPU needed).

    Arguments not in ``constexprs`` take their type from ``types`` or :data:`POINTER_TYPES`, else i32;
    pointers and the names in ``aligned`` are declared 16-byte divisible, as the launcher would specialize
    them for TMA-ready tensors.
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name) or POINTER_TYPES.get(name, "i32")
        if signature[name].startswith("*") or name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": MAX_REGS,
                                                                            "enable_fp_fusion": FP_FUSION})
