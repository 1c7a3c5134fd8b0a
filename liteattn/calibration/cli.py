"""Calibrate liteattn's thresholds on the shipped testbed, per layer and step range, to a quality budget.

Generates random testbed prompts (each with its own noise seed) dense and
with candidate settings, and searches the per-layer, per-step-range
thresholds and the number of dense first steps that skip the most tiles while
the budget holds: by default the mean PSNR of the final videos against the
dense videos of the same seeds (``--budget 'psnr>=32'``; also ``ssim>=X``,
``rel_error<=X``, ``worst:psnr>=X`` for the worst input, ``sparsity>=X`` as
serving stacks set it, ``marginal_l1<=X`` for CUDA LiteAttention's per-layer
rule). Then it measures the profile on held-out prompts and seeds.

Writes OUT/profile.json (the profile: ``liteattn demo --profile
OUT/profile.json``, or ``liteattn.apply(transformer, profile=...)``) and keeps
OUT/journal.json with every evaluation: run the same command again after an
interruption and it resumes; other budgets on the same inputs reuse the
evaluations. For any diffusers pipeline, use the Python API
(``liteattn.calibrate(pipe, inputs, budget=...)``).
"""
from __future__ import annotations

import argparse
import sys

from .._testbed_cli import add_run_arguments, check_out, check_positive, check_size_options, prepare

__all__ = ["add_arguments", "check_args", "run"]

DEFAULT_BUDGET = "psnr>=32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="liteattn-calibration",
                        help="output folder: profile.json and the resumable journal (default: liteattn-calibration)")
    add_run_arguments(parser)
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help=f"what the profile must achieve (default: {DEFAULT_BUDGET!r}, the mean PSNR in dB of the "
                             "videos against dense; see the description)")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="meet a fidelity budget by this much on the calibration inputs (default: 0)")
    parser.add_argument("--inputs", type=int, default=4, help="calibration prompts, one seed each (default: 4)")
    parser.add_argument("--held-out", type=int, default=4,
                        help="held-out prompts, one seed each, measured after calibration (default: 4; 0: none)")
    parser.add_argument("--dense-steps", type=int, nargs="+", default=None,
                        help="fidelity budgets: candidate numbers of dense first steps (default: 1 2 3 5); "
                             "other budgets: one number (default: 3)")
    parser.add_argument("--ranges", type=int, default=2, help="step ranges with their own thresholds (default: 2)")
    parser.add_argument("--token-rule", choices=("exact", "same", "log2_shift"), default="exact",
                        help="what the profile does at other token counts (default: exact, refuse them)")
    parser.add_argument("--skip-rule", choices=("carry", "per_call"), default="carry",
                        help="liteattn's temporal rule, or per-call skip-softmax for comparison (default: carry)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    parser.add_argument("--batch", type=int, default=8, help="videos generated at once (default: 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the prompts and noise seeds; held-out ones come from seed + 1 (default: 0)")
    parser.add_argument("--name", default="", help="the profile's label (default: the budget)")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming OUT/journal.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_args(args) -> None:
    """Every option checked before any work starts (a ``ValueError`` naming the option)."""
    from .budget import Budget

    check_size_options(args)
    try:
        budget = Budget.parse(args.budget)
    except ValueError as err:
        raise ValueError(f"--budget: {str(err).removeprefix('budget: ')}") from None
    if not args.margin >= 0 or (args.margin and budget.kind != "fidelity"):
        raise ValueError(f"--margin: expected a number >= 0, and only with a psnr, ssim or rel_error budget; got "
                         f"{args.margin:g} with {budget.metric}")
    check_positive("--inputs", args.inputs)
    check_positive("--held-out", args.held_out, 0)
    check_positive("--ranges", args.ranges)
    check_positive("--batch", args.batch)
    for d in args.dense_steps or ():
        check_positive("--dense-steps", d, 0)
    if args.dense_steps and budget.kind != "fidelity" and len(args.dense_steps) != 1:
        raise ValueError(f"--dense-steps: a {budget.kind} budget takes one number, got {args.dense_steps}")
    if budget.kind == "marginal" and args.skip_rule != "carry":
        raise ValueError("--skip-rule: the marginal rule measures tiles carried to later steps; expected carry, got "
                         f"{args.skip_rule}")
    if not args.guidance >= 0:
        raise ValueError(f"--guidance: expected a number >= 0, got {args.guidance:g}")
    check_out(args.out)


def run(args) -> int:
    check_args(args)
    setup = prepare(args, "calibrate")
    if isinstance(setup, str):
        print(setup, file=sys.stderr)
        return 2
    from .api import calibrate
    from .budget import Budget
    from .runners import TestbedRunner

    runner = TestbedRunner(setup.testbed, frames=setup.frames, size=setup.pixels, steps=setup.steps,
                           guidance=args.guidance, batch_size=args.batch)
    budget = Budget.parse(args.budget, margin=args.margin)
    print(f"liteattn calibrate: testbed, {setup.frames} frames of {setup.pixels}px ({runner.tokens} tokens), "
          f"{setup.steps} steps, {args.inputs} calibration + {args.held_out} held-out prompts, budget {budget}, "
          f"{setup.device}")
    profile = calibrate(runner, args.inputs, budget, held_out=args.held_out or None,
                        dense_steps=None if args.dense_steps is None else
                        (args.dense_steps[0] if budget.kind != "fidelity" else tuple(args.dense_steps)),
                        ranges=args.ranges, token_rule=args.token_rule, skip_rule=args.skip_rule, seed=args.seed,
                        work_dir=setup.out, resume=not args.no_resume, out=setup.out / "profile.json",
                        name=args.name, show_progress=not args.no_progress)
    print(f"wrote    : {setup.out / 'profile.json'} (journal: {setup.out / 'journal.json'}); measured: "
          + ", ".join(f"{where} sparsity {100 * m['sparsity']:.1f}%" + (f", PSNR {m['psnr_mean']:.1f} dB"
                                                                       if "psnr_mean" in m else "")
                      for where, m in profile.measured.items()))
    return 0
