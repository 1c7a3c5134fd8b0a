"""The kernel as a ``torch.library`` custom op, so ``torch.compile`` traces through it.

The op mutates only the spare state buffers it writes; ``register_fake``
gives output shapes for tracing without running anything. Eager calls skip the
op's dispatcher (:func:`run_forward`): it costs more host time per call than a
short sparse kernel takes on the GPU.
"""
from __future__ import annotations

import torch

from .common import FULL_WALK, LIST_WALK, KernelCall
from .dispatch import lite_attention_fwd


@torch.library.custom_op("liteattn::forward", mutates_args=("next_num_blocks", "next_indices"))
def lite_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    next_num_blocks: torch.Tensor, next_indices: torch.Tensor,
    q_protect: torch.Tensor, k_protect: torch.Tensor,
    scale: float, threshold: float, block_m: int, block_n: int,
    full_walk: bool, write_state: bool, return_lse: bool, per_call: bool = False, qk8: bool = False,
    pv8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return lite_attention_fwd(KernelCall(q, k, v, kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect,
                                         k_protect, scale, threshold, block_m, block_n,
                                         FULL_WALK if full_walk else LIST_WALK, write_state, return_lse, per_call,
                                         qk8, pv8))


def run_forward(call: KernelCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel launch: through the custom op while ``torch.compile`` traces or autograd records, directly
    otherwise.

    Why: the op's eager dispatch (autograd and in-place-view handling, default filling for the mutated
    arguments) took 0.1-0.2 ms of host time per call, which is more than the launch itself and, at
    s = 0.9, comparable to the kernel (0.38 ms at head_dim 64): the GPU then waits on Python. What the
    op adds besides is kept: inputs that require grad still go through it (so ``backward`` says there is
    no gradient instead of the graph silently ending here), and the written state buffers get their
    version counters bumped as the op's declared mutation would, so eager and traced calls look alike to code
    that checks versions.
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (call.q.requires_grad or call.k.requires_grad
                                                                      or call.v.requires_grad)):
        return lite_attention_op(call.q, call.k, call.v, call.kv_num_blocks, call.kv_indices, call.next_num_blocks,
                                 call.next_indices, call.q_protect, call.k_protect, call.scale, call.threshold,
                                 call.block_m, call.block_n, call.walk == FULL_WALK, call.write_state,
                                 call.return_lse, call.per_call, call.qk8, call.pv8)
    result = lite_attention_fwd(call)
    if call.per_call and not call.next_num_blocks.is_inference():  # the used-tile counts were written
        torch.autograd.graph.increment_version(call.next_num_blocks)
    if call.write_state:  # the spare (counts, indices) pair was written
        for written in (call.next_num_blocks, call.next_indices):
            if not written.is_inference():
                torch.autograd.graph.increment_version(written)
    return result


@lite_attention_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, next_num_blocks, next_indices, q_protect, k_protect,
      scale, threshold, block_m, block_n, full_walk, write_state, return_lse, per_call=False, qk8=False,
      pv8=False):
    bsz, nheads, seq_q, _ = q.shape
    lse_shape = (bsz, nheads, seq_q) if return_lse else (0,)
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)
