"""Time liteattn against cuDNN / FlashAttention SDPA and FlexAttention on video-DiT shapes.

For each shape: first a correctness gate (liteattn dense vs SDPA, liteattn
with a skip mask vs FlexAttention on the same mask), then every method is
timed with CUDA events (L2 flushed, median/p20/p80), dense methods once and
sparse methods for each skip pattern and skipped fraction s. Prints a table
and the ratios that matter (targets: dense <= 1.00 x cuDNN, detection
<= 1.03 x dense, sparse <= 1.10 x the ideal (1-s) x dense), and writes
bench.json, bench.txt and bench.png into --out.

Needs an NVIDIA GPU; the default run takes a few minutes on an H100 or H200.
Examples:
  liteattn bench --quick                      # smoke run, small shapes
  liteattn bench --shapes wan1.3b-480p --fractions 0.5,0.9
  liteattn bench --shapes all --out results/h100
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .config import BenchConfig
from .registry import (DEFAULT_FRACTIONS, DEFAULT_METHODS, DEFAULT_SHAPES, METHODS, PATTERNS, QUICK_SHAPES,
                       parse_fractions, parse_methods, parse_patterns, parse_shapes)

__all__ = ["NO_CUDA_MESSAGE", "BenchConfig", "add_arguments", "check_args", "resolve_config", "run"]

NO_CUDA_MESSAGE = (
    "liteattn bench needs a CUDA GPU: it times liteattn's Triton kernel against cuDNN and FlashAttention "
    "(torch SDPA) and against compiled FlexAttention with CUDA events, so it needs an NVIDIA GPU (Hopper, "
    "e.g. an H100, for the numbers it was designed around), a CUDA build of PyTorch and Triton. No CUDA device "
    "is visible here (torch {torch}, torch.cuda.is_available() is False). On a CPU liteattn runs its PyTorch "
    "reference implementation, which has the same semantics but exists for correctness and testing: it is not "
    "a performance path, so there is nothing meaningful to time. Run this command on a GPU machine; "
    "'liteattn bench --quick' is a smoke run of a minute or two."
)

def _argtype(parse):
    """Turn a parser's ValueError into argparse's usage error, keeping its message."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _positive(kind):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    known = ", ".join(list(DEFAULT_SHAPES) + ["hunyuan-720p"] + list(QUICK_SHAPES))
    parser.add_argument("--shapes", type=_argtype(parse_shapes), default=None,
                        help=f"comma-separated shapes, or 'all' (known: {known}); default: "
                             f"{','.join(DEFAULT_SHAPES)} (with --quick: {','.join(QUICK_SHAPES)})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small shapes (unless --shapes is given) and few repetitions")
    parser.add_argument("--fractions", type=_argtype(parse_fractions), default=list(DEFAULT_FRACTIONS),
                        help="skipped fractions s for the sparse methods (default: "
                             f"{','.join(str(f) for f in DEFAULT_FRACTIONS)})")
    parser.add_argument("--methods", type=_argtype(parse_methods), default=[METHODS[n] for n in DEFAULT_METHODS],
                        help=f"comma-separated methods, or 'all' (default: all but the 8-bit mode's "
                             f"liteattn-int8 rows; known: {', '.join(METHODS)})")
    parser.add_argument("--patterns", type=_argtype(parse_patterns), default=list(PATTERNS.values()),
                        help=f"comma-separated skip patterns, or 'all' (default; known: {', '.join(PATTERNS)})")
    parser.add_argument("--layout", choices=("shared", "native"), default="shared",
                        help="shared (default): one (B,S,H,D) allocation, SDPA/flex see it as a (B,H,S,D) view; "
                             "native: a contiguous copy in each method's own layout")
    parser.add_argument("--out", type=Path, default=Path("liteattn-bench"),
                        help="output folder for bench.json, bench.txt, bench.png (default: liteattn-bench)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and masks (default 0)")
    parser.add_argument("--max-minutes", type=_positive(float), default=8.0,
                        help="stop timing new cases after this long; the rest are recorded as skipped (default 8)")
    parser.add_argument("--budget-ms", type=_positive(float), default=None,
                        help="timing budget per case in ms (default 500, with --quick 50); at least --min-reps "
                             "(--dense-min-reps for a method without a mask) runs are timed whatever the budget")
    parser.add_argument("--min-reps", type=_positive(int), default=None,
                        help="the fewest runs of a case (default 10, with --quick 3)")
    parser.add_argument("--dense-min-reps", type=_positive(int), default=None,
                        help="the fewest runs of a method without a mask (the SDPA backends, liteattn dense and "
                             "detection), never below --min-reps: the dense and detection targets compare such "
                             "calls within 2-3 %% (default 30, with --quick --min-reps)")
    parser.add_argument("--rounds", type=_positive(int), default=10,
                        help="time a shape's cases in this many interleaved rounds, each in a new order, so that "
                             "all see the same drift of the GPU's clock (default 10; 1 = each case's runs in one "
                             "batch)")
    parser.add_argument("--no-clocks", dest="clocks", action="store_false",
                        help="do not sample the SM clock and board power with nvidia-smi while timing")


def check_args(args: argparse.Namespace) -> None:
    """What argparse's types cannot check, before any timing starts (``liteattn.cli`` reports the ``ValueError``
    as one line): ``--out`` must be a folder that can be created or written into, or a run of minutes would end
    failing to write its results."""
    out = Path(args.out)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out: expected a folder for bench.json, bench.txt and bench.png, but "
                                 f"{str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--out: cannot write into {str(parent)!r} (permission denied)")
            break


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """Defaults that depend on --quick, and cross-argument checks."""
    quick = bool(args.quick)
    shapes = args.shapes or list((QUICK_SHAPES if quick else {n: parse_shapes(n)[0] for n in DEFAULT_SHAPES}).values())
    min_reps = args.min_reps or (3 if quick else 10)
    dense_min_reps = max(min_reps, args.dense_min_reps or (min_reps if quick else 30))
    return BenchConfig(
        shapes=shapes, methods=list(args.methods), patterns=list(args.patterns), fractions=list(args.fractions),
        layout=args.layout, out=Path(args.out), seed=args.seed, max_minutes=args.max_minutes,
        budget_ms=args.budget_ms or (50.0 if quick else 500.0), min_reps=min_reps,
        max_reps=max(min_reps, 20 if quick else 100), quick=quick, rounds=args.rounds, clocks=args.clocks,
        dense_min_reps=dense_min_reps,
    )


def run(args: argparse.Namespace) -> int:
    """Exit code: 0 passed (or incomplete for time), 1 no CUDA, 2 a correctness check failed or could not run."""
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(torch=torch.__version__), file=sys.stderr, flush=True)
        return 1
    from .runner import BenchRun

    return BenchRun(resolve_config(args)).run()
