"""Public API: the functional :func:`lite_attention` and the stateful :class:`LiteAttention`.

Why a stateful module: the skip set is carried from one denoising step to the
next, per attention layer and per generation. :class:`LiteAttention` owns that
state (one instance per layer), counts steps for per-step thresholds, and
records how much each call skipped. :func:`lite_attention` is the same
computation with the state passed in and out explicitly.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from . import _validation as V
from .kernels import TRITON_AVAILABLE, default_block_sizes
from .reference import lite_attention_reference
from .state import SkipState, tile_protection

__all__ = ["LiteAttention", "lite_attention", "skip_softmax_attention"]


def _to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    x = x.transpose(1, 2) if layout == "bshd" else x
    return x if x.stride(-1) == 1 else x.contiguous()


def _prepare_state(state, bsz, nheads, seq_q, seq_k, block_size, device) -> SkipState:
    bm, bn = block_size
    if state is not None:
        if not isinstance(state, SkipState):
            raise ValueError(f"state: expected a liteattn.SkipState or None, got {type(state).__name__}")
        if state.matches(bsz, nheads, seq_q, seq_k, bm, bn, device):
            return _outside_inference_mode(state)
        warnings.warn(
            f"liteattn: the skip state was built for {state!r} but the inputs are B={bsz}, H={nheads}, "
            f"seq_len=({seq_q}, {seq_k}), tiles=({bm}, {bn}) on {device}; starting a fresh state "
            "(nothing skipped). Call reset() when a new generation starts to silence this.",
            stacklevel=3,
        )
    return SkipState.full(bsz, nheads, seq_q, seq_k, bm, bn, device)


def _outside_inference_mode(state: SkipState) -> SkipState:
    """``state``, or a copy of its lists in ordinary tensors when it was made under ``torch.inference_mode()``
    and this call is not: the call writes into the state's buffers, and torch forbids writing into inference
    tensors outside inference mode (a generation may well start inside it and go on outside). The copy drops
    the spare buffers, which are inference tensors too; the next call allocates new ones."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return state
    if not (state.kv_num_blocks.is_inference() or state.kv_indices.is_inference()
            or (state._spare is not None and state._spare[0].is_inference())):
        return state
    copy = SkipState(state.kv_num_blocks.clone(), state.kv_indices.clone(), state.seq_len_q, state.seq_len_k,
                     state.block_m, state.block_n, state.calls, _trusted=True)
    return copy._marked_fresh() if state.is_fresh() else copy


def _validated(q, k, v, layout, backend, threshold, scale, must_do, return_lse):
    """The arguments both attention functions share, checked (a ValueError naming the argument) and resolved:
    ``(layout, backend, (B, H, S_q, S_k, D), threshold, scale, must-do ranges)``."""
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse: expected True or False, got {return_lse!r}")
    layout = V.validate_layout(layout)
    backend = V.validate_backend(backend, q.device, TRITON_AVAILABLE) if isinstance(q, torch.Tensor) else backend
    bsz, nheads, _, seq_q, seq_k, dim = V.validate_qkv(q, k, v, layout, kernel=backend == "triton")
    return (layout, backend, (bsz, nheads, seq_q, seq_k, dim), V.validate_threshold(threshold),
            V.validate_scale(scale), V.validate_must_do(must_do, seq_k))


def lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SkipState | None = None,
    *,
    threshold: float = -10.0,
    scale: float | None = None,
    must_do: Sequence[tuple[int, int]] | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    enabled: bool = True,
    block_size: tuple[int, int] | None = None,
    backend: str = "auto",
    qk_dtype: str | None = None,
    pv_dtype: str | None = None,
):
    """Attention over the key tiles ``state`` keeps active; marks new negligible tiles.

    Args:
        q: ``(B, S_q, H, D)`` for ``layout="bshd"`` (FlashAttention/Wan) or
            ``(B, H, S_q, D)`` for ``"bhsd"`` (SDPA); bf16/fp16 on GPU (the
            PyTorch path also takes fp32/fp64).
        k, v: same layout, ``H_kv`` heads with ``H % H_kv == 0`` (GQA/MQA).
        state: the :class:`SkipState` from the previous step of this layer, or
            None for the first step (everything active). A state built for
            other shapes is replaced by a fresh one, with a warning.
        threshold: negative, log2 units. A key tile is marked when, for every
            query row of the tile, ``(max_j s_rj - m_r) * log2(e) < threshold``
            with ``m_r`` the running max before the tile. ``-inf`` marks nothing.
        scale: softmax scale, default ``D ** -0.5``.
        must_do: token ranges ``[(start, end), ...]`` (end exclusive) that are
            never skipped: no key tile overlapping one is marked, and no tile of
            a query tile overlapping one (e.g. text tokens in joint attention).
        layout: ``"bshd"`` (default) or ``"bhsd"``.
        return_lse: also return the log-sum-exp ``(B, H, S_q)`` float32 (natural
            log), for merging partial attentions (ring attention).
        enabled: False runs dense attention over all tiles and returns ``state``
            unchanged.
        block_size: ``(block_m, block_n)`` tiles; default per head_dim
            (:func:`liteattn.kernels.default_block_sizes`). Ignored when a
            matching state is given.
        backend: ``"auto"`` (Triton on GPU, PyTorch elsewhere), ``"triton"`` or
            ``"torch"``.
        qk_dtype: ``None`` (default): scores from q and k as they are. ``"int8"``: from q and k rounded to
            int8 after subtracting k's mean over the keys (which changes no softmax and no skip decision), one
            scale per tile, as SageAttention rounds them; P.V stays in 16 bits. ``"fp8"`` (e4m3) in the PyTorch
            path only. The rules: :mod:`liteattn.reference`; its accuracy on a DiT's q/k: ``lab/results/qk8``.
        pv_dtype: ``None`` (default): P.V in 16 bits. ``"fp8"``: from P and V rounded to float8 e4m3 (V one scale
            per channel), as SageAttention2 computes it; needs ``qk_dtype="int8"``, and on a GPU the Hopper
            kernel (head_dim 64 or 128). It pays where a call is long enough to run at the GPU's power limit
            (docs/benchmarks.md).

    NaN or infinite values in q, k, v give what dense attention over the same tiles gives (NaN rows where
    SDPA has them), and no skip decision made from non-finite scores reaches ``next_state``: a query tile that
    met a NaN or +inf score keeps all its tiles (the rules: :mod:`liteattn.reference`).

    Returns:
        ``(out, next_state)``, or ``(out, lse, next_state)`` with ``return_lse``.
        ``out`` has q's shape and layout. ``next_state`` reuses ``state``'s spare
        buffers: keep ``state.clone()`` if you need the old one after the next call.
    """
    layout, backend, (bsz, nheads, seq_q, seq_k, dim), threshold, scale, ranges = _validated(
        q, k, v, layout, backend, threshold, scale, must_do, return_lse)
    qk_dtype = V.validate_qk_dtype(qk_dtype, backend, dim)
    pv_dtype = V.validate_pv_dtype(pv_dtype, qk_dtype, backend, dim)
    if state is not None and block_size is None and isinstance(state, SkipState):
        block_size = (state.block_m, state.block_n)
    block_size = V.validate_block_size(block_size) or default_block_sizes(dim)
    state = _prepare_state(state, bsz, nheads, seq_q, seq_k, block_size, q.device)
    scale = dim ** -0.5 if scale is None else scale

    qh, kh, vh = (_to_bhsd(x, layout) for x in (q, k, v))
    write = enabled and threshold > -math.inf
    if backend == "torch":
        out, lse, (counts, indices) = lite_attention_reference(
            qh, kh, vh, state, threshold, scale, ranges,
            compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
            write_state=write, qk_dtype=qk_dtype, pv_dtype=pv_dtype,
        ) if enabled else _dense_reference(qh, kh, vh, state, scale, qk_dtype, pv_dtype)
        if write:  # same buffer discipline as the kernel: the next state lives in the spare pair
            spare_counts, spare_indices = state.next_buffers()
            counts, indices = spare_counts.copy_(counts), spare_indices.copy_(indices)
    else:
        from .kernels.common import FULL_WALK, LIST_WALK, KernelCall
        from .kernels.op import run_forward

        counts, indices = state.next_buffers() if write else (state.kv_num_blocks, state.kv_indices)
        out, lse = run_forward(KernelCall(
            qh, kh, vh, state.kv_num_blocks, state.kv_indices, counts, indices,
            tile_protection(ranges, seq_q, state.block_m, q.device),
            tile_protection(ranges, seq_k, state.block_n, q.device),
            scale, threshold, state.block_m, state.block_n,
            # A fresh state (every list ascending and full) is walked in full, like dense attention, when nothing
            # can be marked; with detection on, the list walk takes it (full rows ascend there too, whatever the
            # list holds), which was 1.5-5 % faster than the full walk at 75k-119k tokens (lab/kernel-notes.md v10).
            FULL_WALK if not enabled or (state.is_fresh() and not write) else LIST_WALK, write, return_lse,
            qk8=qk_dtype == "int8", pv8=pv_dtype == "fp8",
        ))
    next_state = state.advanced(counts, indices) if write else state
    out = out.transpose(1, 2) if layout == "bshd" else out
    return (out, lse, next_state) if return_lse else (out, next_state)


def skip_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    threshold: float,
    scale: float | None = None,
    must_do: Sequence[tuple[int, int]] | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    block_size: tuple[int, int] | None = None,
    backend: str = "auto",
):
    """Attention that leaves out of *this* call the key tiles negligible by liteattn's rule, and carries nothing.

    This is the serving stacks' skip-softmax rule (NVIDIA's BLASST), offered beside liteattn's so that the two can be
    compared on the same kernel: every key tile's QK is computed; a tile whose every query row of the tile has
    ``(max_j s_rj - m_r) * log2(e) < threshold`` (``m_r`` the running max before it; never the first tile, never a
    must-do tile) skips its exponentials and P.V. :func:`lite_attention` instead keeps such a tile in the call that
    found it and skips its QK, exponentials and P.V in every later call; that saves more per skipped tile, and is
    what liteattn is for.

    Args:
        q, k, v, scale, must_do, layout, return_lse, backend: as :func:`lite_attention`.
        threshold: negative, log2 units (``-inf`` skips nothing).
        block_size: ``(block_m, block_n)``: the query rows that decide together and the key tile. Default
            ``(64, block_n of the head_dim's default tiles)``: 64 rows is one consumer warpgroup of the Hopper kernel,
            which decides on its own rows.

    Returns:
        ``(out, used)``, or ``(out, lse, used)`` with ``return_lse``. ``used``: int32 ``(B, H, query tiles)``, the key
        tiles each query tile used (the skipped fraction is ``1 - used.sum() / (used.numel() * key tiles)``).
    """
    layout, backend, (bsz, nheads, seq_q, seq_k, dim), threshold, scale, ranges = _validated(
        q, k, v, layout, backend, threshold, scale, must_do, return_lse)
    block_m, block_n = V.validate_block_size(block_size) or (64, default_block_sizes(dim)[1])
    scale = dim ** -0.5 if scale is None else scale
    qh, kh, vh = (_to_bhsd(x, layout) for x in (q, k, v))
    if backend == "torch":
        full = SkipState.full(bsz, nheads, seq_q, seq_k, block_m, block_n, q.device)
        out, lse, (used, _) = lite_attention_reference(
            qh, kh, vh, full, threshold, scale, ranges,
            compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, skip_softmax=True)
    else:
        from .kernels.common import FULL_WALK, KernelCall
        from .kernels.op import run_forward

        used = torch.empty(bsz, nheads, -(-seq_q // block_m), dtype=torch.int32, device=q.device)
        # The full walk reads no list and this call writes none: empty placeholders.
        no_counts = torch.empty(0, dtype=torch.int32, device=q.device)
        no_indices = torch.empty(0, dtype=torch.int16, device=q.device)
        out, lse = run_forward(KernelCall(
            qh, kh, vh, no_counts, no_indices, used, no_indices,
            tile_protection(ranges, seq_q, block_m, q.device), tile_protection(ranges, seq_k, block_n, q.device),
            scale, threshold, block_m, block_n, FULL_WALK, False, return_lse, per_call=True))
    out = out.transpose(1, 2) if layout == "bshd" else out
    return (out, lse, used) if return_lse else (out, used)


def _dense_reference(qh, kh, vh, state: SkipState, scale: float, qk_dtype: str | None = None,
                     pv_dtype: str | None = None):
    full = SkipState.full(*state.shape[:2], state.seq_len_q, state.seq_len_k, state.block_m, state.block_n, qh.device)
    out, lse, _ = lite_attention_reference(
        qh, kh, vh, full, float("-inf"), scale,
        compute_dtype=torch.float64 if qh.dtype == torch.float64 else torch.float32, write_state=False,
        qk_dtype=qk_dtype, pv_dtype=pv_dtype)
    return out, lse, (state.kv_num_blocks, state.kv_indices)


class LiteAttention(nn.Module):
    """Temporal sparse attention for one attention layer of a diffusion transformer.

    Create one instance per attention layer; call it once per denoising step.
    Each call computes only the key tiles still active, marks newly negligible
    tiles, and carries the skip set to the next call. Call :meth:`reset` when a
    new generation starts.

    Args:
        threshold: negative log2 threshold (e.g. ``-10.0``; ``-inf`` = never
            mark), or a per-step schedule (sequence indexed by the call number
            since :meth:`reset`; the last value repeats).
        enabled: False computes dense attention and keeps the state.
        must_do: token ranges never skipped (see :func:`lite_attention`).
        must_do_list: the same ranges in the CUDA LiteAttention's flat form,
            ascending ``[start0, end0, ...]`` or descending ``[end_n, start_n,
            ...]`` (:func:`liteattn._validation.flat_to_ranges`).
        layout: ``"bshd"`` (default) or ``"bhsd"``.
        block_size: ``(block_m, block_n)`` tile sizes, default per head_dim.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        qk_dtype: None, ``"int8"`` or ``"fp8"``: 8-bit Q.K^T (see :func:`lite_attention`).
        pv_dtype: None or ``"fp8"``: fp8 P.V, with 8-bit Q.K^T (see :func:`lite_attention`).

    Example::

        attn = LiteAttention(threshold=-10.0)
        for step in range(num_steps):
            out = attn(q, k, v)          # (B, S, H, D)
        print(attn.history)              # skipped fraction per call
        attn.reset()                     # next generation
    """

    def __init__(self, threshold: float | Sequence[float] = -10.0, *, enabled: bool = True,
                 must_do: Sequence[tuple[int, int]] | None = None, layout: str = "bshd",
                 block_size: tuple[int, int] | None = None, backend: str = "auto",
                 must_do_list: Sequence[int] | None = None, qk_dtype: str | None = None,
                 pv_dtype: str | None = None):
        super().__init__()
        V.validate_qk_dtype(qk_dtype, "torch", 64)  # the name; what the backend and head_dim take, at the call
        V.validate_pv_dtype(pv_dtype, qk_dtype, "torch", 64)
        self.set_threshold(threshold)
        self.enabled = bool(enabled)
        if must_do_list is not None:
            if must_do is not None:
                raise ValueError("must_do and must_do_list: pass one of them, not both")
            must_do = V.flat_to_ranges(must_do_list)
        self.must_do = list(must_do) if must_do is not None else None
        self.layout = V.validate_layout(layout)
        self.block_size = V.validate_block_size(block_size)
        self.backend, self.qk_dtype, self.pv_dtype = backend, qk_dtype, pv_dtype
        self.state: SkipState | None = None
        self._spent: SkipState | None = None  # the state before the last reset(), its buffers reused when they fit
        self.step = 0
        self._history: list[torch.Tensor | float] = []

    # -- configuration -------------------------------------------------------------
    def set_threshold(self, threshold: float | Sequence[float]) -> None:
        """A negative float, or a per-step sequence of them."""
        schedule = V.validate_threshold_schedule(threshold)
        self._thresholds = list(schedule) if isinstance(schedule, tuple) else [schedule]

    @property
    def threshold(self) -> float:
        """The threshold the next call uses."""
        return self._thresholds[min(self.step, len(self._thresholds) - 1)]

    @threshold.setter
    def threshold(self, value) -> None:
        self.set_threshold(value)

    def enable_skip_optimization(self, enable: bool = True) -> None:
        """Alias of ``self.enabled = enable`` (LiteAttention's name)."""
        self.enabled = bool(enable)

    # -- state -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the skip state and step counter: a new generation starts.

        The state's buffers are kept and refilled by the next call when its
        inputs have the same shapes, so every generation computes in the same
        memory (what CUDA graphs captured on an earlier generation need). Keep
        ``state.clone()`` to read the old state after the next call.
        """
        if self.state is not None:
            self._spent = self.state
        self.state = None
        self.step = 0
        self._history = []

    def _reusable_state(self, q, k) -> SkipState | None:
        """The last generation's state, refilled, when it fits these inputs; else None (a fresh one is built)."""
        spent, self._spent = self._spent, None
        if spent is None or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 \
                or k.dim() != 4:
            return None
        if spent.kv_indices.is_inference() and not torch.is_inference_mode_enabled():
            return None  # inference tensors cannot be written outside inference mode
        bsz, seq_q, heads, seq_k = ((q.shape[0], q.shape[1], q.shape[2], k.shape[1]) if self.layout == "bshd"
                                    else (q.shape[0], q.shape[2], q.shape[1], k.shape[2]))
        block_m, block_n = self.block_size or default_block_sizes(q.shape[-1])
        if not spent.matches(bsz, heads, seq_q, seq_k, block_m, block_n, q.device):
            return None
        return spent.refill_()

    reset_skip_state = reset  # LiteAttention's name

    @property
    def history(self) -> list[float]:
        """Fraction of tiles skipped (not computed) in each call since :meth:`reset`."""
        self._history = [float(h) for h in self._history]
        return list(self._history)

    @property
    def last_sparsity(self) -> float | None:
        """Fraction of tiles skipped in the last call, None before the first."""
        return self.history[-1] if self._history else None

    # -- forward ---------------------------------------------------------------------
    def forward(self, q, k, v, scale: float | None = None, return_lse: bool = False,
                must_do: Sequence[tuple[int, int]] | None = None, *,
                return_softmax_lse: bool | None = None, must_do_list: Sequence[int] | None = None):
        """``out`` (like q), or ``(out, lse)`` with ``return_lse`` / ``return_softmax_lse``.

        ``must_do`` overrides the instance's ranges for this call;
        ``must_do_list`` takes the CUDA LiteAttention's flat form, ascending
        ``[start0, end0, ...]`` or descending ``[end_n, start_n, ...]``.
        """
        if return_softmax_lse is not None:
            return_lse = return_softmax_lse
        if must_do_list is not None:
            if must_do is not None:
                raise ValueError("must_do and must_do_list: pass one of them, not both")
            must_do = V.flat_to_ranges(must_do_list)
        if must_do is None:
            must_do = self.must_do
        threshold = self.threshold
        if self.state is None and self._spent is not None:
            self.state = self._reusable_state(q, k)
        result = lite_attention(
            q, k, v, self.state, threshold=threshold, scale=scale, must_do=must_do, layout=self.layout,
            return_lse=return_lse, enabled=self.enabled, block_size=self.block_size, backend=self.backend,
            qk_dtype=self.qk_dtype, pv_dtype=self.pv_dtype,
        )
        next_state = result[-1]
        if self.enabled:
            # The counts this call read: the returned state's spare pair when it wrote a new one.
            wrote = threshold > -math.inf
            read_counts = next_state._spare[0] if wrote else next_state.kv_num_blocks
            # Kept as a device tensor: no sync until history is read.
            self._history.append(1.0 - read_counts.sum(dtype=torch.int64) / float(math.prod(next_state.shape)))
        else:
            self._history.append(0.0)
        self.state = next_state
        self.step += 1
        return result[:2] if return_lse else result[0]

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, enabled={self.enabled}, layout={self.layout!r}, "
                f"step={self.step}, must_do={self.must_do}")
