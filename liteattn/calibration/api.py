""":func:`calibrate`: choose liteattn's thresholds for a model so that its outputs meet a budget.

Why calibrate at all: one global threshold behaves very differently across
models and layers (the default -10 skips about 1 % of the testbed's tiles,
where -1.5 is needed), and nothing told a user what a setting does to the
video. A calibration runs the user's own inputs dense and with candidate
settings, measures what the user asked for, and writes the answer into a
profile file that :func:`liteattn.apply` takes, bound to the model.
"""
from __future__ import annotations

import datetime
import platform
from statistics import fmean
from typing import Callable, Sequence

import torch

from .budget import Budget
from ..profile import TOKEN_RULES, Profile
from .runners import Runner, TestbedRunner, as_runner
from .search import DEFAULT_DENSE_CANDIDATES, DEFAULT_GRID, search_fidelity, search_marginal, search_sparsity
from .session import Calibration

__all__ = ["calibrate", "summarize_measurement", "testbed_inputs"]

_SEEDS_PER_DRAW = 100_000  # noise seeds of one draw: seed * _SEEDS_PER_DRAW + i
DEFAULT_DENSE_STEPS = 3  # sparsity and marginal budgets: the dense first steps (the testbed GPU demo's default)


def testbed_inputs(count: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """``count`` testbed inputs ``(prompt tokens, noise seed)``, drawn from ``seed``: random prompts, one noise
    seed each, ``100,000 * seed + i``. Different non-negative ``seed`` values give disjoint noise seeds
    (calibration against held-out inputs)."""
    from ..testbed.data import random_prompts

    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _SEEDS_PER_DRAW:
        raise ValueError(f"inputs: expected from 1 to {_SEEDS_PER_DRAW:,} testbed inputs, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    prompts = random_prompts(count, torch.Generator().manual_seed(seed))
    return [(prompts[i], _SEEDS_PER_DRAW * seed + i) for i in range(count)]


def summarize_measurement(result: dict, budget: Budget | None = None) -> dict:
    """What a profile records of a measurement: sparsity, fidelity (worst and mean), scores, budget met."""
    out = {"inputs": len(result["per_input"]), "sparsity": result["sparsity"]}
    for key in ("psnr_worst", "psnr_mean", "ssim_worst", "ssim_mean", "rel_error_worst", "rel_error_mean"):
        if key in result:
            out[key] = result[key]
    for name in ("scores", "dense_scores"):
        if result.get(name):
            dims = [k for k in result[name][0] if isinstance(result[name][0][k], (int, float))]
            out[f"{name}_mean"] = {k: fmean(s[k] for s in result[name]) for k in dims}
    if budget is not None and budget.kind == "fidelity":
        values = [f[budget.metric] for f in result["per_input"] if f[budget.metric] is not None]
        out["meets_budget"] = bool(values) and budget.met(budget.reduce(values), with_margin=False)
        out["inputs_meeting_bound"] = sum(budget.met(v, with_margin=False) for v in values) / max(len(values), 1)
    elif budget is not None and budget.kind == "sparsity":
        short = sorted(k for k, v in result["sparsity_per_layer"].items() if v < budget.value)
        out["meets_budget"], out["layers_below_target"] = not short, short
    out["sparsity_per_layer"] = result["sparsity_per_layer"]
    return out


def _inputs(runner: Runner, inputs, seed: int, what: str) -> list:
    if isinstance(inputs, int) and not isinstance(inputs, bool):
        if not isinstance(runner, TestbedRunner):
            raise ValueError(f"{what}: a number of inputs is only for the testbed; pass the inputs themselves")
        return testbed_inputs(inputs, seed)
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence) or not len(inputs):
        raise ValueError(f"{what}: expected a non-empty list of inputs, got {type(inputs).__name__}")
    return list(inputs)


def calibrate(pipe_or_transformer, inputs, budget, *, held_out=None, run: Callable | None = None,
              dense_steps: int | Sequence[int] | None = None, ranges: int = 2, grid: Sequence[float] = DEFAULT_GRID,
              token_rule: str = "exact", skip_rule: str = "carry", block_size=None, backend: str = "auto",
              seed: int = 0, work_dir=None, resume: bool = True, out=None, name: str = "",
              show_progress: bool = True, log: Callable[[str], None] | None = None) -> Profile:
    """Choose per-layer, per-step-range thresholds and the dense first steps that meet ``budget``.

    Args:
        pipe_or_transformer: a diffusers pipeline (inputs: dicts of its call arguments with a ``"seed"``),
            liteattn's testbed or a :class:`~liteattn.calibration.runners.TestbedRunner` (inputs: ``(prompt tokens,
            noise seed)`` pairs, or a number of random ones), any :class:`~liteattn.calibration.runners.Runner`, or
            a transformer module with ``run``.
        inputs: the calibration inputs (prompts and seeds: what the outputs are generated from).
        budget: a :class:`~liteattn.calibration.Budget` or its text: ``"psnr>=32"``, ``"ssim>=0.97"``,
            ``"rel_error<=0.05"`` (the final output against the dense output of the same seed, the mean over the
            inputs; ``"worst:psnr>=30"`` for the worst input), ``"sparsity>=0.4"`` (each layer's skipped fraction over the run), ``"marginal_l1<=0.05"``
            (upstream's per-layer, per-step output-error rule).
        held_out: inputs not used to choose anything; the profile records quality and sparsity on them.
        run: ``run(inputs) -> outputs`` for a bare transformer (one output row per input).
        dense_steps: fidelity budgets: the candidates searched (default ``(1, 2, 3, 5)``); the other budgets: the
            number used (default 3).
        ranges: step ranges with their own thresholds (fidelity budgets; marginal: one per step).
        grid: the thresholds the fidelity search tries, least aggressive first.
        token_rule: what the profile does at other token counts: ``"exact"`` (refuse), ``"same"``, ``"log2_shift"``
            (see :mod:`liteattn.profile`).
        skip_rule: ``"carry"`` (liteattn) or ``"per_call"`` (skip-softmax, for comparison).
        block_size, backend: as :func:`liteattn.apply` takes them.
        seed: draws the testbed inputs when ``inputs`` / ``held_out`` are numbers. The search itself has no
            randomness: the same inputs give the same profile.
        work_dir: keeps a journal of every evaluation and the dense outputs; an interrupted calibration started
            again with the same arguments resumes there (``resume=False`` starts over).
        out: where to write the profile (atomically); it is also returned.
        name: the profile's label.
        show_progress: progress bars for every generation; ``log`` gets one line per evaluation (default: stderr).

    Returns:
        The :class:`~liteattn.calibration.Profile`, with the measured sparsity and quality on the calibration
        inputs (and on ``held_out``).

    Raises:
        ValueError: an argument is invalid (the message names it), or a journal in ``work_dir`` was written for
            another calibration.
    """
    budget = Budget.of(budget)
    runner = as_runner(pipe_or_transformer, run)
    inputs = _inputs(runner, inputs, seed, "inputs")
    held = _inputs(runner, held_out, seed + 1, "held_out") if held_out is not None else None
    if token_rule not in TOKEN_RULES:
        raise ValueError(f"token_rule: expected one of {TOKEN_RULES}, got {token_rule!r}")
    if skip_rule not in ("carry", "per_call"):
        raise ValueError(f"skip_rule: expected 'carry' or 'per_call', got {skip_rule!r}")
    if budget.kind == "marginal" and skip_rule != "carry":
        raise ValueError("skip_rule: the marginal rule measures the error of tiles carried to later steps; expected "
                         f"'carry', got {skip_rule!r}")
    if isinstance(ranges, bool) or not isinstance(ranges, int) or ranges < 1:
        raise ValueError(f"ranges: expected a positive int, got {ranges!r}")
    try:
        grid = tuple(float(t) for t in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid: expected ascending distinct negative thresholds, got {grid!r}") from None
    if not grid or any(not t < 0 for t in grid) or list(grid) != sorted(set(grid)):
        raise ValueError(f"grid: expected ascending distinct negative thresholds, got {list(grid)}")
    if dense_steps is None:
        dense_steps = DEFAULT_DENSE_CANDIDATES if budget.kind == "fidelity" else DEFAULT_DENSE_STEPS
    candidates = tuple(dense_steps) if isinstance(dense_steps, Sequence) and not isinstance(dense_steps, str) \
        else (dense_steps,)
    if not candidates or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in candidates):
        raise ValueError(f"dense_steps: expected an int >= 0 or a list of them, got {dense_steps!r}")
    if budget.kind != "fidelity" and len(candidates) != 1:
        raise ValueError(f"dense_steps: a {budget.kind} budget takes one number, got {list(candidates)}")
    search = {"kind": budget.kind, "dense_steps": list(candidates), "ranges": ranges, "grid": list(grid),
              "skip_rule": skip_rule}
    cal = Calibration(runner, inputs, budget, work_dir=work_dir, resume=resume, block_size=block_size,
                      backend=backend, show_progress=show_progress, log=log)
    cal.log(f"calibrate: {len(cal.layers)} layers, {len(inputs)} calibration inputs, budget {budget}, "
            f"{cal.steps} steps")
    if budget.kind == "fidelity":
        setting, result, trace = search_fidelity(cal, candidates, ranges, grid, skip_rule)
        method = "fidelity search: a threshold and dense steps for every layer, then per layer and step range"
    elif budget.kind == "sparsity":
        setting, result, trace = search_sparsity(cal, candidates[0], skip_rule=skip_rule)
        method = "per-layer bisection on each layer's skipped fraction over the run"
    else:
        setting, result, trace = search_marginal(cal, candidates[0], skip_rule)
        method = "upstream's marginal rule: per layer and step, bisection on the relative L1 change the step's new " \
                 "marks make to the call's output; the smallest threshold over inputs and CFG branches"
    from ..integrations import LiteAttentionConfig

    measured = {"calibration": summarize_measurement(result, budget)}
    if held is not None:
        config = LiteAttentionConfig(profile=cal.profile(setting), block_size=block_size, backend=backend,
                                     skip_rule=skip_rule)
        measured["held_out"] = summarize_measurement(cal.measure(config, held, tag="held-out"), budget)
    target = runner.target
    device = next(target.parameters()).device if isinstance(target, torch.nn.Module) else getattr(target, "device", None)
    info = {
        "method": method, "date": datetime.date.today().isoformat(),
        "liteattn": _version(), "torch": torch.__version__, "device": _device_name(device),
        "runner": runner.fingerprint(), "inputs": runner.describe(inputs),
        "held_out_inputs": runner.describe(held) if held is not None else None,
        "search": search, "evaluations": len(cal.journal["evaluations"]), "trace": trace,
    }
    profile = cal.profile(setting, token_rule=token_rule, name=name or f"{budget}", budget=budget.to_dict(),
                          measured=measured, calibration=info)
    if out is not None:
        profile.save(out)
    cal.log("calibrate: done\n" + profile.describe())
    return profile


def _version() -> str:
    from ..version import __version__

    return __version__


def _device_name(device) -> str:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
