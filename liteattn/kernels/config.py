"""Tile sizes per head_dim.

The tile sizes define the skip state's granularity, so they are chosen once
per (head_dim) and stored in the state; the kernel is never autotuned over
them (only over warps and pipeline stages). CPU and GPU pick the same sizes,
so a state computed on one is meaningful on the other.
"""
from __future__ import annotations

SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 16))


def default_block_sizes(head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) query/key tile sizes for a head_dim."""
    if head_dim <= 128:
        return 128, 128
    return 64, 64
