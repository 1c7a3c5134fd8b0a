"""The int8 mode's rounding pass (``liteattn.kernels.quant.quantize_qk``) of this checkout against copies of the
package from other revisions, in one process: equal outputs, then time per call (CUDA events, L2 flushed, interleaved
rounds), each kernel's device time (torch.profiler), and the bandwidth the pass reaches.

Why apart from ``ab_revisions.py --qk-dtype int8``: the pass is 1-4 % of a dense int8 call, below what a whole call's
timing resolves, but a quarter of a call at 90 % skipped at Wan 1.3B.

Run on a GPU: ``python lab/benchmarks/qk8_rounding.py [--other NAME=DIR/liteattn[@LABEL] ...] [--shapes
wan1.3b,wan14b] [--rounds 9] [--reps 10] [--out FILE]`` (make a copy with ``git archive REV liteattn | tar -x -C
DIR``; LABEL, e.g. the revision, is what the JSON records for the copy in place of its folder).
"""
from __future__ import annotations

import argparse
import json

import torch

from ab_revisions import load_others  # same folder: the script's directory is on sys.path
from kernel_dev import interleaved_medians
from kernel_variants import SHAPES
from liteattn.bench.run import _positive
from liteattn.kernels import default_block_sizes


def inputs(shape):
    """BSHD bf16 q, k (keys with a shared offset, as a DiT's have), as the kernels get them: BHSD views."""
    b, s, h, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, h, d, device="cuda", generator=gen)
    k = torch.randn(b, s, h, d, device="cuda", generator=gen) + 3.0 * torch.randn(h, d, device="cuda", generator=gen)
    return q.bfloat16().transpose(1, 2), k.bfloat16().transpose(1, 2)


def compare(got, want) -> dict:
    """How a copy's rounding differs from this checkout's (ties of the key mean may move single keys by one)."""
    k_moved = (got.k8.int() - want.k8.int()).abs()
    return {"q8_equal": bool(torch.equal(got.q8, want.q8)), "q_scale_equal": bool(torch.equal(got.q_scale,
                                                                                              want.q_scale)),
            "k8_max_diff": int(k_moved.max()), "k8_moved_fraction": (k_moved > 0).float().mean().item(),
            "k_scale_max_rel": ((got.k_scale - want.k_scale).abs() / want.k_scale).max().item(),
            "shift_max_abs": (got.shift - want.shift).abs().max().item(),
            "sixteen_equal": bool(torch.equal(got.sixteen, want.sixteen))}


def kernel_times(fn, reps: int) -> dict:
    """Device time per call of each kernel ``fn`` launches (torch.profiler), in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if total and ev.count:
            rows[ev.key[:60]] = {"us_per_call": round(total / reps, 2), "launches_per_call": ev.count / reps}
    return rows


def measure(name: str, packages: dict, rounds: int, reps: int) -> dict:
    shape = SHAPES[name]
    q, k = inputs(shape)
    bm, bn = default_block_sizes(shape[3])
    calls = {pkg: (lambda m=mod: m.kernels.quant.quantize_qk(q, k, bm, bn)) for pkg, mod in packages.items()}
    want = calls["this"]()
    checks = {pkg: compare(fn(), want) for pkg, fn in calls.items() if pkg != "this"}
    for pkg, c in checks.items():
        if not (c["q8_equal"] and c["q_scale_equal"] and c["sixteen_equal"]) or c["k8_max_diff"] > 1 \
                or c["k8_moved_fraction"] > 1e-3:
            raise SystemExit(f"{name}: {pkg}'s rounding differs from this checkout's beyond ties: {c}")
    med, times = interleaved_medians(calls, rounds, reps)
    b, s, h, d = shape
    moved = b * s * h * d * (2 + 2 * 2 + 1 + 1)  # read Q once and K twice (bf16), write both in int8
    rows = {}
    for pkg, ms in med.items():
        kernels = kernel_times(calls[pkg], reps)
        device_us = sum(r["us_per_call"] for r in kernels.values())
        rows[pkg] = {"ms": round(ms, 4), "device_us": round(device_us, 1),
                     "tb_per_s_device": round(moved / (device_us * 1e-6) / 1e12, 2), "kernels": kernels}
        if pkg != "this":
            rows[pkg]["over_this"] = round(ms / med["this"], 3)
    return {"shape": list(shape), "tiles": [bm, bn], "bytes_moved": moved, "checks": checks, "rows": rows,
            "rounds": times}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--other", action="append", default=[], metavar="NAME=DIR[@LABEL]",
                   help="a copy of the package to compare, imported as NAME, recorded as LABEL (repeatable)")
    p.add_argument("--shapes", default="wan1.3b,wan14b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--rounds", type=_positive(int), default=9)
    p.add_argument("--reps", type=_positive(int), default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    packages, labels = load_others(p, args.other)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rounds": args.rounds,
              "reps": args.reps, "packages": labels, "shapes": {}}
    for name in args.shapes.split(","):
        r = result["shapes"][name] = measure(name, packages, args.rounds, args.reps)
        summary = {pkg: {key: row[key] for key in row if key != "kernels"} for pkg, row in r["rows"].items()}
        print(name, json.dumps(summary), json.dumps(r["checks"]), flush=True)
        for pkg, row in r["rows"].items():
            for kernel, kr in row["kernels"].items():
                print(f"  {pkg:8s} {kr['us_per_call']:9.1f} us  x{kr['launches_per_call']:.0f}  {kernel}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
