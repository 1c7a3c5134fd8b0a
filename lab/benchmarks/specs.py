"""Kernel variants for the development scripts: named changes of the spec a call resolves to, and a call that runs
with one.

A variant is a function of the call's resolved :class:`liteattn.kernels.dispatch.KernelSpec` and head_dim that
returns the spec to run. The scripts time variants side by side in one process by passing the spec to the launcher
(:func:`attend`); nothing in the package is changed, so a call's kernel never depends on which variant ran before.

Tags: ``persist`` is the shipped kernel (on Hopper, the persistent sm90 kernel with the spec's rules); ``triton``
the portable Triton kernel for the same call (on Hopper with TMA copies); the ``persist-*`` tags change one sm90
setting: ``pp`` / ``nopp`` turn-taking on / off at every head_dim, ``treemax`` / ``chainmax`` row maxima as a tree /
one chain in every walk, ``lanesums`` / ``fullsums`` lane partial sums / full row sums in every walk, ``r240``
registers (24, 240) for (producer, consumer), ``s6`` up to 6 ring stages (5 fit at head_dim 64), ``sorted`` /
``index`` a head's query tiles longest list first / in index order at every shape, and
``bywork`` sorted with turns. ``index`` and ``longest-first`` set the order of either kernel. Tags of results from
before the specs name variants whose code is gone (``words`` / ``stores``: the portable kernel's detection words /
per-tile flag stores; ``sm90*``: the per-query-tile Gluon kernel; ``persist-lr``: list reads on full rows;
``persist-nopf``: no list entry read ahead): git history has them.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from liteattn import SkipState
from liteattn.kernels import default_block_sizes, dispatch
from liteattn.kernels.common import FULL_WALK, LIST_WALK, KernelCall
from liteattn.state import tile_protection


def _sm90(**fields):
    """A variant that sets sm90 settings (``work_order`` in list walks only: a full walk has no lists to sort)."""
    def apply(spec, head_dim):
        if spec.backend != "sm90":
            raise SystemExit(f"this variant changes the sm90 kernel, but the call resolves to the {spec.backend!r} "
                             f"kernel (head_dim {head_dim}, tiles {spec.block_m}x{spec.block_n}, this GPU)")
        changes = {k: v for k, v in fields.items() if k != "work_order" or spec.walk == LIST_WALK}
        return dataclasses.replace(spec, **changes)
    return apply


def _order(work_order):
    def apply(spec, head_dim):
        return dataclasses.replace(spec, work_order=work_order) if spec.walk == LIST_WALK else spec
    return apply


def _stages(**budget):
    def apply(spec, head_dim):
        stages = dispatch.sm90_stages(spec.block_m, spec.block_n, head_dim, **budget)
        return _sm90(stages=stages)(spec, head_dim)
    return apply


VARIANTS = {
    "persist": lambda spec, head_dim: spec,
    "triton": lambda spec, head_dim: dispatch.portable_spec(spec),
    "index": _order("index"),
    "longest-first": _order("longest-first"),
    "persist-pp": _sm90(pingpong=True),
    "persist-nopp": _sm90(pingpong=False),
    "persist-treemax": _sm90(tree_max=True),
    "persist-chainmax": _sm90(tree_max=False),
    "persist-lanesums": _sm90(lane_sums=True),
    "persist-fullsums": _sm90(lane_sums=False),
    "persist-r240": _sm90(regs=(24, 240)),
    "persist-r240-pp": _sm90(regs=(24, 240), pingpong=True),
    "persist-r240-nopp": _sm90(regs=(24, 240), pingpong=False),
    "persist-s6": _stages(max_stages=6),
    "persist-sorted": _sm90(work_order="longest-first"),
    "persist-index": _sm90(work_order="index"),
    "persist-bywork": _sm90(work_order="longest-first", pingpong=True),
}


def parse_variants(parser, text: str) -> list[str]:
    """``--variants``: comma-separated tags of :data:`VARIANTS`; an unknown tag is a usage error of ``parser``."""
    variants = text.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    return variants


def attend(q, k, v, state: SkipState | None = None, *, threshold: float = -10.0, enabled: bool = True,
           variant: str = "persist"):
    """``lite_attention(q, k, v, state, threshold=..., enabled=...)`` for ``(B, S, H, D)`` GPU inputs with the
    default scale and tiles and no must-do tokens, run with ``variant``'s spec; returns ``(out, next_state)``.

    The same steps as :func:`liteattn.lite_attention`'s kernel path (the state's spare buffers, the walk from the
    state's freshness, the next state), without its validation: every variant, ``persist`` too, pays the same
    host time, so short calls compare fairly."""
    b, seq_q, h, d = q.shape
    seq_k = k.shape[1]
    if state is None:
        state = SkipState.full(b, h, seq_q, seq_k, *default_block_sizes(d), device=q.device)
    write = enabled and threshold > -math.inf
    counts, indices = state.next_buffers() if write else (state.kv_num_blocks, state.kv_indices)
    walk = FULL_WALK if not enabled or (state.is_fresh() and not write) else LIST_WALK
    call = KernelCall(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), state.kv_num_blocks,
                      state.kv_indices, counts, indices, tile_protection(None, seq_q, state.block_m, q.device),
                      tile_protection(None, seq_k, state.block_n, q.device), d ** -0.5, threshold, state.block_m,
                      state.block_n, walk, write, False)
    out, _ = dispatch.lite_attention_fwd(call, spec=VARIANTS[variant](dispatch.spec_for(call), d))
    return out.transpose(1, 2), (state.advanced(counts, indices) if write else state)


def random_state(b, h, s, bm, bn, frac):
    """A state keeping each tile with probability ``1 - frac`` (and key tile 0 of every query tile)."""
    qt, kt = math.ceil(s / bm), math.ceil(s / bn)
    keep = torch.rand(b, h, qt, kt, device="cuda") >= frac
    keep[..., 0] = True
    return SkipState.from_dense(keep, s, s, bm, bn)
