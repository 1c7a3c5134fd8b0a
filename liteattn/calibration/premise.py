"""The paper's premise, measured: are tiles negligible at step t still negligible at step t + d?

LiteAttention stops computing a tile for the rest of a generation once it is
found negligible. That is right only as far as negligible tiles stay
negligible. This module measures it on the dense trajectory (nothing is
skipped, so what is measured is the model's attention, not liteattn's effect
on it): at every attention call of every layer, the tiles that liteattn's rule
would mark from a full list at a threshold (for every row,
``(max s - m) * log2(e) < threshold``, ``m`` the running maximum over the tiles
before it, in ascending order) are recorded; then, per layer and gap ``d``,
the fraction of the tiles negligible at step ``t`` that are still negligible at
``t + d``, summed over ``t``, CFG branches, inputs, heads and query tiles.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch

from .runners import Runner

__all__ = ["measure_persistence"]


def measure_persistence(runner: Runner, inputs: Sequence, thresholds: Sequence[float] = (-3.0, -1.0),
                        max_gap: int = 10, block_size=None, backend: str = "auto",
                        show_progress: bool = False) -> dict:
    """Per threshold and layer, ``P(negligible at t + d | negligible at t)`` for ``d = 1..max_gap``.

    Returns ``{"tokens", "steps", "inputs", "thresholds": {"-1": {"layers": {layer: {"negligible": [fraction of
    tiles per step], "persistence": {"1": fraction, ...}}}, "all": {"1": fraction, ...}}}}``. Each input is
    generated alone; every attention call computes every tile (dense attention through liteattn's walk over all
    tiles), so the trajectory is the dense one.
    """
    from ..attention import lite_attention
    from ..integrations import apply, remove

    thresholds = [float(t) for t in thresholds]
    tokens: set[int] = set()
    kept = defaultdict(int)  # (threshold, layer, gap) -> tiles negligible at t and at t + gap
    base = defaultdict(int)  # (threshold, layer, gap) -> tiles negligible at t (with t + gap a step)
    per_step = defaultdict(lambda: [0, 0])  # (threshold, layer, step) -> [negligible, total]
    steps_seen = 0

    for i, item in enumerate(inputs):
        marks: dict = {}  # (threshold, layer, context) -> {step: bool (B, H, QT, KT)}

        def observe(runtime, info, attention, q, k, v, scale, must_do, threshold):
            tokens.add(int(q.shape[1]))
            with torch.no_grad():
                for th in thresholds:
                    _, state = lite_attention(q, k, v, None, threshold=th, scale=scale, must_do=must_do,
                                              block_size=attention.block_size, backend=attention.backend)
                    marks.setdefault((th, runtime.profile_key, info.context), {})[info.step] = \
                        (~state.to_dense()).cpu()
            return -math.inf  # nothing is marked: every tile is computed, the trajectory stays dense

        # A finite threshold routes every call through liteattn, where the observer runs.
        handle = apply(runner.target, threshold=-1.0, block_size=block_size, backend=backend)
        try:
            for runtime in handle.layer_runtimes().values():
                runtime.steer = observe
            runner.generate([item], show_progress, f"premise {i + 1}/{len(inputs)}")
        finally:
            remove(runner.target)
        for (th, layer, _), by_step in marks.items():
            steps = sorted(by_step)
            steps_seen = max(steps_seen, len(steps))
            for t in steps:
                per_step[th, layer, t][0] += int(by_step[t].sum())
                per_step[th, layer, t][1] += by_step[t].numel()
                for gap in range(1, max_gap + 1):
                    if t + gap in by_step:
                        base[th, layer, gap] += int(by_step[t].sum())
                        kept[th, layer, gap] += int((by_step[t] & by_step[t + gap]).sum())

    layers = sorted({layer for _, layer, _ in base} | {layer for _, layer, _ in per_step})
    result = {"tokens": sorted(tokens), "steps": steps_seen, "inputs": len(inputs), "thresholds": {}}
    for th in thresholds:
        entry = {"layers": {}, "all": {}}
        for layer in layers:
            steps = sorted(t for (x, name, t) in per_step if x == th and name == layer)
            entry["layers"][layer] = {
                "negligible": [per_step[th, layer, t][0] / max(per_step[th, layer, t][1], 1) for t in steps],
                "persistence": {str(g): kept[th, layer, g] / base[th, layer, g]
                                for g in range(1, max_gap + 1) if base[th, layer, g]},
            }
        for gap in range(1, max_gap + 1):
            total = sum(base[th, layer, gap] for layer in layers)
            if total:
                entry["all"][str(gap)] = sum(kept[th, layer, gap] for layer in layers) / total
        result["thresholds"][f"{th:g}"] = entry
    return result
