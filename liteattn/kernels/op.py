"""The kernel as a ``torch.library`` custom op, so ``torch.compile`` traces through it.

The op mutates only the spare state buffers it writes; ``register_fake``
gives output shapes for tracing without running anything.
"""
from __future__ import annotations

import torch

from .forward import lite_attention_fwd


@torch.library.custom_op("liteattn::forward", mutates_args=("next_num_blocks", "next_indices"))
def lite_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    next_num_blocks: torch.Tensor, next_indices: torch.Tensor,
    q_protect: torch.Tensor, k_protect: torch.Tensor,
    scale: float, threshold: float, block_m: int, block_n: int,
    dense: bool, write_state: bool, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return lite_attention_fwd(q, k, v, kv_num_blocks, kv_indices, next_num_blocks, next_indices,
                              q_protect, k_protect, scale, threshold, block_m, block_n,
                              dense, write_state, return_lse)


@lite_attention_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect, k_protect,
      scale, threshold, block_m, block_n, dense, write_state, return_lse):
    bsz, nheads, seq_q, _ = q.shape
    lse_shape = (bsz, nheads, seq_q) if return_lse else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)
