"""Two kinds of random tile mask at the same skipped fraction: does the per-row count matter?

``exact``: every query tile keeps the same number of random key tiles (``liteattn bench``'s ``random`` pattern,
:func:`liteattn.bench.masks.random_mask`). ``iid``: every tile is kept independently with probability 1 - s (and
key tile 0 always), so per-row counts vary (at s = 0.5 and the HunyuanVideo shape: 465 +- 15 of 929): the
states of ``kernel_variants.py`` (``specs.random_state``). ``shared``: every query tile of a head keeps the same
random key tiles, so all programs of a head read the same K/V tiles in the same order (the reuse of the full
walk with the per-tile work of ``exact``): if ``shared`` runs at the full walk's cost per tile and ``exact`` does
not, what ``exact`` pays for is where its tiles come from, not the partial-row code path (lab/kernel-notes.md, v15).
The total work is the same; only the lengths of the work items and the tiles they read differ. Cases are timed
in interleaved rounds, each in a new seeded order, with both timers (``time_cuda``: L2 flush, CUDA events, host
ahead; ``triton.testing.do_bench``), against liteattn's dense time (lab/kernel-notes.md, v12). The states use 128x128
tiles (the default at head_dim 64 and 128) and run with ``threshold=-inf`` (nothing marked), as the bench's
``liteattn-sparse`` does.
``--variants`` times each state under several kernel variants (``specs.py``; e.g. the claim order:
``persist-index,persist-sorted``, lab/kernel-notes.md v14), ``--detect`` also with detection on.
``--clocks`` samples the SM clock and board power (:mod:`liteattn.bench.clocks`) and reports their medians
while each case's ``time_cuda`` batches ran: under the power cap a call's speed is also its clock's.
Run: ``python lab/benchmarks/random_mask_kinds.py [--shape 1,118800,24,128] [--rounds 5] [--variants persist]
[--kinds exact,iid,shared] [--clocks]``.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics

import torch
import triton.testing

from liteattn import SkipState
from liteattn.bench import clocks
from liteattn.bench.masks import random_mask
from liteattn.bench.timing import time_cuda
from specs import VARIANTS, attend, parse_variants, random_state  # same folder: on sys.path


def shared_mask(shape, fraction, generator):
    """Every query tile of a (b, h) keeps the same random key tiles (tile 0 among them)."""
    b, h, qt, kt = shape
    head = random_mask((b, h, 1, kt), fraction, generator=generator, device=generator.device)
    has_zero = head[..., :1].clone()
    head[..., 0] = True  # the first visited tile: keep the count by dropping another kept tile instead
    drop = (head.cumsum(-1) == 2) & ~has_zero  # the second kept tile, where tile 0 was added
    return (head & ~drop).expand(b, h, qt, kt).contiguous()


KINDS = ("exact", "iid", "shared")


def sparse_cases(q, k, v, fractions, variants=("persist",), detect=False, kinds=("exact", "iid")):
    """(call, achieved skipped fraction) per variant, kind and fraction; prints each state's per-row counts.

    ``variants``: tags of ``specs.py``, each call run with its spec; ``detect``: also time each state with
    detection on (a threshold at which nothing is marked), as a generation's later steps run."""
    b, s, h, _ = q.shape
    qt = kt = -(-s // 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = {}
    for f in fractions:
        states = {
            "exact": lambda: SkipState.from_dense(random_mask((b, h, qt, kt), f, generator=gen, device="cuda"),
                                                  s, s, 128, 128),
            "iid": lambda: random_state(b, h, s, 128, 128, f),
            "shared": lambda: SkipState.from_dense(shared_mask((b, h, qt, kt), f, gen), s, s, 128, 128),
        }
        for name in kinds:
            state = states[name]()
            counts = state.kv_num_blocks.float()
            print(name, f, "skipped", round(state.sparsity(), 4), "count mean/std/min/max", counts.mean().item(),
                  counts.std().item(), counts.min().item(), counts.max().item(), flush=True)
            for tag in variants:
                for label, thr in (("", float("-inf")),) + ((("+detect", -1e4),) if detect else ()):
                    def call(st=state, tag=tag, thr=thr):
                        return attend(q, k, v, st, threshold=thr, variant=tag)
                    cases[f"{tag}:{name}{f}{label}"] = (call, state.sparsity())
    return cases


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1,118800,24,128", help="B,S,H,D")
    p.add_argument("--fractions", default="0.5,0.9")
    p.add_argument("--rounds", type=int, default=5, help="time_cuda rounds (do_bench: the first 3)")
    p.add_argument("--variants", default="persist", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--detect", action="store_true", help="also time every state with detection on")
    p.add_argument("--kinds", default="exact,iid", help=f"comma-separated, of {KINDS}")
    p.add_argument("--clocks", action="store_true", help="sample SM clock and power with nvidia-smi")
    args = p.parse_args()
    variants = parse_variants(p, args.variants)
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        p.error(f"--kinds: unknown {sorted(set(kinds) - set(KINDS))}; known: {list(KINDS)}")
    b, s, h, d = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = {"dense": (lambda: attend(q, k, v, enabled=False, variant=variants[0]), 0.0)}
    cases.update(sparse_cases(q, k, v, [float(f) for f in args.fractions.split(",")], variants, args.detect,
                              kinds))
    for fn, _ in cases.values():
        fn()
    torch.cuda.synchronize()
    timed = {"time_cuda": {n: [] for n in cases}, "do_bench": {n: [] for n in cases}}
    windows = {n: [] for n in cases}  # host times while each case's time_cuda batch ran
    with clocks.ClockSampler(clocks.device_id()) if args.clocks else contextlib.nullcontext() as sampler:
        if sampler is not None:
            sampler.wait_for_first_sample()
        for r in range(args.rounds):
            order = list(cases)
            random.Random(r).shuffle(order)
            for n in order:
                fn = cases[n][0]
                t0 = clocks.host_now()
                timed["time_cuda"][n].append(time_cuda(fn, budget_ms=0, min_reps=3, max_reps=3).median_ms)
                windows[n].append((t0, clocks.host_now()))
                if r < 3:
                    timed["do_bench"][n].append(triton.testing.do_bench(fn, warmup=10, rep=150))
        if sampler is not None:
            samples = sampler.stop()  # sets sampler.error if nvidia-smi failed
            print(*clocks.case_lines(samples, windows, sampler.error), sep="\n")
    for label, t in timed.items():
        med = {n: statistics.median(x) for n, x in t.items()}
        print(label, {n: round(m, 1) for n, m in med.items()})
        print(label, "ratio to linear ideal",
              {n: round(med[n] / ((1 - cases[n][1]) * med["dense"]), 3) for n in med if n != "dense"})
        print(label, "rounds", {n: [round(x, 1) for x in xs] for n, xs in t.items()})


if __name__ == "__main__":
    main()
