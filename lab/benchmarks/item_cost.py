"""Per-work-item and per-tile cost of the kernel: rows of exactly n active key tiles, time vs n.

Every query tile of the Wan2.1-1.3B 480p shape (1, 32760, 12, 128; 128x128 tiles) keeps exactly n random key
tiles. With W work items per SM, a call takes about W * (c + n * t): ``t`` is the per-tile cost (taken from the
dense time) and ``c`` the per-item overhead this prints ("over"), which is what decides how close a sparse call
gets to the linear ideal when few tiles remain (lab/kernel-notes.md, v9).
Run: ``python lab/benchmarks/item_cost.py --variants persist,triton --out DIR`` (variant tags: specs.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton.testing

from liteattn import SkipState
from specs import attend, parse_variants  # same folder: the script's directory is on sys.path

SHAPE = (1, 32760, 12, 128)
COUNTS = (1, 2, 4, 8, 16, 26, 32, 64, 128)


def exactly_n(n, b, h, qt, kt, s):
    """A state whose every list holds n random key tiles."""
    pick = torch.rand(b, h, qt, kt, device="cuda").argsort(-1)[..., :n]
    keep = torch.zeros(b, h, qt, kt, dtype=torch.bool, device="cuda").scatter_(-1, pick, True)
    return SkipState.from_dense(keep, s, s, 128, 128)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="persist,triton")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    b, s, h, d = SHAPE
    qt = kt = -(-s // 128)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    states = {n: exactly_n(n, b, h, qt, kt, s) for n in COUNTS}
    variants = parse_variants(p, args.variants)
    res = {}
    for var in variants:
        for n in COUNTS:
            for mode, thr in (("nodetect", float("-inf")), ("detect", -1e4)):
                def fn(st=states[n], thr=thr, var=var):
                    return attend(q, k, v, st, threshold=thr, variant=var)
                fn()
                res[f"{var}|{mode}|{n}"] = statistics.median(
                    [triton.testing.do_bench(fn, warmup=5, rep=40) for _ in range(3)])
        def dense(var=var):
            return attend(q, k, v, enabled=False, variant=var)
        dense()
        res[f"{var}|dense"] = statistics.median([triton.testing.do_bench(dense, warmup=5, rep=60) for _ in range(3)])
    items_per_sm = b * h * qt / torch.cuda.get_device_properties(0).multi_processor_count
    for var in variants:
        per_tile = res[f"{var}|dense"] / (items_per_sm * kt) * 1e3
        print(var, "dense ms %.3f, per tile %.3f us" % (res[f"{var}|dense"], per_tile))
        for mode in ("nodetect", "detect"):
            row = []
            for n in COUNTS:
                ms = res[f"{var}|{mode}|{n}"]
                per_item = ms / items_per_sm * 1e3
                row.append(f"n={n}: {ms:.3f}ms item {per_item:.1f}us over {per_item - n * per_tile:.1f}us")
            print("  ", mode, " | ".join(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "item_cost.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "shape": SHAPE, "ms": res}, f, indent=1)


if __name__ == "__main__":
    main()
