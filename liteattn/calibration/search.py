"""The searches behind :func:`liteattn.calibrate`: one per kind of budget.

Fidelity budget (the final output against dense). Two phases, each a chain of
full evaluations on the calibration inputs, every one checked against the
budget (the mean over the inputs, or the worst one):

1. *Dense steps and one threshold.* For each candidate number of dense first
   steps, a bisection over the threshold grid finds the most aggressive
   threshold, the same for every layer and step, that meets the budget; the
   candidate that skips most wins. This is the best the paper's single global
   threshold can do, found the same way.
2. *Per layer and step range.* From there, coordinate ascent: each (layer,
   step range) in turn tries the next grid value; the move is kept when the
   budget still holds and more is skipped, and a coordinate whose move fails
   is frozen (with more skipping elsewhere it can only fail again). Later
   ranges go first, as later steps tolerate more.

Why this and not a joint optimiser: an evaluation is a whole generation of
every calibration input, and quality falls monotonically with each threshold,
so a greedy walk that never leaves the feasible set needs few evaluations
(about 4 per dense-step candidate, then one per accepted move plus one per
coordinate) and every profile it returns was itself measured.

Sparsity budget (serving stacks' convention): per layer, the least aggressive
threshold whose layer skips the target fraction over the run, by bisection,
all layers at once (each evaluation moves every layer's bracket).

Marginal budget (CUDA LiteAttention's rule): during generation, at every
layer and step, a bisection on the call's own inputs finds the threshold whose
newly marked tiles change that call's output by at most the bound (relative
L1), as upstream's ``calib`` mode does; the profile keeps, per layer and
step, the smallest threshold any input or CFG branch chose.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..profile import MAX_DERIVED_THRESHOLD
from .session import Calibration, Setting

__all__ = ["DEFAULT_DENSE_CANDIDATES", "DEFAULT_GRID", "marginal_steer", "range_starts", "search_fidelity",
           "search_marginal", "search_sparsity"]

# Thresholds tried, in log2 units, least aggressive first. The testbed's useful range is -3..-0.25; real models'
# defaults sit at -10..-3 (upstream's advice: -3 is typically good).
DEFAULT_GRID = (-10.0, -8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.75, -1.5, -1.25, -1.0, -0.75, -0.5, -0.25)
DEFAULT_DENSE_CANDIDATES = (1, 2, 3, 5)
SPARSITY_LOW = -12.0  # the sparsity and marginal bisections search [SPARSITY_LOW, MAX_DERIVED_THRESHOLD]
MARGINAL_LOW = -20.0


def range_starts(dense_steps: int, steps: int, ranges: int) -> tuple[int, ...]:
    """The first step of each of ``ranges`` near-equal ranges of the skipping steps ``[dense_steps, steps)``."""
    span = max(steps - dense_steps, 1)
    starts = sorted({dense_steps + (i * span) // ranges for i in range(ranges)})
    return tuple(starts)


def _line(result: dict, metric: str | None) -> str:
    text = f"sparsity {100 * result['sparsity']:.1f}%"
    if metric is not None and f"{metric}_mean" in result:
        unit = " dB" if metric == "psnr" else ""
        text = (f"{metric} {result[f'{metric}_mean']:.4g}{unit} mean, {result[f'{metric}_worst']:.4g}{unit} worst, "
                + text)
    return text


def search_fidelity(cal: Calibration, dense_candidates: Sequence[int], ranges: int, grid: Sequence[float],
                    skip_rule: str = "carry") -> tuple[Setting, dict, list]:
    """``(setting, its evaluation, trace)``: the most skipping setting found that meets the fidelity budget."""
    budget, layers, steps, log = cal.budget, cal.layers, cal.steps, cal.log
    metric = budget.metric
    trace: list = []

    def check(setting: Setting, what: str) -> tuple[bool, dict]:
        result = cal.evaluate(setting)
        ok = budget.met(cal.value(result))
        trace.append({"try": what, "sparsity": result["sparsity"], metric: cal.value(result), "meets": ok})
        log(f"calibrate [{len(trace)}] {what}: {_line(result, metric)}: {'meets' if ok else 'misses'} {budget}")
        return ok, result

    best = None  # (setting, result, level)
    for dense_steps in dense_candidates:
        if dense_steps > steps - 2:  # at least one step that marks and one that skips
            continue
        starts = range_starts(dense_steps, steps, ranges)
        low, high, found = -1, len(grid), None
        while high - low > 1:
            mid = (low + high) // 2
            setting = Setting.uniform(layers, dense_steps, starts, grid[mid], skip_rule)
            ok, result = check(setting, f"{dense_steps} dense steps, threshold {grid[mid]:g} everywhere")
            if ok:
                low, found = mid, (setting, result, mid)
            else:
                high = mid
        if found is not None and (best is None or found[1]["sparsity"] > best[1]["sparsity"]):
            best = found
    if best is None:
        dense_steps = min(max(d for d in dense_candidates), max(steps - 2, 0))
        setting = Setting.uniform(layers, dense_steps, (dense_steps,), -math.inf, skip_rule)
        log(f"calibrate: no setting meets {budget} on the calibration inputs, not even threshold {grid[0]:g}; the "
            "profile never skips")
        return setting, cal.evaluate(setting), trace
    current, current_result, level = best
    log(f"calibrate: best single threshold {grid[level]:g} with {current.dense_steps} dense steps; now per layer and "
        "step range")
    levels = {(layer, r): level for layer in layers for r in range(len(current.range_starts))}
    order = [(layer, r) for r in reversed(range(len(current.range_starts))) for layer in layers]
    frozen: set = set()
    while True:
        moved = False
        for layer, r in order:
            if (layer, r) in frozen:
                continue
            if levels[layer, r] + 1 >= len(grid):
                frozen.add((layer, r))
                continue
            value = grid[levels[layer, r] + 1]
            trial = current.with_threshold(layer, r, value)
            ok, result = check(trial, f"{layer} steps {current.range_starts[r]}+: {value:g}")
            if ok and result["sparsity"] > current_result["sparsity"]:
                current, current_result, moved = trial, result, True
                levels[layer, r] += 1
            else:
                frozen.add((layer, r))
        if not moved:
            break
    return current, current_result, trace


def search_sparsity(cal: Calibration, dense_steps: int, iterations: int = 7,
                    skip_rule: str = "carry") -> tuple[Setting, dict, list]:
    """Per layer, the least aggressive threshold whose layer skips ``cal.budget.value`` of its tiles over the run."""
    target, layers, log = cal.budget.value, cal.layers, cal.log
    low = {layer: SPARSITY_LOW for layer in layers}
    high = {layer: MAX_DERIVED_THRESHOLD for layer in layers}
    trace: list = []

    def setting_of(values: dict) -> Setting:
        return Setting(dense_steps, (dense_steps,), tuple((layer, (round(values[layer], 4),)) for layer in layers),
                       skip_rule)

    for i in range(iterations):
        mid = {layer: (low[layer] + high[layer]) / 2 for layer in layers}
        result = cal.evaluate(setting_of(mid))
        per_layer = result["sparsity_per_layer"]
        for layer in layers:
            if per_layer.get(layer, 0.0) >= target:
                high[layer] = mid[layer]
            else:
                low[layer] = mid[layer]
        reached = sum(per_layer.get(layer, 0.0) >= target for layer in layers)
        trace.append({"iteration": i, "sparsity": result["sparsity"], "layers_reaching_target": reached})
        log(f"calibrate [{i + 1}/{iterations}] bisection: {reached}/{len(layers)} layers skip >= {target:g}; "
            f"{_line(result, 'psnr')}")
    setting = setting_of(high)
    result = cal.evaluate(setting)
    short = [layer for layer in layers if result["sparsity_per_layer"].get(layer, 0.0) < target]
    if short:
        log(f"calibrate: {len(short)} layers stay below {target:g} even at threshold {MAX_DERIVED_THRESHOLD:g}: "
            f"{short[:4]}")
    return setting, result, trace


def marginal_steer(bound: float, chosen: dict, iterations: int = 10) -> Callable:
    """A :class:`~liteattn.integrations.layer.LayerRuntime` steer implementing upstream's marginal rule.

    At each skipping call it compares the call's output over the tiles its
    state keeps (``ref``) with the output over those minus the tiles a
    threshold would newly mark, and bisects for the most aggressive threshold
    whose relative L1 change is at most ``bound`` (stopping within 10 % of it,
    as upstream does). ``chosen[(layer, step)]`` keeps the smallest threshold
    chosen for a layer and step over calls (CFG branches, inputs).
    """
    from ..attention import lite_attention

    def steer(runtime, info, attention, q, k, v, scale, must_do, threshold):
        base = attention.state
        options = dict(scale=scale, must_do=must_do, block_size=attention.block_size, backend=attention.backend)
        with torch.no_grad():
            ref, _ = lite_attention(q, k, v, base, threshold=-math.inf, **options)
            norm = ref.double().abs().sum().clamp_min(1e-30)

            def error(th: float) -> float:
                _, marked = lite_attention(q, k, v, base.clone() if base is not None else None, threshold=th,
                                           **options)
                out, _ = lite_attention(q, k, v, marked, threshold=-math.inf, **options)
                return float((out.double() - ref.double()).abs().sum() / norm)

            high = MAX_DERIVED_THRESHOLD
            if error(high) <= bound:
                best = high
            else:
                low, best = MARGINAL_LOW, MARGINAL_LOW
                for _ in range(iterations):
                    mid = (low + high) / 2
                    err = error(mid)
                    if err <= bound:
                        low = best = mid
                        if err >= 0.9 * bound:
                            break
                    else:
                        high = mid
        key = (runtime.profile_key, info.step)
        chosen[key] = min(chosen.get(key, best), best)
        return best

    return steer


def search_marginal(cal: Calibration, dense_steps: int, skip_rule: str = "carry") -> tuple[Setting, dict, list]:
    """Upstream's calibration: per layer and step, the threshold whose newly marked tiles stay under the bound."""
    from ..integrations import LiteAttentionConfig

    bound, layers, steps, log = cal.budget.value, cal.layers, cal.steps, cal.log
    starts = tuple(range(dense_steps, steps))
    placeholder = Setting.uniform(layers, dense_steps, starts, -10.0, skip_rule)  # the steer replaces each threshold
    config = LiteAttentionConfig(profile=cal.profile(placeholder), block_size=cal.block_size, backend=cal.backend,
                                 skip_rule=skip_rule)
    done = cal.journal.setdefault("marginal", {}).setdefault(f"{bound:g}, {dense_steps} dense steps", {})
    for i, item in enumerate(cal.inputs):
        if str(i) in done:
            continue
        chosen: dict = {}
        cal.run(config, [item], f"marginal calibration {i + 1}/{len(cal.inputs)}", marginal_steer(bound, chosen),
                per_input=True)
        done[str(i)] = {f"{layer}@{step}": value for (layer, step), value in chosen.items()}
        cal._save()
        log(f"calibrate: input {i + 1}/{len(cal.inputs)}: {len(chosen)} (layer, step) thresholds chosen")
    rows = {}
    for layer in layers:
        row = []
        for step in starts:
            values = [rec[f"{layer}@{step}"] for rec in done.values() if f"{layer}@{step}" in rec]
            row.append(round(min(values), 4) if values else MARGINAL_LOW)
        rows[layer] = tuple(row)
    setting = Setting(dense_steps, starts, tuple((layer, rows[layer]) for layer in layers), skip_rule)
    result = cal.evaluate(setting)
    log(f"calibrate: marginal rule at relative L1 <= {bound:g}: {_line(result, 'psnr')}")
    return setting, result, [{"inputs": len(done)}]
