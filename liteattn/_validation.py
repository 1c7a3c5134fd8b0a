"""Input checks for the public API.

Every check raises ``ValueError`` (or ``NotImplementedError`` for planned but
unsupported features) naming the argument, what it got and what it expects,
so bad input never reaches a kernel.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Iterable, Sequence

import torch

from .kernels.config import SUPPORTED_HEAD_DIMS
from .reference import check_pv_dtype

LAYOUTS = ("bshd", "bhsd")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def validate_qkv(q, k, v, layout: str, kernel: bool) -> tuple[int, int, int, int, int, int]:
    """Checks q, k, v; returns (B, H, H_kv, S_q, S_k, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            want = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
            raise ValueError(f"{name}: expected a 4-D tensor {want} for layout={layout!r}, got shape {tuple(x.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if q.device.type == "meta":
        raise ValueError("q, k, v: tensors on the 'meta' device hold no values, so there is nothing to attend over; "
                         "pass tensors on a CPU or GPU (to trace shapes, use torch.compile or FakeTensorMode)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = KERNEL_DTYPES if kernel else REFERENCE_DTYPES
    if q.dtype not in allowed:
        hint = " (the GPU kernel computes in bf16/fp16: cast with .to(torch.bfloat16))" if kernel else ""
        raise ValueError(f"q.dtype: expected one of {[str(d) for d in allowed]}, got {q.dtype}{hint}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if layout == "bshd":
        (bsz, seq_q, nheads, dim), (bk, seq_k, hk, dk) = q.shape, k.shape
    else:
        (bsz, nheads, seq_q, dim), (bk, hk, seq_k, dk) = q.shape, k.shape
    if bk != bsz:
        raise ValueError(f"k: batch size {bk} does not match q's {bsz}")
    if dk != dim:
        raise ValueError(f"k: head_dim {dk} does not match q's {dim}")
    if hk == 0 or nheads % hk != 0:
        raise ValueError(f"k: {hk} key/value heads must divide q's {nheads} heads (GQA/MQA)")
    if min(bsz, nheads, seq_q, seq_k, dim) == 0:
        raise ValueError(f"q, k: empty dimension in q {tuple(q.shape)} / k {tuple(k.shape)}")
    if kernel and dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim: the kernel supports multiples of 16 from 16 to 256, got {dim}")
    return bsz, nheads, hk, seq_q, seq_k, dim


def validate_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold: expected a negative float (log2 units, e.g. -10.0), got {threshold!r}") from None
    if math.isnan(value) or value >= 0:
        raise ValueError(
            f"threshold: expected a negative float in log2 units (e.g. -10.0; -inf skips nothing), got {value}. "
            "A tile is marked when every row's tile max falls this far below the running max."
        )
    return value


def validate_scale(scale) -> float | None:
    if scale is None:
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale: expected a positive finite softmax scale or None, got {scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale: expected a positive finite softmax scale or None, got {scale!r}")
    return value


def validate_block_size(block_size) -> tuple[int, int] | None:
    if block_size is None:
        return None
    try:
        bm, bn = block_size
    except (TypeError, ValueError):
        raise ValueError(f"block_size: expected (block_m, block_n), got {block_size!r}") from None
    if not all(isinstance(x, numbers.Integral) for x in (bm, bn)):
        raise ValueError(f"block_size: expected two ints (block_m, block_n), got {block_size!r}")
    bm, bn = int(bm), int(bn)
    for name, x in (("block_m", bm), ("block_n", bn)):
        if x < 16 or x > 256 or x & (x - 1):
            raise ValueError(f"block_size: {name} must be a power of two in [16, 256], got {x}")
    return bm, bn


def flat_to_ranges(flat: Sequence[int]) -> list[tuple[int, int]]:
    """The CUDA LiteAttention's flat ``must_do_list`` to ``(start, end)`` pairs (end exclusive), in either of
    the formats its releases documented.

    Its v0.2 README lists boundaries in strictly ascending order, ``[start0, end0, start1, end1, ...]``
    (``[2, 12, 40, 45, 60, 80]``: tokens 2-11, 40-44 and 60-79). Its earlier README lists them strictly
    descending, because its kernel walks key tiles from the end: ``[80, 60, 45, 40, 12, 2]`` for the same tokens.
    A descending list is read as the ascending one reversed, so both give ``[(2, 12), (40, 45), (60, 80)]``.
    """
    if isinstance(flat, (str, bytes)) or not isinstance(flat, Iterable):
        raise ValueError(f"must_do_list: expected a flat list of token indices, got {flat!r}")
    try:
        flat = [operator.index(x) for x in flat]
    except TypeError:
        raise ValueError(f"must_do_list: expected a flat list of int token indices, got {flat!r}") from None
    if len(flat) % 2:
        raise ValueError(f"must_do_list: expected an even-length flat list [start0, end0, start1, end1, ...], got {flat}")
    if len(flat) > 1 and all(b < a for a, b in zip(flat, flat[1:])):
        flat = flat[::-1]  # the descending format: the same boundaries, walked from the end
    elif any(b <= a for a, b in zip(flat, flat[1:])):
        raise ValueError("must_do_list: expected strictly ascending boundaries [start0, end0, start1, end1, ...] "
                         f"or strictly descending ones [end_n, start_n, ..., end0, start0], got {flat}")
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def validate_threshold_schedule(threshold) -> float | tuple[float, ...]:
    """A negative float, or a non-empty per-step sequence of them (returned as a tuple)."""
    if isinstance(threshold, (list, tuple)):
        if not threshold:
            raise ValueError("threshold: a per-step schedule must not be empty")
        return tuple(validate_threshold(t) for t in threshold)
    return validate_threshold(threshold)


def validate_must_do(must_do, seq_len: int) -> list[tuple[int, int]]:
    """Token ranges ``[(start, end), ...]`` (end exclusive) inside ``[0, seq_len]``, not overlapping."""
    if must_do is None:
        return []
    if not isinstance(must_do, Iterable):
        raise ValueError(f"must_do: expected a list of (start, end) pairs, got {must_do!r}")
    ranges = []
    for item in must_do:
        try:
            start, end = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"must_do: expected (start, end) pairs, got {item!r}") from None
        if not 0 <= start < end <= seq_len:
            raise ValueError(f"must_do: range ({start}, {end}) must satisfy 0 <= start < end <= seq_len_k={seq_len}")
        ranges.append((start, end))
    ranges.sort()
    for (s0, e0), (s1, e1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise ValueError(f"must_do: ranges ({s0}, {e0}) and ({s1}, {e1}) overlap; merge them")
    return ranges


def validate_qk_dtype(qk_dtype, backend: str, head_dim: int) -> str | None:
    """None (Q.K^T from the inputs as they are), ``"int8"`` (both backends) or ``"fp8"`` (the PyTorch reference
    only); the kernels' int8 path takes head_dims that are multiples of 16 from 32 (its integer tensor-core
    products run 32 channels deep, and its int8 key tiles are copied whole)."""
    if qk_dtype is None:
        return None
    if not isinstance(qk_dtype, str) or qk_dtype not in ("int8", "fp8"):
        hint = " (pass the string, e.g. 'int8')" if isinstance(qk_dtype, torch.dtype) else ""
        raise ValueError(f"qk_dtype: expected None, 'int8' or 'fp8' (8-bit Q.K^T with smoothed K, one scale per "
                         f"tile), got {qk_dtype!r}{hint}")
    if backend == "triton" and qk_dtype == "fp8":
        raise ValueError("qk_dtype='fp8': the kernels compute 8-bit Q.K^T in int8; 'fp8' runs in the PyTorch "
                         "reference only (backend='torch'); use qk_dtype='int8'")
    if backend == "triton" and (head_dim % 16 or head_dim < 32):
        raise ValueError(f"qk_dtype='int8': the kernels take head_dims that are multiples of 16 from 32, got "
                         f"head_dim={head_dim}; use qk_dtype=None or backend='torch'")
    return qk_dtype


def validate_pv_dtype(pv_dtype, qk_dtype: str | None, backend: str, head_dim: int) -> str | None:
    """None (P.V in 16 bits) or ``"fp8"`` (P and V rounded to float8 e4m3), which comes with 8-bit Q.K^T: the
    kernels build it on the int8 path, in the Hopper kernel only (head_dim 64 or 128; :mod:`liteattn.kernels`
    says where else a call goes and refuses it there)."""
    if check_pv_dtype(pv_dtype, qk_dtype) is None:
        return None
    if backend == "triton" and head_dim not in (64, 128):
        raise ValueError(f"pv_dtype='fp8': the Hopper kernel computes fp8 P.V at head_dim 64 or 128, got "
                         f"head_dim={head_dim}; use pv_dtype=None or backend='torch'")
    return pv_dtype


def validate_backend(backend: str, device: torch.device, triton_available: bool) -> str:
    """Resolve 'auto' to 'triton' (CUDA/ROCm with Triton) or 'torch'."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available else "torch"
    if backend == "triton" and not triton_available:
        raise ValueError("backend='triton': Triton is not installed (pip install triton)")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' with CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter); "
                         "use backend='torch' or move q, k, v to a GPU")
    return backend
