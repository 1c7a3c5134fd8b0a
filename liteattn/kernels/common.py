"""What every kernel launch shares: the call's typed arguments, the buffers derived from them, device queries.

Why a module of its own: the dispatcher (:mod:`.dispatch`) and both kernels (:mod:`.portable`, :mod:`.sm90`)
need these, and the kernels must not import the dispatcher (nor each other), so that the package has no import
cycle and each kernel module can be read on its own.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["FULL_WALK", "LIST_WALK", "LOG2E", "WALKS", "KernelCall", "LaunchBuffers", "device_capability",
           "device_index", "interpreting", "kernel_ready", "l2_bytes", "launch_order", "prepare", "sm_count",
           "tma_ready"]

LOG2E = 1.4426950408889634

# How a program walks a query tile's key tiles. The list walk reads the tile's active list (``kv_num_blocks`` /
# ``kv_indices``); the full walk visits every key tile by position and reads no list, which is only right when every
# list is full and ascending: a fresh state (``SkipState.is_fresh``) or ``enabled=False``. The full walk never writes
# a next state (a call that marks tiles walks the list, whose full rows ascend as well).
FULL_WALK = "full"
LIST_WALK = "list"
WALKS = (FULL_WALK, LIST_WALK)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, the test suite without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_index(device: torch.device) -> int:
    """A CUDA device as an index (plain ``"cuda"`` is the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device, looked up once per GPU: every call asks for it, and torch's lookup
    costs microseconds of host time each, which a 0.4 ms sparse call cannot spare."""
    return _capability(device_index(device))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (looked up once per GPU)."""
    return _sm_count(device_index(device))


def l2_bytes(device: torch.device) -> int:
    """L2 cache size of a CUDA device in bytes (looked up once per GPU)."""
    return _l2_bytes(device_index(device))


def tma_ready(x: torch.Tensor) -> bool:
    """Unit head_dim stride and 16-byte aligned, non-zero strides and base, as TMA tile copies need (a broadcast
    dimension, stride 0, is copied rather than handed to a tensor map)."""
    strides = x.stride()[:-1]
    aligned = x.stride(-1) == 1 and all(s > 0 and (s * x.element_size()) % 16 == 0 for s in strides)
    return aligned and x.data_ptr() % 16 == 0


def kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself where TMA can address it, else a contiguous copy (both kernels index the same way)."""
    return x if tma_ready(x) else x.contiguous()


@dataclass(frozen=True)
class KernelCall:
    """One attention call as the kernels take it: BHSD-strided views (unit head_dim stride), the state's lists, the
    tiles and what the call asks for. Inputs are validated before (:mod:`liteattn.attention`); the kernels trust
    them.

    ``kv_num_blocks`` / ``kv_indices`` are the lists the call reads, ``next_num_blocks`` / ``next_indices`` the spare
    pair it writes when ``write_state``. ``q_protect`` / ``k_protect`` are int8 per query / key tile, 1 where a
    must-do range overlaps the tile. ``walk`` is :data:`FULL_WALK` or :data:`LIST_WALK`.

    ``per_call``: skip-softmax (:func:`liteattn.skip_softmax_attention`): a tile negligible by the rule is left out
    of this call instead of the next ones, and ``next_num_blocks`` receives the number of key tiles each query
    tile used; only with the full walk and without ``write_state`` (nothing is carried).

    ``qk8``: the scores come from Q and K rounded to int8, K smoothed, one scale per tile (``qk_dtype="int8"`` of
    :mod:`liteattn.reference`); not with ``per_call``. ``pv8``: P.V from P and V rounded to float8 e4m3
    (``pv_dtype="fp8"`` of the reference); only with ``qk8``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    next_num_blocks: torch.Tensor
    next_indices: torch.Tensor
    q_protect: torch.Tensor
    k_protect: torch.Tensor
    scale: float
    threshold: float
    block_m: int
    block_n: int
    walk: str
    write_state: bool
    return_lse: bool
    per_call: bool = False
    qk8: bool = False
    pv8: bool = False

    def __post_init__(self) -> None:
        if self.walk not in WALKS:
            raise ValueError(f"walk: expected one of {WALKS}, got {self.walk!r}")
        if self.per_call and (self.walk != FULL_WALK or self.write_state):
            raise ValueError("per_call: skip-softmax walks every key tile and carries nothing; expected the full walk "
                             f"without write_state, got walk={self.walk!r}, write_state={self.write_state!r}")
        if self.qk8 and self.per_call:
            raise ValueError("qk8: skip-softmax computes Q.K^T in 16 bits; expected qk8=False with per_call=True")
        if self.pv8 and not self.qk8:
            raise ValueError("pv8: P.V in fp8 is built on the int8 Q.K^T path; expected qk8=True with pv8=True")
        if self.write_state and self.walk == FULL_WALK:
            raise ValueError("walk: the full walk writes no next state (a call that marks tiles walks the list); "
                             f"got walk={self.walk!r} with write_state=True")


@dataclass(frozen=True)
class LaunchBuffers:
    """What a launch derives from a :class:`KernelCall`: the kernel-ready inputs, the outputs, the zeroed detection
    words and the tile counts.

    ``out`` has q's strides (the op's fake implementation promises that); ``lse`` is ``(B, H, S_q)`` float32, or
    empty without ``return_lse``. ``flags``: per query tile ``n_words`` zeroed int32 words (32 key tiles' "not
    negligible" bits each, plus one word a consumer of the sm90 kernel sets when it met a NaN or +inf score), and
    one more zeroed word past them, the sm90 kernel's work counter."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    flags: torch.Tensor
    n_words: int
    qt: int
    kt: int


def launch_order(call: KernelCall, longest_first: bool) -> torch.Tensor | None:
    """Each head's query tiles longest list first (a stable argsort: rows of equal length keep index order,
    neighbouring query tiles and often neighbouring key tiles), or None for index order."""
    if not longest_first:
        return None
    return torch.argsort(call.kv_num_blocks, dim=-1, descending=True, stable=True).to(torch.int32)


def prepare(call: KernelCall) -> LaunchBuffers:
    """The buffers of one launch; nothing here depends on which kernel runs, so a launch that falls back to the
    portable kernel reuses them."""
    out = torch.empty_like(call.q)  # the caller's strides (matches the op's fake implementation)
    q, k, v = (kernel_ready(x) for x in (call.q, call.k, call.v))
    bsz, nheads, seq_q, _ = q.shape
    lse = torch.empty((bsz, nheads, seq_q) if call.return_lse else (0,), dtype=torch.float32, device=q.device)
    qt = -(-seq_q // call.block_m)
    kt = -(-k.shape[2] // call.block_n)
    n_words = -(-kt // 32) + 1
    n_flags = bsz * nheads * qt * n_words if call.write_state else 0
    flags = torch.zeros(n_flags + 1, dtype=torch.int32, device=q.device)
    return LaunchBuffers(q, k, v, out, lse, flags, n_words, qt, kt)
