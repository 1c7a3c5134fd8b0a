"""Persistent variant of the Hopper kernel: one program per SM streams many query tiles through one pipeline.

The kernel of :mod:`liteattn.kernels.hopper` runs one program per query tile. Each program pays a fixed
cost before its first tensor-core instruction and after its last one (Q load, pipeline fill, output store,
compaction of the next list), and with one program per SM nothing else runs on the SM meanwhile. When most
tiles are skipped (s = 0.9 leaves ~26 of 256 key tiles per query tile) that fixed cost is ~15-20 % of the
program (KERNEL_NOTES.md, v8). Here each program keeps its partitions alive over many work items (query
tile x batch*head) and overlaps the seams:

- the producer claims the next item from a global counter, heads in sequence and the query tiles of a
  head in index order, or longest list first where a head's K/V exceed half the L2 (``ORDER_BY_WORK``), so
  programs finish together however uneven the lists are, and hands its id to the consumers through a
  shared-memory slot beside the item's Q buffer;
- the producer loads the next item's Q into a second buffer and keeps the K/V ring full across the item
  boundary, so the consumers start the next item without waiting for memory;
- the producer also compacts the previous item's survivors into the next list, 32 entries between two of
  the current item's copies, while it would otherwise wait for a free stage;
- consumers store their output rows through the Q buffer they just finished and release it once the next
  item's Q has arrived.

Ordering within a consumer partition: its four warps issue the detection atomics and the two halves of the
output store, but one thread arrives on ``flags_bars`` and ``q_empty``; Triton 3.6 precedes every
``mbarrier.arrive`` of a multi-warp partition with a barrier over that partition's warps, which is what
makes all warps' atomics and store reads complete before the arrive (checked in the PTX).

Descriptors are built on the host over the whole ``(B, H, S, D)`` tensors (rank-4 TMA), so a program
addresses any head without creating descriptors on the device. Tile semantics, the detection words and the
state layout are the same as both other kernels'.
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._gluon import tma_load, tma_store
from .forward import FP_FUSION, device_index
from .hopper import (MAX_REGS, _attend_tiles, _compact_chunk, _copy_when_free, _flag_nonfinite, _next_tile,
                     _normalize, _tile_at, compile_sm90a, lane_sums_for, tree_max_for)

# setmaxnreg (producer, consumer) registers per thread: the producer also compacts the finished items; the
# consumers get what the producer's warpgroup gives up, 168 + (168 - producer) / 2. Measured: (40, 232); with
# the chunked compaction (24, 240) compiles without spills too (not timed yet, KERNEL_NOTES.md v9).
REGS = (40, 232)
# The two consumers take turns issuing their tensor-core work (ping-pong, :func:`.hopper._attend_tiles`).
# None: above head_dim 64 only; True / False force it. At head_dim 64 a tile's products take half as long and the
# handoff costs more than the overlap saves: on an H200, without it detection cost 1.5-2.5 % less and sparse calls
# ran 1-1.6 % faster, dense equal (KERNEL_NOTES.md v11).
PINGPONG: bool | None = None
PREFETCH = True
BY_POSITION = True  # see hopper.BY_POSITION
TREE_MAX: bool | None = None  # see hopper.TREE_MAX
LANE_SUMS: bool | None = None  # see hopper.LANE_SUMS
# K/V ring budget beside two Q buffers (bytes), and the most stages it is split into.
SMEM_BUDGET = 220 * 1024
MAX_STAGES = 4
# The producer's compaction: 32 list positions per step, one per lane of its single warp.
ONE_WARP = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))
# Claim a head's query tiles longest list first (a stable argsort of the counts per call) rather than in index
# order. None: only when one head's K and V take more than half the L2 (``order_by_work_for``). There the programs
# of a head must sweep its K/V together for the tiles to come from L2: equal lists keep them in step, lists of
# different lengths let them drift apart over the items, and sorted, the items in flight have nearly equal
# lengths again. On an H200 (the driver reports a 60 MiB L2), rows of random length: 5-9 % faster at the
# HunyuanVideo shape (61 MB per head), about 5 % at Wan 14B (39 MB), but 1-6 % slower at Wan 1.3B (17 MB) at
# s = 0.9, where the argsort's kernels and the dependent load of the order cost more than L2 misses (KERNEL_NOTES
# v10, v14).
ORDER_BY_WORK: bool | None = None
# At most this many programs (None: one per SM). Tests lower it to put many items through one program.
MAX_PROGRAMS: int | None = None


@gluon.jit
def _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, DENSE: gl.constexpr, USE_ORDER: gl.constexpr):
    """Work item ``w`` (heads in sequence, query tiles of a head in launch order) -> its coordinates."""
    pid_bh = w // QT
    if USE_ORDER:
        pid_m = gl.load(ORDER + w)
    else:
        pid_m = w % QT
    state_off = pid_bh.to(gl.int64) * QT + pid_m
    if DENSE:
        n_active = KT
    else:
        n_active = gl.load(KV_COUNT + state_off)
    b = pid_bh // H
    h = pid_bh % H
    return b, h, h // GROUP, pid_bh, pid_m, state_off, n_active


@gluon.jit
def _compact_rest(c0, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW,
                  KT, DENSE: gl.constexpr):
    """The item's list from position ``c0`` on (one warp, in visiting order), then its count."""
    for c in range(c0, n_active, 32):
        n_keep = _compact_chunk(c, n_keep, state_off, pid_m, n_active, KV_IDX, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW,
                                KT, DENSE, 32, ONE_WARP)
    gl.store(NEXT_COUNT + state_off, n_keep)


@gluon.jit
def _compact_item(w, i, flags_bars, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, FLAGS, NW, H,
                  GROUP, QT, KT, DENSE: gl.constexpr, USE_ORDER: gl.constexpr):
    """Compact this program's ``i``-th item (work index ``w``) once both consumers' atomics are issued."""
    _, _, _, _, pid_m, state_off, n_active = _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, DENSE, USE_ORDER)
    mbarrier.wait(flags_bars.index(i % 2), (i // 2) & 1)
    _compact_rest(0, gl.to_tensor(0), state_off, pid_m, n_active, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, FLAGS,
                  NW, KT, DENSE)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, item_ids, k_ready, v_ready,
              k_empty, v_empty, flags_bars, COUNTER, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT,
              FLAGS, NW, H, GROUP, QT, KT, n_items,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
              DENSE: gl.constexpr, WRITE_STATE: gl.constexpr, USE_ORDER: gl.constexpr, PREFETCH: gl.constexpr,
              BY_POSITION: gl.constexpr):
    """Q of each item (two buffers), then its K/V tiles into the ring; then the previous item's compaction."""
    id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    g = 0  # tiles issued so far by this program: ring position and phase
    i = 0  # items so far
    prev_w = 0
    w = gl.atomic_add(COUNTER, 1, sem="relaxed")  # dynamic schedule: whichever program is free takes the next item
    while w < n_items:
        b, h, hk, pid_bh, pid_m, state_off, n_active = _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, DENSE,
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
        _, _, _, _, prev_m, prev_off, prev_n = _item(prev_w, ORDER, KV_COUNT, H, GROUP, QT, KT, DENSE, USE_ORDER)
        n_keep = gl.to_tensor(0)
        c = gl.to_tensor(0)
        j_next = _tile_at(idx_ptr, full_row, 0, KT, BY_POSITION)
        for t in range(n_active):
            j, j_next = _next_tile(idx_ptr, full_row, t, KT, j_next, PREFETCH, BY_POSITION)
            stage = g % STAGES
            phase = (g // STAGES) & 1
            _copy_when_free(k_desc, [b, hk, j * BLOCK_N, 0], k_ready.index(stage), k_empty.index(stage),
                            k_bufs.index(stage).reshape([1, 1, BLOCK_N, BLOCK_D]), phase)
            _copy_when_free(v_desc, [b, hk, j * BLOCK_N, 0], v_ready.index(stage), v_empty.index(stage),
                            v_bufs.index(stage).reshape([1, 1, BLOCK_N, BLOCK_D]), phase)
            g += 1
            if WRITE_STATE:
                if (t >= STAGES - 1) & (i > 0) & (c < prev_n):
                    if c == 0:
                        mbarrier.wait(flags_bars.index((i - 1) % 2), ((i - 1) // 2) & 1)
                    n_keep = _compact_chunk(c, n_keep, prev_off, prev_m, prev_n, KV_IDX, NEXT_IDX, Q_PROT, K_PROT,
                                            FLAGS, NW, KT, DENSE, 32, ONE_WARP)
                    c += 32
        # The ring is as full as it gets: claim the next item and finish the previous one's list.
        w_next = gl.atomic_add(COUNTER, 1, sem="relaxed")
        if WRITE_STATE:
            if i > 0:
                if c == 0:  # no chunk done yet (short item or empty list): its flags are not waited for yet
                    mbarrier.wait(flags_bars.index((i - 1) % 2), ((i - 1) // 2) & 1)
                _compact_rest(c, n_keep, prev_off, prev_m, prev_n, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT,
                              FLAGS, NW, KT, DENSE)
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
                          FLAGS, NW, H, GROUP, QT, KT, DENSE, USE_ORDER)


@gluon.jit
def _consumer(o_desc, q_bufs, q_ready, q_empty, item_ids, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars,
              flags_bars, ORDER, KV_COUNT, KV_IDX, FLAGS, NW, LSE, H, GROUP, SEQ_Q, SEQ_K, QT, KT, n_items,
              qk_scale, threshold,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
              DENSE: gl.constexpr, RAGGED_K: gl.constexpr, WRITE_STATE: gl.constexpr, RETURN_LSE: gl.constexpr,
              USE_ORDER: gl.constexpr, TURN: gl.constexpr, PINGPONG: gl.constexpr, PREFETCH: gl.constexpr,
              BY_POSITION: gl.constexpr, TREE_MAX: gl.constexpr, LANE_SUMS: gl.constexpr):
    """Rows ``TURN * ROWS`` to ``(TURN + 1) * ROWS`` of every item's query tile
    (:func:`liteattn.kernels.hopper._attend_tiles`, ring and turn phases counted over the whole program), then
    their output and LSE."""
    NUM_WARPS: gl.constexpr = ROWS // 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_D, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_bufs.dtype
    id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
    g = 0
    i = 0
    mbarrier.wait(q_ready.index(0), 0)
    w = gl.max(item_ids.index(0).load(id_layout), axis=0)
    while w < n_items:
        b, h, hk, pid_bh, pid_m, state_off, n_active = _item(w, ORDER, KV_COUNT, H, GROUP, QT, KT, DENSE,
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
        if n_active > 0:
            acc, m_i, l_i = _attend_tiles(q_rows, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars, g,
                                          idx_ptr, n_active, full_row, flag_words, row_valid, acc, m_i,
                                          qk_scale, threshold, SEQ_K, KT, BLOCK_N, STAGES, RAGGED_K, WRITE_STATE,
                                          TURN, PINGPONG, PREFETCH, BY_POSITION, TREE_MAX, LANE_SUMS, s_layout,
                                          o_layout)
        if WRITE_STATE:  # this consumer's detection atomics for the item are issued
            _flag_nonfinite(flag_words, NW, l_i, row_valid)
            mbarrier.arrive(flags_bars.index(i % 2), count=1)

        out, lse = _normalize(acc, m_i, l_i, o_layout)
        q_rows.store(out.to(dtype))
        fence_async_shared()
        tma_store(o_desc, [b, h, row0, 0], q_rows.reshape([1, 1, ROWS, BLOCK_D]))
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
    KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, ORDER, FLAGS, NW, COUNTER,
    H, GROUP, SEQ_Q, SEQ_K, QT, KT, n_items,
    qk_scale, threshold,
    BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    DENSE: gl.constexpr, WRITE_STATE: gl.constexpr, RETURN_LSE: gl.constexpr,
    RAGGED_K: gl.constexpr, USE_ORDER: gl.constexpr, PINGPONG: gl.constexpr, PREFETCH: gl.constexpr,
    BY_POSITION: gl.constexpr, TREE_MAX: gl.constexpr, LANE_SUMS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    ROWS: gl.constexpr = BLOCK_M // 2
    NUM_WARPS: gl.constexpr = ROWS // 16
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], dtype)
    # Two Q buffers of two halves (one per consumer); a half also stages that consumer's output.
    q_bufs = gl.allocate_shared_memory(dtype, [4, ROWS, BLOCK_D], q_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], kv_layout)
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
        (_consumer, (o_desc, q_bufs, q_ready, q_empty, item_ids, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                     turn_bars, flags_bars, ORDER, KV_COUNT, KV_IDX, FLAGS, NW, LSE, H, GROUP, SEQ_Q, SEQ_K, QT,
                     KT, n_items, qk_scale, threshold, ROWS, BLOCK_N, BLOCK_D, STAGES, DENSE, RAGGED_K,
                     WRITE_STATE, RETURN_LSE, USE_ORDER, 0, PINGPONG, PREFETCH, BY_POSITION, TREE_MAX, LANE_SUMS)),
        (_consumer, (o_desc, q_bufs, q_ready, q_empty, item_ids, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                     turn_bars, flags_bars, ORDER, KV_COUNT, KV_IDX, FLAGS, NW, LSE, H, GROUP, SEQ_Q, SEQ_K, QT,
                     KT, n_items, qk_scale, threshold, ROWS, BLOCK_N, BLOCK_D, STAGES, DENSE, RAGGED_K,
                     WRITE_STATE, RETURN_LSE, USE_ORDER, 1, PINGPONG, PREFETCH, BY_POSITION, TREE_MAX, LANE_SUMS)),
        (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, item_ids, k_ready, v_ready,
                     k_empty, v_empty, flags_bars, COUNTER, ORDER, KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT,
                     K_PROT, FLAGS, NW, H, GROUP, QT, KT, n_items, ROWS, BLOCK_N, BLOCK_D, STAGES, DENSE, WRITE_STATE,
                     USE_ORDER, PREFETCH, BY_POSITION)),
    ], [NUM_WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


def stages_for(block_m: int, block_n: int, head_dim: int) -> int:
    """K/V ring depth beside two Q buffers, capped at ``MAX_STAGES`` (at least 2)."""
    tile_bytes = block_n * head_dim * 2
    return max(2, min(MAX_STAGES, (SMEM_BUDGET - 2 * block_m * head_dim * 2) // (2 * tile_bytes)))


def pingpong_for(head_dim: int) -> bool:
    """Whether the consumers take turns at this head_dim (``PINGPONG``)."""
    return head_dim > 64 if PINGPONG is None else PINGPONG


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def order_by_work_for(kv_head_bytes: int, l2_bytes: int, forced: bool | None = None) -> bool:
    """Whether a head's query tiles are claimed longest list first (``ORDER_BY_WORK``): by default when one
    head's K and V (``kv_head_bytes``) exceed half the L2."""
    return kv_head_bytes > l2_bytes // 2 if forced is None else forced


def order_by_work(k: torch.Tensor) -> bool:
    """:func:`order_by_work_for` for the keys ``k`` (B, H_kv, S_k, D) on their GPU (V has K's size)."""
    return order_by_work_for(2 * k.shape[2] * k.shape[3] * k.element_size(), _l2_bytes(device_index(k.device)),
                             ORDER_BY_WORK)


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, dim: int, fp16: bool) -> gl.NVMMASharedLayout:
    """The shared-memory layout of one ``rows`` x ``dim`` tile, built once per shape: Gluon derives it anew on
    every request, which took a quarter of the persistent launch's host time (four descriptors per call)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, dim], gl.float16 if fp16 else gl.bfloat16)


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """Rank-4 ``(B, H, S, D)`` descriptor over any TMA-ready strides; one tile is ``rows`` x D of one head."""
    block = [1, 1, rows, x.shape[-1]]
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block,
                            _tile_layout(rows, x.shape[-1], x.dtype == torch.float16))


def launch(args, *, dim, seq_k, block_m, block_n, dense, write_state, return_lse, use_order):
    """Launch with the runtime arguments :func:`liteattn.kernels.forward.lite_attention_fwd` builds for every
    kernel; this one reads the tensors, state buffers, shapes and constants from them (strides are in the
    descriptors). The last word of the zeroed flags buffer is the work counter of the dynamic schedule."""
    (q, k, v, out, lse, kv_count, kv_idx, next_count, next_idx, q_prot, k_prot, order, flags, n_words,
     *_strides, nheads, group, seq_q, _, qt, kt, qk_scale, threshold) = args
    counter = flags[flags.numel() - 1:]  # the zeroed word past the detection flags: next work item
    bsz = q.shape[0]
    n_items = bsz * nheads * qt
    programs = _sm_count(device_index(q.device))
    grid = (min(n_items, programs if MAX_PROGRAMS is None else MAX_PROGRAMS),)
    _lite_attention_fwd_sm90_persistent[grid](
        _descriptor(q, block_m // 2), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m // 2),
        lse, kv_count, kv_idx, next_count, next_idx, q_prot, k_prot, order, flags, n_words, counter,
        nheads, group, seq_q, seq_k, qt, kt, n_items, qk_scale, threshold,
        BLOCK_D=dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages_for(block_m, block_n, dim),
        DENSE=dense, WRITE_STATE=write_state, RETURN_LSE=return_lse, RAGGED_K=seq_k % block_n != 0,
        USE_ORDER=use_order, PINGPONG=pingpong_for(dim), PREFETCH=PREFETCH, BY_POSITION=BY_POSITION,
        TREE_MAX=tree_max_for(dim, dense, TREE_MAX), LANE_SUMS=lane_sums_for(dense, LANE_SUMS),
        PRODUCER_REGS=REGS[0], CONSUMER_REGS=REGS[1],
        num_warps=block_m // 32, maxnreg=MAX_REGS, enable_fp_fusion=FP_FUSION,
    )


def compile_offline(block_n: int = 128, head_dim: int = 128, dense: bool = False, write_state: bool = True,
                    pingpong: bool | None = None, dtype: str = "bf16", regs: tuple[int, int] | None = None,
                    ragged: bool = True):
    """Compile one specialization for sm90a without a GPU (see :func:`liteattn.kernels.hopper.compile_offline`).

    ``ragged``: a key length that is not a multiple of ``block_n`` (the last tile's column mask is compiled in);
    False gives the specialization of, e.g., the head_dim-64 bench shape (16384 keys)."""
    from triton.runtime.jit import mangle_type

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    x = torch.empty(1, 1, 256, head_dim, dtype=torch_dtype)
    descs = {"q_desc": _descriptor(x, 64), "k_desc": _descriptor(x, block_n), "v_desc": _descriptor(x, block_n),
             "o_desc": _descriptor(x, 64)}
    constexprs = dict(BLOCK_D=head_dim, BLOCK_M=128, BLOCK_N=block_n, STAGES=stages_for(128, block_n, head_dim),
                      DENSE=dense, WRITE_STATE=write_state, RETURN_LSE=True, RAGGED_K=ragged,
                      USE_ORDER=bool(ORDER_BY_WORK) and not dense,  # no L2 to measure offline: index order
                      PINGPONG=pingpong_for(head_dim) if pingpong is None else pingpong,
                      PREFETCH=PREFETCH, BY_POSITION=BY_POSITION, TREE_MAX=tree_max_for(head_dim, dense, TREE_MAX),
                      LANE_SUMS=lane_sums_for(dense, LANE_SUMS))
    constexprs["PRODUCER_REGS"], constexprs["CONSUMER_REGS"] = regs or REGS
    types = {name: mangle_type(desc) for name, desc in descs.items()}
    return compile_sm90a(_lite_attention_fwd_sm90_persistent, constexprs, types)
