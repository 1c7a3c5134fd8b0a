"""Triton forward kernel: FlashAttention over each query tile's active key tiles.

One program owns one (query tile, batch*head). It walks its active list
(see :class:`liteattn.SkipState`), and for every key tile:

- computes ``qk = q kᵀ · scale · log2(e)`` (log2 domain, so ``exp2`` is used and
  the threshold compares directly),
- scores the tile against the running row max *before* it; a tile whose every
  valid row falls more than ``|threshold|`` below is marked (never the first
  tile visited, never a must-do tile) and left out of the next list,
- updates the online softmax with the tile anyway.

K/V tiles are read either through device-side TMA tensor descriptors (Hopper
and newer: the copy engine moves whole tiles, which is what closes most of the
gap to cuDNN) or with plain pointer loads (every other GPU and the CPU
interpreter). Block sizes come from the skip state, never from autotuning,
because they define the state's tiles.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Launch query tiles of each head in decreasing order of active key tiles (longest first): the hardware
# schedules a grid's programs in launch order, so the longest go first and the short ones fill the tail.
# The persistent kernel has its own rule (hopper_persistent.ORDER_BY_WORK): its programs claim items.
SCHEDULE_BY_WORK = True
# Detection flags. True: each row ORs its "not negligible" bits into a 32-bit register word, merged into
# memory with relaxed atomic ORs once per 32 tiles (no per-tile store, no cross-warp reduction).
# False: one masked flag store per row and tile into the next list (KERNEL_NOTES.md, v1 and v5).
FLAG_WORDS = True
# Multiply-adds fused into FMAs, as every kernel version was measured with. Passed explicitly: Triton 3.9 warns that
# its default (fused) changes to unfused in 3.10, which would change the kernels' code and rounding.
FP_FUSION = True
# On Hopper (sm90), run the warp-specialized Gluon kernel of :mod:`liteattn.kernels.hopper` where it applies.
SM90_KERNEL = True
# ... as one persistent program per SM (:mod:`liteattn.kernels.hopper_persistent`) instead of one per query tile.
SM90_PERSISTENT = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_configs():
    if _interpreting():
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


@triton.autotune(configs=_autotune_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "DENSE", "WRITE_STATE", "USE_TMA", "FLAG_WORDS"])
@triton.jit
def _lite_attention_fwd(
    Q, K, V, O, LSE,
    KV_COUNT, KV_IDX, NEXT_COUNT, NEXT_IDX, Q_PROT, K_PROT, ORDER, FLAGS, NW,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    H, GROUP, SEQ_Q, SEQ_K, QT, KT,
    qk_scale, threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, WRITE_STATE: tl.constexpr, RETURN_LSE: tl.constexpr, USE_TMA: tl.constexpr,
    RAGGED_K: tl.constexpr, BLOCK_C: tl.constexpr, USE_ORDER: tl.constexpr,
    UPCAST: tl.constexpr, FLAG_WORDS: tl.constexpr,
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
    if DENSE:
        n_active = KT
    else:
        n_active = tl.load(KV_COUNT + state_off)
    full_row = n_active == KT  # a full row is visited in ascending order, whatever its list holds
    idx_ptr = KV_IDX + state_off * KT
    next_idx_ptr = NEXT_IDX + state_off * KT
    flag_words = FLAGS + state_off * NW
    bits = tl.zeros([BLOCK_M], dtype=tl.int32)  # per row: bit (t % 32) set if tile t is not negligible
    if WRITE_STATE and not FLAG_WORDS:
        # The next list doubles as a scratch row of "some row was not negligible" flags,
        # one per visited position; zero it first (barrier: the flag stores must land after).
        for c in range(0, n_active, BLOCK_C):
            offs_c = c + tl.arange(0, BLOCK_C)
            tl.store(next_idx_ptr + offs_c, tl.zeros([BLOCK_C], dtype=tl.int16), mask=offs_c < n_active)
        tl.debug_barrier()
    flag_ptrs = next_idx_ptr + tl.zeros([BLOCK_M], dtype=tl.int32)  # [BM], all the same address
    ones = tl.full([BLOCK_M], 1, dtype=tl.int16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    j_next = tl.load(idx_ptr).to(tl.int32)
    for t in range(0, n_active):
        if DENSE:
            j = t
        else:  # the next tile's index is loaded one iteration ahead (KERNEL_NOTES.md, v2)
            j = tl.where(full_row, t, j_next)
            j_next = tl.load(idx_ptr + tl.minimum(t + 1, n_active - 1)).to(tl.int32)
        start_n = j * BLOCK_N
        b_kt = _load_kv_tile(k_desc, k_ptr, start_n, offs_n, offs_d, stride_ks, SEQ_K, HEAD_DIM, USE_TMA, True)
        if UPCAST:
            b_kt = b_kt.to(tl.float32)
        qk = tl.dot(b_q, b_kt)  # [BM, BN], unscaled
        if RAGGED_K:
            if j == KT - 1:  # only the last key tile has columns past SEQ_K
                qk = tl.where(((start_n + offs_n) < SEQ_K)[None, :], qk, float("-inf"))
        tile_max = tl.max(qk, 1) * qk_scale  # [BM]
        if WRITE_STATE:
            # Rows for which this tile is NOT negligible raise the flag of position t. No
            # cross-warp reduction here: the per-tile "all rows" test is resolved after the loop.
            # Only a finite margin below the threshold finds a tile negligible: a -inf tile max (every
            # score -inf) or a non-finite running max decides nothing (see liteattn.reference).
            margin = tile_max - m_i
            negligible = (margin < threshold) & (margin > float("-inf"))
            row_keep = (negligible == 0) & row_valid
            if FLAG_WORDS:
                # Collect 32 tiles' flags per row in a register; merge across rows once per 32 tiles.
                bits = bits | (row_keep.to(tl.int32) << (t % 32))
                if (t % 32 == 31) | (t == n_active - 1):
                    tl.atomic_or(flag_words + t // 32 + tl.zeros([BLOCK_M], dtype=tl.int32), bits,
                                 mask=bits != 0, sem="relaxed")
                    bits = tl.zeros([BLOCK_M], dtype=tl.int32)
            else:
                tl.store(flag_ptrs + t, ones, mask=row_keep)
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
        m_i = m_new

    if WRITE_STATE:
        # A row whose sum is NaN met a NaN or +inf score: the query tile keeps its whole list, so no skip
        # decision is carried from non-finite scores. With the must-do flag of the query tile this
        # protects every tile (an int: the interpreter of Triton 3.9 cannot mask with a scalar bool).
        keep_all = tl.load(Q_PROT + pid_m).to(tl.int32) | tl.max(((l_i != l_i) & row_valid).to(tl.int32), 0)
        # Compact the survivors in visiting order, in place over the flags (write position <= read
        # position, and each chunk is fully read before it is written).
        tl.debug_barrier()
        n_keep = 0
        for c in range(0, n_active, BLOCK_C):
            offs_c = c + tl.arange(0, BLOCK_C)
            in_range = offs_c < n_active
            if FLAG_WORDS:  # written by atomics (at L2): read past L1
                words = tl.load(flag_words + offs_c // 32, mask=in_range, other=0, cache_modifier=".cg")
                flag = (words >> (offs_c % 32)) & 1
            else:
                flag = tl.load(next_idx_ptr + offs_c, mask=in_range, other=0)
            if DENSE:
                ids = offs_c
            else:
                ids = tl.where(full_row, offs_c, tl.load(idx_ptr + offs_c, mask=in_range, other=0).to(tl.int32))
            protected = (tl.load(K_PROT + ids, mask=in_range, other=0).to(tl.int32) | keep_all) != 0
            keep = in_range & ((flag != 0) | (offs_c == 0) | protected)
            keep_i = keep.to(tl.int32)
            pos = n_keep + tl.cumsum(keep_i, 0) - keep_i
            tl.debug_barrier()
            tl.store(next_idx_ptr + pos, ids.to(tl.int16), mask=keep)
            n_keep += tl.sum(keep_i, 0)
        tl.store(NEXT_COUNT + state_off, n_keep)

    # The output last: storing it before the compaction made ptxas serialize the wgmma pipeline
    # (KERNEL_NOTES.md, v5).
    _store_output(O, LSE, acc, l_i, m_i, b, h, pid_bh, offs_m, offs_d, row_valid, stride_ob, stride_os,
                  stride_oh, SEQ_Q, HEAD_DIM, RETURN_LSE)


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_index(device: torch.device) -> int:
    """A CUDA device as an index (plain ``"cuda"`` is the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device, looked up once per GPU: every call asks for it (twice), and
    torch's lookup costs microseconds of host time each, which a 0.4 ms sparse call cannot spare."""
    return _capability(device_index(device))


def tma_supported(device: torch.device) -> bool:
    """Device-side tensor descriptors need a Hopper (sm90) or newer NVIDIA GPU."""
    if _interpreting() or device.type != "cuda" or torch.version.hip is not None:
        return False
    return device_capability(device)[0] >= 9


def _tma_ready(x: torch.Tensor) -> bool:
    """Unit head_dim stride and 16-byte aligned, non-zero strides and base, as TMA tile copies need (a
    broadcast dimension, stride 0, is copied rather than handed to a tensor map)."""
    strides = x.stride()[:-1]
    aligned = x.stride(-1) == 1 and all(s > 0 and (s * x.element_size()) % 16 == 0 for s in strides)
    return aligned and x.data_ptr() % 16 == 0


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    return x if _tma_ready(x) else x.contiguous()


@functools.lru_cache(maxsize=None)
def _hopper_module():
    """The Gluon kernel's module, or None (after one warning) where this Triton is not one it is tested with
    (:data:`liteattn.kernels._gluon.TESTED`) or lacks Gluon's Hopper API. Asked only for calls on an sm90 GPU,
    so other GPUs, which run the portable kernel by design, see no warning."""
    from . import _gluon

    if not _gluon.tested():
        lo, hi = (".".join(map(str, v)) for v in _gluon.TESTED)
        _warn_portable(f"Triton {triton.__version__} is outside the releases it is tested with ({lo} to {hi}.x)")
        return None
    try:
        from . import hopper
    except ImportError as exc:  # a Triton build without Gluon's Hopper module
        _warn_portable(f"this Triton build has no Gluon Hopper API ({exc})")
        return None
    return hopper


@functools.lru_cache(maxsize=None)
def _persistent_module():
    """The persistent Gluon kernel's module, or None (as :func:`_hopper_module`)."""
    if _hopper_module() is None:
        return None
    try:
        from . import hopper_persistent
    except ImportError as exc:  # a Triton build without host-side Gluon tensor descriptors
        _warn_portable(f"this Triton build has no host-side Gluon tensor descriptors ({exc})")
        return None
    return hopper_persistent


def _warn_portable(reason: str) -> None:
    warnings.warn(f"liteattn: the Hopper (sm90) kernel is not used: {reason}; running the portable Triton kernel "
                  "instead (same results, slower on Hopper)", RuntimeWarning, stacklevel=4)


# Triton versions whose Gluon build of the Hopper kernels failed in this process: later calls go straight to the
# portable kernel instead of failing to compile again on every call. A record of what happened, not a setting.
_GLUON_BUILD_FAILED: dict[str, str] = {}


def _is_build_error(exc: BaseException) -> bool:
    """A failure to compile (Triton's front end, its passes, ptxas), which leaves every buffer untouched; an error
    of the launch itself (a CUDA error) is not one and is raised."""
    from triton.compiler.errors import CompilationError

    if isinstance(exc, CompilationError):
        return True
    return type(exc).__module__.startswith("triton.") and "CUDA" not in str(exc)


def _on_hopper(q: torch.Tensor) -> bool:
    """An NVIDIA sm90 GPU (H100, H200), the one the Gluon kernels are written for."""
    return q.device.type == "cuda" and torch.version.hip is None and device_capability(q.device) == (9, 0)


def _sm90_kernel_applies(q, k, out, block_m, block_n) -> bool:
    """A Hopper GPU, the kernel's tile shapes, a TMA-ready output and a Triton that builds the Gluon kernel;
    anything else runs the Triton kernel."""
    if not _on_hopper(q) or triton.__version__ in _GLUON_BUILD_FAILED:
        return False
    hopper = _hopper_module()
    return hopper is not None and _tma_ready(out) and hopper.supports(q, k, block_m, block_n)


def _launch_sm90(launch) -> bool:
    """Run a Gluon launch; False where this Triton cannot build the kernel (one warning per process; the
    caller then runs the portable kernel on the untouched buffers)."""
    try:
        launch()
    except Exception as exc:  # noqa: BLE001 - narrowed by _is_build_error, everything else is raised
        if not _is_build_error(exc):
            raise
        # Triton's compile errors start with the source location and excerpt; the reason is the last line.
        reason = ([line.strip() for line in str(exc).splitlines() if line.strip()] or [""])[-1][:300]
        _GLUON_BUILD_FAILED[triton.__version__] = f"{type(exc).__name__}: {reason}"
        _warn_portable(f"Triton {triton.__version__} failed to build it ({_GLUON_BUILD_FAILED[triton.__version__]})")
        return False
    return True


def lite_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    next_num_blocks: torch.Tensor, next_indices: torch.Tensor,
    q_protect: torch.Tensor, k_protect: torch.Tensor,
    scale: float, threshold: float, block_m: int, block_n: int,
    dense: bool, write_state: bool, return_lse: bool, use_tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch on BHSD-strided views (any strides with unit head_dim stride).

    Inputs must already be validated (see :mod:`liteattn.attention`). Returns
    ``out`` with q's strides order (BHSD view) and ``lse (B, H, S_q)`` float32
    (an empty tensor when ``return_lse`` is False).
    """
    out = torch.empty_like(q)  # the caller's strides (matches the op's fake implementation)
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    bsz, nheads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    lse = torch.empty((bsz, nheads, seq_q) if return_lse else (0,), dtype=torch.float32, device=q.device)
    qt, kt = triton.cdiv(seq_q, block_m), triton.cdiv(seq_k, block_n)
    if use_tma is None:
        use_tma = tma_supported(q.device)
    if use_tma:
        triton.set_allocator(_tma_allocator)
    grid = (qt, bsz * nheads)
    sm90 = SM90_KERNEL and use_tma and _sm90_kernel_applies(q, k, out, block_m, block_n)
    # One more zeroed word per query tile than its tiles need (32 per word): a consumer of the Gluon kernels that
    # met a NaN or +inf score sets it, and the compaction then keeps the whole list.
    n_words = triton.cdiv(kt, 32) + 1
    # The atomics merge into zeroed words; one more zeroed word counts the persistent kernel's work items.
    n_flags = bsz * nheads * qt * n_words if write_state and (FLAG_WORDS or sm90) else 0
    flags = torch.zeros(n_flags + 1, dtype=torch.int32, device=q.device)
    if sm90:
        persistent = _persistent_module() if SM90_PERSISTENT else None
        use_order = not dense and (persistent.order_by_work(k) if persistent is not None else SCHEDULE_BY_WORK)
        args = _launch_args(q, k, v, out, lse, kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect,
                            k_protect, flags, n_words, scale, threshold, qt, kt, use_order)
        options = dict(dim=dim, seq_k=seq_k, block_m=block_m, block_n=block_n, dense=dense, write_state=write_state,
                       return_lse=return_lse, use_order=use_order)
        if persistent is not None:
            built = _launch_sm90(lambda: persistent.launch(args, **options))
        else:
            built = _launch_sm90(lambda: _hopper_module().launch(grid, args, **options))
        if built:
            return out, lse
    use_order = not dense and SCHEDULE_BY_WORK
    args = _launch_args(q, k, v, out, lse, kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect,
                        k_protect, flags, n_words, scale, threshold, qt, kt, use_order)
    _lite_attention_fwd[grid](
        *args,
        HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_M=block_m, BLOCK_N=block_n,
        DENSE=dense, WRITE_STATE=write_state, RETURN_LSE=return_lse, USE_TMA=use_tma,
        RAGGED_K=seq_k % block_n != 0, BLOCK_C=128, USE_ORDER=use_order,
        UPCAST=_interpreting() and q.dtype == torch.bfloat16, FLAG_WORDS=FLAG_WORDS,
        enable_fp_fusion=FP_FUSION,
    )
    return out, lse


def _launch_args(q, k, v, out, lse, kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect, k_protect,
                 flags, n_words, scale, threshold, qt, kt, use_order):
    """The runtime arguments every kernel takes: the tensors, BHSD strides, shapes and the scaled constants."""
    bsz, nheads, seq_q, _ = q.shape
    # Stable: rows of equal length keep index order (neighbouring query tiles, often neighbouring key tiles).
    order = (torch.argsort(kv_num_blocks, dim=-1, descending=True, stable=True).to(torch.int32) if use_order
             else kv_num_blocks)
    return (
        q, k, v, out, lse,
        kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect, k_protect, order, flags, n_words,
        q.stride(0), q.stride(2), q.stride(1),
        k.stride(0), k.stride(2), k.stride(1),
        v.stride(0), v.stride(2), v.stride(1),
        out.stride(0), out.stride(2), out.stride(1),
        nheads, nheads // k.shape[1], seq_q, k.shape[2], qt, kt,
        scale * LOG2E, threshold,
    )
