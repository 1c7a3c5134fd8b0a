"""Tile sizes per head_dim.

The tile sizes define the skip state's granularity, so they are chosen once
per (head_dim) and stored in the state; the kernel is never autotuned over
them (only over warps and pipeline stages). CPU and GPU pick the same sizes,
so a state computed on one is meaningful on the other.
"""
from __future__ import annotations

SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 16))


def default_block_sizes(head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) query/key tile sizes for a head_dim.

    Chosen by measured throughput on Hopper (lab/kernel-notes.md): 128x128 at
    head_dim 64 and 128, which the warp-specialized persistent kernel
    (:mod:`liteattn.kernels.sm90`) runs at or above cuDNN's speed
    dense and closest to linear when sparse (128x64 would suit the plain Triton
    loop on other GPUs better, v1, but the state's tiles must not depend on the
    GPU); 64x128 below 64 and 128x64 for the other head_dims up to 128, which
    only the Triton kernel runs.
    """
    if head_dim in (64, 128):
        return 128, 128
    if head_dim < 64:
        return 64, 128
    if head_dim < 128:
        return 128, 64
    return 64, 64
