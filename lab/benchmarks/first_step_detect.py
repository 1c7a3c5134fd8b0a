"""Dense, first-step detection (fresh state) and later-step detection (full list) at large shapes, per kernel
variant (``specs.py``); a cross-check of `liteattn bench`'s detection ratios (lab/kernel-notes.md, v9 and v10).

A fresh state with detection on runs the list walk (full rows are visited in ascending order); until v10 it ran
the full walk with detection, which v10 measured slower here (that specialization is gone; git history has the
``fresh-dense-walk`` case that timed it). ``cudnn`` (torch SDPA, cuDNN backend, timed in the same rounds) gives the
dense target's ratio with the bench's timer.
Cases are timed in interleaved rounds, each in a new seeded order (``liteattn.bench.timing.time_cuda``: L2
flush, CUDA events, host ahead of the GPU), so clock drift and the power cap hit all alike.
``--clocks`` samples the SM clock and board power (:mod:`liteattn.bench.clocks`) and reports their medians over
each case's calls: under the power cap a call's speed is also its clock's.
Run: ``python lab/benchmarks/first_step_detect.py [--variants persist] [--shapes hunyuan,wan14b] [--rounds 3]
[--clocks]``.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics

import torch

from kernel_dev import sdpa  # same folder: the script's directory is on sys.path
from kernel_variants import SHAPES
from liteattn import SkipState
from liteattn.bench import clocks
from liteattn.bench.timing import time_cuda
from specs import attend, parse_variants


def cases_for(q, k, v, variant):
    b, s, h, _ = q.shape
    qt = kt = -(-s // 128)
    full = SkipState.full(b, h, s, s, 128, 128, "cuda")
    listed = SkipState.from_dense(torch.ones(b, h, qt, kt, dtype=torch.bool, device="cuda"), s, s, 128, 128)
    return {"cudnn": lambda: sdpa(q, k, v),
            "dense": lambda: attend(q, k, v, enabled=False, variant=variant),
            "fresh": lambda: attend(q, k, v, full, threshold=-1e4, variant=variant),
            "list": lambda: attend(q, k, v, listed, threshold=-1e4, variant=variant)}


def time_shape(shape, variants, args):
    """All cases of every variant at one shape, in shuffled rounds; prints a line per variant and returns each
    case's host time windows (for the clock medians)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*SHAPES[shape], device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = {var: cases_for(q, k, v, var) for var in variants}
    times = {(var, case): [] for var in variants for case in cases[var]}
    windows = {key: [] for key in times}
    for r in range(args.rounds):
        order = list(times)
        random.Random(r).shuffle(order)  # no case always follows the same one (the power cap, v11)
        for var, case in order:
            t0 = clocks.host_now()
            times[var, case].append(time_cuda(cases[var][case], budget_ms=0, min_reps=args.reps,
                                              max_reps=args.reps).median_ms)
            windows[var, case].append((t0, clocks.host_now()))
    for var in variants:
        med = {case: statistics.median(times[var, case]) for case in cases[var]}
        ratios = {case: round(med[case] / med["dense"], 4) for case in cases[var]}
        print(shape, var, {c: round(t, 2) for c, t in med.items()}, "ms; / dense:", ratios,
              "dense / cudnn:", round(med["dense"] / med["cudnn"], 4),
              "rounds:", {c: [round(x, 1) for x in times[var, c]] for c in cases[var]}, flush=True)
    del q, k, v, cases
    torch.cuda.empty_cache()
    return {(shape, *key): spans for key, spans in windows.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="persist")
    p.add_argument("--shapes", default="hunyuan")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed calls per case and round")
    p.add_argument("--clocks", action="store_true", help="sample SM clock and power with nvidia-smi")
    args = p.parse_args()
    variants = parse_variants(p, args.variants)
    with clocks.ClockSampler(clocks.device_id()) if args.clocks else contextlib.nullcontext() as sampler:
        if sampler is not None:
            sampler.wait_for_first_sample()
        windows = {}
        for shape in args.shapes.split(","):
            windows.update(time_shape(shape, variants, args))
        if sampler is not None:
            samples = sampler.stop()  # sets sampler.error if nvidia-smi failed
            print(*clocks.case_lines(samples, windows, sampler.error), sep="\n")


if __name__ == "__main__":
    main()
