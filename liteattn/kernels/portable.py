"""The portable Triton kernel: FlashAttention over each query tile's active key tiles, on any GPU Triton supports.

One program owns one (query tile, batch*head). It walks its key tiles (see :class:`liteattn.SkipState`): the
active list (list walk) or every tile by position (full walk, :data:`.common.FULL_WALK`), and for every key tile:

- computes ``qk = q kᵀ · scale · log2(e)`` (log2 domain, so ``exp2`` is used and
  the threshold compares directly),
- scores the tile against the running row max *before* it; a tile whose every
  valid row falls more than ``|threshold|`` below is marked (never the first
  tile visited, never a must-do tile) and left out of the next list,
- updates the online softmax with the tile anyway.

With ``PER_CALL`` (skip-softmax, the serving stacks' rule, nothing carried) a tile found negligible by the same rule
is instead left out of this very call: its QK is computed, its exponentials and P.V are not, and the program counts
the tiles it used. That mode walks every key tile (the full walk) and writes no list.

With ``QK8`` (``qk_dtype="int8"``) the scores come from Q and K rounded to int8 by :mod:`.quant` (K smoothed, one
scale per tile): an integer product, scaled once per tile; a query tile that meets a non-finite token takes its
products from the unrounded inputs instead (:mod:`.quant` says why). P.V stays in 16 bits.

Detection: each row ORs its "not negligible" bit of 32 consecutive tiles into a register word, merged into memory
with relaxed atomic ORs once per 32 tiles (no per-tile store, no cross-warp reduction); after the loop the
survivors are compacted into the next list in visiting order.

K/V tiles are read either through device-side TMA tensor descriptors (Hopper and newer: the copy engine moves whole
tiles, which is what closes most of the gap to cuDNN) or with plain pointer loads (every other GPU and the CPU
interpreter). Block sizes come from the skip state, never from autotuning, because they define the state's tiles;
the autotuner picks warps and pipeline stages. Which kernel a call runs, and with which settings, is
:mod:`liteattn.kernels.dispatch`'s decision; this module only launches what a :class:`KernelSpec
<liteattn.kernels.dispatch.KernelSpec>` says.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import triton
import triton.language as tl

from .common import FULL_WALK, LOG2E, KernelCall, LaunchBuffers, interpreting
from .quant import QK8

__all__ = ["autotune_configs", "compile_offline", "launch"]


def autotune_configs() -> list:
    """The (num_warps, num_stages) the autotuner chooses from: one in the interpreter, where they mean nothing."""
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _load_kv_tile(desc, ptr, start_n, offs_n, offs_d, stride_s, SEQ_K, HEAD_DIM: tl.constexpr,
                  USE_TMA: tl.constexpr, TRANSPOSE: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_D]`` tile (``[BLOCK_D, BLOCK_N]`` if TRANSPOSE), zero outside the tensor."""
    if USE_TMA:
        tile = desc.load([start_n, 0])
        if TRANSPOSE:
            tile = tl.trans(tile)
    else:
        if TRANSPOSE:
            p = ptr + (start_n + offs_n)[None, :] * stride_s + offs_d[:, None]
            m = ((start_n + offs_n) < SEQ_K)[None, :] & (offs_d < HEAD_DIM)[:, None]
        else:
            p = ptr + (start_n + offs_n)[:, None] * stride_s + offs_d[None, :]
            m = ((start_n + offs_n) < SEQ_K)[:, None] & (offs_d < HEAD_DIM)[None, :]
        tile = tl.load(p, mask=m, other=0.0)
    return tile


@triton.jit
def _store_output(O, LSE, acc, l_i, m_i, b, h, pid_bh, offs_m, offs_d, row_valid, stride_ob, stride_os, stride_oh,
                  SEQ_Q, HEAD_DIM: tl.constexpr, RETURN_LSE: tl.constexpr):
    """Normalise and store the output rows (and the LSE).

    Rows that attended to nothing (an empty list, or every score -inf) get zeros and LSE -inf, as SDPA gives a
    row whose scores are all -inf; a NaN sum (the row met a NaN or +inf score) gives NaN, as SDPA does."""
    has_mass = l_i != 0  # True for NaN
    safe_l = tl.where(has_mass, l_i, 1.0)
    out = tl.where(has_mass[:, None], acc / safe_l[:, None], 0.0)
    o_ptr = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_ptr + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :])
    if RETURN_LSE:
        lse = tl.where(has_mass, (m_i + tl.math.log2(safe_l)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=row_valid)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _softmax_step(qk, tile_max, m_i, l_i, acc, v_desc, v_ptr, start_n, offs_n, offs_d, stride_vs, SEQ_K, qk_scale,
                  HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr, KEEP_NAN: tl.constexpr = False):
    """The online-softmax update with one score tile (``qk`` unscaled, ``tile_max`` its scaled row maxima):
    returns the new running max (NaN once a row met a NaN score, with ``KEEP_NAN``), row sums and accumulator."""
    if KEEP_NAN:
        m_new = _max_keep_nan(m_i, tile_max)
    else:
        m_new = tl.maximum(m_i, tile_max)
    # A row whose scores so far are all -inf subtracts 0, not -inf (-inf - -inf is NaN): its weights stay 0
    # and a later finite score counts as in dense attention.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    b_v = _load_kv_tile(v_desc, v_ptr, start_n, offs_n, offs_d, stride_vs, SEQ_K, HEAD_DIM, USE_TMA, False)
    if UPCAST:
        b_v = b_v.to(tl.float32)
    acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _per_call_step(qk, tile_max, m_i, l_i, acc, n_used, t, j, row_valid, q_protected, K_PROT, v_desc, v_ptr,
                   start_n, offs_n, offs_d, stride_vs, SEQ_K, qk_scale, threshold, HEAD_DIM: tl.constexpr,
                   USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
    """Skip-softmax: the tile is used (softmax update and P.V) unless every valid row's finite margin is below the
    threshold; the first tile and must-do tiles are always used (the rule of :mod:`liteattn.reference`). A NaN
    score makes its row's margin NaN (``tile_max`` keeps it, :func:`_max_keep_nan`), and then every later margin
    of the row through the running max: such tiles are used, so the row is NaN as in dense attention."""
    margin = tile_max - m_i
    negligible = (margin < threshold) & (margin > float("-inf"))
    keeps = tl.max(((negligible == 0) & row_valid).to(tl.int32), 0)
    use = (keeps != 0) | (t == 0) | q_protected | (tl.load(K_PROT + j).to(tl.int32) != 0)
    if use:
        m_i, l_i, acc = _softmax_step(qk, tile_max, m_i, l_i, acc, v_desc, v_ptr, start_n, offs_n, offs_d, stride_vs,
                                      SEQ_K, qk_scale, HEAD_DIM, USE_TMA, UPCAST, KEEP_NAN=True)
        n_used += 1
    return m_i, l_i, acc, n_used


@triton.jit
def _sixteen_bit_scores(q_ptr, k_ptr, start_n, offs_m, offs_n, offs_d, row_valid, stride_qs, stride_ks, SEQ_K,
                        HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Q.K^T of one tile pair from the unrounded inputs: the scores of an 8-bit call's query tile that meets a
    non-finite token (:mod:`.quant`), which then has exactly the 16-bit semantics of non-finite inputs."""
    b_q = tl.load(q_ptr + offs_m[:, None] * stride_qs + offs_d[None, :],
                  mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    b_kt = tl.load(k_ptr + (start_n + offs_n)[None, :] * stride_ks + offs_d[:, None],
                   mask=((start_n + offs_n) < SEQ_K)[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_kt = b_kt.to(tl.float32)
    return tl.dot(b_q, b_kt)


@triton.autotune(configs=autotune_configs(),
                 key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "FULL_WALK", "WRITE_STATE", "USE_TMA", "PER_CALL", "QK8",
                      "ONLY_SIXTEEN"])
@triton.jit
def _lite_attention_fwd(
    Q, K, V, O, LSE,
    KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, ORDER, FLAGS, NW,
    Q8, K8, Q_SCALE, K_SCALE, SIXTEEN,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    H, GROUP, SEQ_Q, SEQ_K, QT, KT,
    qk_scale, threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL_WALK: tl.constexpr, WRITE_STATE: tl.constexpr, RETURN_LSE: tl.constexpr, USE_TMA: tl.constexpr,
    RAGGED_K: tl.constexpr, BLOCK_C: tl.constexpr, USE_ORDER: tl.constexpr, UPCAST: tl.constexpr,
    PER_CALL: tl.constexpr = False, QK8: tl.constexpr = False, ONLY_SIXTEEN: tl.constexpr = False,
):
    pid_bh = tl.program_id(1)
    if USE_ORDER:  # heaviest query tiles of a head first, so short ones fill the tail
        pid_m = tl.load(ORDER + pid_bh.to(tl.int64) * QT + tl.program_id(0))
    else:
        pid_m = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    row_valid = offs_m < SEQ_Q  # [BM]

    q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if QK8:  # int8 Q8 and K8, contiguous BHSD (liteattn.kernels.quant)
        b_q = tl.load(Q8 + pid_bh.to(tl.int64) * SEQ_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0)  # [BM, BD]
        q_scale = tl.load(Q_SCALE + pid_bh.to(tl.int64) * QT + pid_m)
        sixteen = tl.load(SIXTEEN + pid_bh.to(tl.int64) * QT + pid_m).to(tl.int32) != 0
        if ONLY_SIXTEEN:  # the Hopper kernel did the other query tiles (dispatch)
            if not sixteen:
                return
        kv_bh = (b * (H // GROUP) + hk).to(tl.int64)
        k8_ptr = K8 + kv_bh * SEQ_K * HEAD_DIM
        if USE_TMA:
            k8_desc = tl.make_tensor_descriptor(k8_ptr, shape=[SEQ_K, HEAD_DIM], strides=[HEAD_DIM, 1],
                                                block_shape=[BLOCK_N, BLOCK_D])
        else:
            k8_desc = k8_ptr
    else:
        b_q = tl.load(q_ptr + offs_m[:, None] * stride_qs + offs_d[None, :],
                      mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BM, BD]
        if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; it gets fp32 operands instead
            b_q = b_q.to(tl.float32)

    k_ptr = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[SEQ_K, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[SEQ_K, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_desc = k_ptr
        v_desc = v_ptr

    state_off = pid_bh.to(tl.int64) * QT + pid_m
    if FULL_WALK:  # every tile by position: the lists are not read
        n_active = KT
    else:
        n_active = tl.load(KV_COUNT + state_off)
    full_row = n_active == KT  # a full row is visited in ascending order, whatever its list holds
    idx_ptr = KV_IDX + state_off * KT
    next_idx_ptr = NEXT_IDX + state_off * KT
    flag_words = FLAGS + state_off * NW
    bits = tl.zeros([BLOCK_M], dtype=tl.int32)  # per row: bit (t % 32) set if tile t is not negligible

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if PER_CALL:
        n_used = 0  # key tiles this call used (the count it returns)
        q_protected = tl.load(Q_PROT + pid_m).to(tl.int32) != 0
    if not FULL_WALK:
        j_next = tl.load(idx_ptr).to(tl.int32)
    for t in range(0, n_active):
        if FULL_WALK:
            j = t
        else:  # the next tile's index is loaded one iteration ahead (lab/kernel-notes.md, v2)
            j = tl.where(full_row, t, j_next)
            j_next = tl.load(idx_ptr + tl.minimum(t + 1, n_active - 1)).to(tl.int32)
        start_n = j * BLOCK_N
        if QK8:
            if sixteen:  # a non-finite token in this query tile or its keys: 16-bit scores (.quant)
                qk = _sixteen_bit_scores(q_ptr, k_ptr, start_n, offs_m, offs_n, offs_d, row_valid, stride_qs,
                                         stride_ks, SEQ_K, HEAD_DIM, UPCAST)
            else:
                b_kt = _load_kv_tile(k8_desc, k8_ptr, start_n, offs_n, offs_d, HEAD_DIM, SEQ_K, HEAD_DIM, USE_TMA,
                                     True)
                qk = tl.dot(b_q, b_kt, out_dtype=tl.int32).to(tl.float32) * (
                    q_scale * tl.load(K_SCALE + kv_bh * KT + j))
        else:
            b_kt = _load_kv_tile(k_desc, k_ptr, start_n, offs_n, offs_d, stride_ks, SEQ_K, HEAD_DIM, USE_TMA, True)
            if UPCAST:
                b_kt = b_kt.to(tl.float32)
            qk = tl.dot(b_q, b_kt)  # [BM, BN], unscaled
        if RAGGED_K:
            if j == KT - 1:  # only the last key tile has columns past SEQ_K
                qk = tl.where(((start_n + offs_n) < SEQ_K)[None, :], qk, float("-inf"))
        if PER_CALL:  # a decision before the softmax: a NaN score must reach it (the row max keeps NaN)
            tile_max = tl.reduce(qk, 1, _max_keep_nan) * qk_scale  # [BM]
        else:
            tile_max = tl.max(qk, 1) * qk_scale  # [BM]
        if PER_CALL:
            m_i, l_i, acc, n_used = _per_call_step(qk, tile_max, m_i, l_i, acc, n_used, t, j, row_valid, q_protected,
                                                   K_PROT, v_desc, v_ptr, start_n, offs_n, offs_d, stride_vs, SEQ_K,
                                                   qk_scale, threshold, HEAD_DIM, USE_TMA, UPCAST)
        elif WRITE_STATE:
            # Rows for which this tile is NOT negligible set bit (t % 32) of their word. No cross-warp
            # reduction here: the per-tile "all rows" test is resolved after the loop.
            # Only a finite margin below the threshold finds a tile negligible: a -inf tile max (every
            # score -inf) or a non-finite running max decides nothing (see liteattn.reference).
            margin = tile_max - m_i
            negligible = (margin < threshold) & (margin > float("-inf"))
            row_keep = (negligible == 0) & row_valid
            # Collect 32 tiles' flags per row in a register; merge across rows once per 32 tiles.
            bits = bits | (row_keep.to(tl.int32) << (t % 32))
            if (t % 32 == 31) | (t == n_active - 1):
                tl.atomic_or(flag_words + t // 32 + tl.zeros([BLOCK_M], dtype=tl.int32), bits,
                             mask=bits != 0, sem="relaxed")
                bits = tl.zeros([BLOCK_M], dtype=tl.int32)
        if not PER_CALL:
            m_i, l_i, acc = _softmax_step(qk, tile_max, m_i, l_i, acc, v_desc, v_ptr, start_n, offs_n, offs_d,
                                          stride_vs, SEQ_K, qk_scale, HEAD_DIM, USE_TMA, UPCAST)

    if WRITE_STATE:
        # A row whose sum is NaN met a NaN or +inf score: the query tile keeps its whole list, so no skip
        # decision is carried from non-finite scores. With the must-do flag of the query tile this
        # protects every tile (an int: the interpreter of Triton 3.9 cannot mask with a scalar bool).
        keep_all = tl.load(Q_PROT + pid_m).to(tl.int32) | tl.max(((l_i != l_i) & row_valid).to(tl.int32), 0)
        # Compact the survivors into the next list in visiting order, once every warp's atomics are in (barrier).
        tl.debug_barrier()
        n_keep = 0
        for c in range(0, n_active, BLOCK_C):
            offs_c = c + tl.arange(0, BLOCK_C)
            in_range = offs_c < n_active
            # Written by atomics (at L2): read past L1.
            words = tl.load(flag_words + offs_c // 32, mask=in_range, other=0, cache_modifier=".cg")
            flag = (words >> (offs_c % 32)) & 1
            # A full row is visited in ascending order (and the full walk, which writes no state, reads no list).
            ids = tl.where(full_row, offs_c, tl.load(idx_ptr + offs_c, mask=in_range, other=0).to(tl.int32))
            protected = (tl.load(K_PROT + ids, mask=in_range, other=0).to(tl.int32) | keep_all) != 0
            keep = in_range & ((flag != 0) | (offs_c == 0) | protected)
            keep_i = keep.to(tl.int32)
            pos = n_keep + tl.cumsum(keep_i, 0) - keep_i
            tl.debug_barrier()
            tl.store(next_idx_ptr + pos, ids.to(tl.int16), mask=keep)
            n_keep += tl.sum(keep_i, 0)
        tl.store(NEXT_COUNT + state_off, n_keep)

    if PER_CALL:
        tl.store(NEXT_COUNT + state_off, n_used)

    # The output last: storing it before the compaction made ptxas serialize the wgmma pipeline
    # (lab/kernel-notes.md, v5).
    _store_output(O, LSE, acc, l_i, m_i, b, h, pid_bh, offs_m, offs_d, row_valid, stride_ob, stride_os,
                  stride_oh, SEQ_Q, HEAD_DIM, RETURN_LSE)



def launch(spec, call: KernelCall, buffers: LaunchBuffers, order: torch.Tensor | None, qk8: QK8 | None = None,
           only_sixteen: bool = False) -> None:
    """Run the kernel on one call as ``spec`` (a ``"triton"`` :class:`~liteattn.kernels.dispatch.KernelSpec`) says:
    one program per (query tile, batch*head); ``order`` (:func:`.common.launch_order`) launches each head's query
    tiles longest list first, None in index order.

    With ``spec.qk8``, ``qk8`` holds Q and K rounded for this spec's tiles (:func:`.quant.quantize_qk`), and the
    caller adds the rows' smoothing shift to the LSE; ``only_sixteen`` computes only the query tiles it flags to
    compute in 16 bits (those the Hopper kernel leaves) and leaves every other one untouched."""
    if spec.qk8 != (qk8 is not None) or (only_sixteen and qk8 is None):
        raise ValueError(f"qk8: expected the rounded Q and K exactly when spec.qk8 (spec.qk8={spec.qk8}, "
                         f"only_sixteen={only_sixteen}), got {type(qk8).__name__}")
    q, k, v, out = buffers.q, buffers.k, buffers.v, buffers.out
    unused = call.kv_num_blocks  # a placeholder for pointers the kernel does not read
    bsz, nheads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    _lite_attention_fwd[(buffers.qt, bsz * nheads)](
        Q=q, K=k, V=v, O=out, LSE=buffers.lse,
        KV_COUNT=call.kv_num_blocks, KV_IDX=call.kv_indices, NEXT_COUNT=call.next_num_blocks,
        NEXT_IDX=call.next_indices, Q_PROT=call.q_protect, K_PROT=call.k_protect,
        ORDER=call.kv_num_blocks if order is None else order,  # a placeholder the kernel does not read
        FLAGS=buffers.flags, NW=buffers.n_words,
        Q8=qk8.q8 if qk8 else unused, K8=qk8.k8 if qk8 else unused, Q_SCALE=qk8.q_scale if qk8 else unused,
        K_SCALE=qk8.k_scale if qk8 else unused, SIXTEEN=qk8.sixteen if qk8 else unused,
        stride_qb=q.stride(0), stride_qs=q.stride(2), stride_qh=q.stride(1),
        stride_kb=k.stride(0), stride_ks=k.stride(2), stride_kh=k.stride(1),
        stride_vb=v.stride(0), stride_vs=v.stride(2), stride_vh=v.stride(1),
        stride_ob=out.stride(0), stride_os=out.stride(2), stride_oh=out.stride(1),
        H=nheads, GROUP=nheads // k.shape[1], SEQ_Q=seq_q, SEQ_K=seq_k, QT=buffers.qt, KT=buffers.kt,
        qk_scale=call.scale * LOG2E, threshold=call.threshold,
        HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_M=spec.block_m, BLOCK_N=spec.block_n,
        FULL_WALK=spec.walk == FULL_WALK, WRITE_STATE=call.write_state, RETURN_LSE=call.return_lse,
        USE_TMA=spec.tma, RAGGED_K=seq_k % spec.block_n != 0, BLOCK_C=128, USE_ORDER=order is not None,
        UPCAST=spec.upcast, PER_CALL=spec.per_call, QK8=spec.qk8, ONLY_SIXTEEN=only_sixteen,
        enable_fp_fusion=spec.fp_fusion,
    )


# Argument types of an offline build: the pointers are declared 16-byte aligned, as the launcher specializes them
# for the tensors it passes; strides and sequence lengths divisible by 16 (head_dim-aligned BHSD strides).
_POINTER_TYPES = MappingProxyType({"LSE": "*fp32", "KV_COUNT": "*i32", "KV_IDX": "*i16", "NEXT_COUNT": "*i32",
                                   "NEXT_IDX": "*i16", "Q_PROT": "*i8", "K_PROT": "*i8", "ORDER": "*i32",
                                   "FLAGS": "*i32", "Q8": "*i8", "K8": "*i8", "Q_SCALE": "*fp32",
                                   "K_SCALE": "*fp32", "SIXTEEN": "*i8"})


def compile_offline(spec, *, head_dim: int, arch: int = 90, write_state: bool = True, return_lse: bool = True,
                    ragged: bool = True, use_order: bool | None = None, dtype: str = "bf16", num_warps: int = 4,
                    num_stages: int = 2):
    """Compile one specialization of the kernel for ``sm_{arch}`` without a GPU (Triton's bundled assembler), for
    compiler reports and code comparisons. ``use_order``: claim query tiles in ``order`` (default: where the spec's
    work order is not index order). Returns Triton's compiled kernel (``.asm`` has ``ttir``, ``ptx``, ``cubin``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if use_order is None:
        use_order = spec.work_order != "index"
    fn = _lite_attention_fwd.fn
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=spec.block_m,
                      BLOCK_N=spec.block_n, FULL_WALK=spec.walk == FULL_WALK, WRITE_STATE=write_state,
                      RETURN_LSE=return_lse, USE_TMA=spec.tma, RAGGED_K=ragged, BLOCK_C=128, USE_ORDER=use_order,
                      UPCAST=spec.upcast, PER_CALL=spec.per_call, QK8=spec.qk8, ONLY_SIXTEEN=False)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "O"):
            signature[name] = "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _POINTER_TYPES:
            signature[name] = _POINTER_TYPES[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "threshold"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("SEQ_Q", "SEQ_K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   "enable_fp_fusion": spec.fp_fusion})
