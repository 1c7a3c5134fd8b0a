"""Time the kernel's alternative code paths side by side on a GPU (see KERNEL_NOTES.md).

A variant is a setting of the module switches of :mod:`liteattn.kernels.forward`, named by a tag: ``sm90`` =
the warp-specialized Gluon kernel with one program per query tile, ``persist`` = its persistent form (one
program per SM), ``words`` / ``stores`` = the Triton kernel with ``FLAG_WORDS`` True / False;
a ``tiles`` entry replaces the state's (block_m, block_n) per head_dim. Result files of earlier kernel versions
used other tags (``2:0`` = words with atomics, ``0:0`` = per-row stores), and before v10 ``persist`` claimed
the longest lists first (now ``persist-bywork``), and before v11 it took turns at every head_dim (now
``persist-pp``; ``persist`` is the shipped rule, not at head_dim 64); ``persist-lr`` reads a full row's list
as every kernel did before v12; ``persist-chainmax`` / ``persist-treemax`` fold row maxima as one chain
(every kernel before v13) / as a tree in every specialization (``persist``: the dense walk at head_dim 64);
``persist-index`` / ``persist-sorted`` claim a head's query tiles in index order (every shape from v10 to v13) /
longest list first at every shape (``persist``: where a head's K/V exceed half the L2, since v14);
``persist-fullsums`` / ``persist-lanesums`` add a row's four lanes into its softmax sum at every key tile (every
kernel before v16) / once per query tile in every specialization (``persist``: in list walks; in the raw
``kernel-variants-lane-sums-h200.json``, timed before that rule, ``persist`` is ``persist-lanesums``). Every
variant is first checked (output vs cuDNN, written state vs the PyTorch reference on structured inputs),
then timed in interleaved rounds, each in a new seeded order, so that clock drift hits all variants alike (before
v13 the order was fixed).
Run: ``python benchmarks/kernel_variants.py --out DIR [--shapes wan1.3b,hdim64] [--variants words,stores]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time

import torch
import triton
import triton.testing

import liteattn.kernels.forward as fwd
import liteattn.kernels.hopper as hopper
import liteattn.kernels.hopper_persistent as persistent
from kernel_dev import sdpa, structured_qkv  # same folder: the script's directory is on sys.path
from liteattn import SkipState, lite_attention
from liteattn.kernels import default_block_sizes
from liteattn.reference import lite_attention_reference

SHAPES = {"wan1.3b": (1, 32760, 12, 128), "hdim64": (1, 16384, 24, 64), "wan14b": (1, 75600, 40, 128),
          "hunyuan": (1, 118800, 24, 128), "d128-32k": (1, 32768, 12, 128)}


PER_TILE = {"SM90_KERNEL": True, "SM90_PERSISTENT": False, "hopper.PREFETCH": True, "SCHEDULE_BY_WORK": True,
            "hopper.SMEM_BUDGET": 220 * 1024, "hopper.BY_POSITION": True,
            "hopper.TREE_MAX": None, "hopper.LANE_SUMS": None}
PERSISTENT = {"SM90_KERNEL": True, "SM90_PERSISTENT": True, "persistent.PREFETCH": True,
              "persistent.REGS": (40, 232), "persistent.ORDER_BY_WORK": None, "persistent.MAX_STAGES": 4,
              "persistent.PINGPONG": None, "persistent.SMEM_BUDGET": 220 * 1024, "persistent.BY_POSITION": True,
              "persistent.TREE_MAX": None, "persistent.LANE_SUMS": None}
N128 = {"tiles": {64: (128, 128), 128: (128, 128)}}
VARIANTS = {
    "words": {"FLAG_WORDS": True, "SM90_KERNEL": False},
    "stores": {"FLAG_WORDS": False, "SM90_KERNEL": False},
    "sm90": {**PER_TILE, "hopper.PINGPONG": True},
    "sm90-nopp": {**PER_TILE, "hopper.PINGPONG": False},
    "sm90-n64": {**PER_TILE, "hopper.PINGPONG": True, "tiles": {64: (128, 64), 128: (128, 64)}},
    "sm90-n128": {**PER_TILE, "hopper.PINGPONG": True, **N128},
    "sm90-n128-s3": {**PER_TILE, "hopper.PINGPONG": True, "hopper.SMEM_BUDGET": 226 * 1024, **N128},
    "sm90-nopp-n128": {**PER_TILE, "hopper.PINGPONG": False, **N128},
    "words-n128": {"FLAG_WORDS": True, "SM90_KERNEL": False, **N128},
    "sm90-nopf": {**PER_TILE, "hopper.PINGPONG": True, "hopper.PREFETCH": False},
    "persist-nopf": {**PERSISTENT, "persistent.PINGPONG": True, "persistent.PREFETCH": False},
    "persist": PERSISTENT,
    "persist-pp": {**PERSISTENT, "persistent.PINGPONG": True},
    "persist-s6": {**PERSISTENT, "persistent.MAX_STAGES": 6},
    "persist-lr": {**PERSISTENT, "persistent.BY_POSITION": False},
    "persist-chainmax": {**PERSISTENT, "persistent.TREE_MAX": False},
    "persist-treemax": {**PERSISTENT, "persistent.TREE_MAX": True},
    "persist-fullsums": {**PERSISTENT, "persistent.LANE_SUMS": False},
    "persist-lanesums": {**PERSISTENT, "persistent.LANE_SUMS": True},
    "persist-nopp": {**PERSISTENT, "persistent.PINGPONG": False},
    "persist-r240": {**PERSISTENT, "persistent.PINGPONG": True, "persistent.REGS": (24, 240)},
    "persist-r240-nopp": {**PERSISTENT, "persistent.PINGPONG": False, "persistent.REGS": (24, 240)},
    "persist-bywork": {**PERSISTENT, "persistent.PINGPONG": True, "persistent.ORDER_BY_WORK": True},
    "persist-sorted": {**PERSISTENT, "persistent.ORDER_BY_WORK": True},
    "persist-index": {**PERSISTENT, "persistent.ORDER_BY_WORK": False},
    "persist-r240-bywork": {**PERSISTENT, "persistent.PINGPONG": True, "persistent.REGS": (24, 240),
                            "persistent.ORDER_BY_WORK": True},
    "persist-n128": {**PERSISTENT, "persistent.PINGPONG": True, **N128},
    "persist-n128-s3": {**PERSISTENT, "persistent.PINGPONG": True, "persistent.SMEM_BUDGET": 226 * 1024, **N128},
}


def parse_variants(parser, text):
    """``--variants``: comma-separated tags of ``VARIANTS``; an unknown tag is a usage error of ``parser``."""
    variants = text.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    return variants


def set_variant(tag):
    for name, value in VARIANTS[tag].items():
        if name.startswith(("hopper.", "persistent.")):
            module, attr = name.split(".", 1)
            setattr(hopper if module == "hopper" else persistent, attr, value)
        elif name != "tiles":
            setattr(fwd, name, value)


def tiles_of(tag, head_dim):
    return VARIANTS[tag].get("tiles", {}).get(head_dim, default_block_sizes(head_dim))


def check_variant(variant):
    """Output vs cuDNN on random inputs and the written state vs the reference on structured ones."""
    set_variant(variant)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8200, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sdpa(q, k, v)
    row = {}
    for mode, kw in (("dense", dict(enabled=False)), ("detect", dict(threshold=-1e4))):
        out, _ = lite_attention(q, k, v, **kw)
        row[f"{mode}_max_abs"] = (out.float() - ref.float()).abs().max().item()
        row[f"{mode}_nan"] = bool(out.isnan().any())
    b, s, h, d = 1, 4096, 4, 128
    q, k, v = structured_qkv(b, s, h, d)
    bm, bn = tiles_of(variant, d)
    for name, st in (("fresh", SkipState.full(b, h, s, s, bm, bn, "cuda")),
                     ("list", SkipState.from_dense(torch.rand(b, h, s // bm, s // bn, device="cuda") > 0.3,
                                                   s, s, bm, bn))):
        before = st.clone()
        _, nxt = lite_attention(q, k, v, st, threshold=-6.0)
        _, _, (rc, ri) = lite_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  before, -6.0)
        want = SkipState(rc, ri, s, s, bm, bn)
        row[f"state_{name}_tiles_differ"] = int((nxt.to_dense() ^ want.to_dense()).sum())
        row[f"state_{name}_marked"] = float(before.to_dense().sum() - want.to_dense().sum())
    return row


def random_state(b, h, s, bm, bn, frac):
    qt, kt = math.ceil(s / bm), math.ceil(s / bn)
    keep = torch.rand(b, h, qt, kt, device="cuda") >= frac
    keep[..., 0] = True
    return SkipState.from_dense(keep, s, s, bm, bn)


def make_cases(q, k, v, bm, bn):
    """The timed calls for one tile shape, and the skipped fraction of its random states."""
    b, s, h, _ = q.shape
    qt, kt = math.ceil(s / bm), math.ceil(s / bn)
    full = SkipState.full(b, h, s, s, bm, bn, "cuda")
    full_list = SkipState.from_dense(torch.ones(b, h, qt, kt, dtype=torch.bool, device="cuda"), s, s, bm, bn)
    sparse = {f: random_state(b, h, s, bm, bn, f) for f in (0.5, 0.9)}
    cases = {
        "dense": lambda: lite_attention(q, k, v, enabled=False, block_size=(bm, bn)),
        "detect_fresh": lambda: lite_attention(q, k, v, full, threshold=-1e4),
        "detect_list": lambda: lite_attention(q, k, v, full_list, threshold=-1e4),
        "sparse0.5_detect": lambda: lite_attention(q, k, v, sparse[0.5], threshold=-1e4),
        "sparse0.9_detect": lambda: lite_attention(q, k, v, sparse[0.9], threshold=-1e4),
        "sparse0.9": lambda: lite_attention(q, k, v, sparse[0.9], threshold=float("-inf")),
    }
    return cases, {f: st.sparsity() for f, st in sparse.items()}


def time_shape(name, variants, rounds, rep):
    b, s, h, d = SHAPES[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases, sparsity = {}, {}
    for variant in variants:
        cases[variant], sparsity[variant] = make_cases(q, k, v, *tiles_of(variant, d))
    times = {"cudnn": []}
    times.update({f"{c}@{v}": [] for v in variants for c in cases[v]})
    for variant in variants:  # compile and autotune outside the timed rounds
        set_variant(variant)
        for fn in cases[variant].values():
            fn()
    torch.cuda.synchronize()
    # Each round in a new seeded order: under the power cap a call's speed depends on what ran before it.
    order = [("cudnn", None, lambda: sdpa(q, k, v))]
    order += [(f"{c}@{variant}", variant, fn) for variant in variants for c, fn in cases[variant].items()]
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key, variant, fn in order:
            if variant is not None:
                set_variant(variant)
            times[key].append(triton.testing.do_bench(fn, warmup=10, rep=rep))
    med = {key: statistics.median(v) for key, v in times.items()}
    flops = 4 * b * h * s * s * d
    res = {"shape": name, "dims": (b, s, h, d), "ms": med, "rounds": times,
           "cudnn_tflops": flops / med["cudnn"] / 1e9}
    for tag in variants:
        dense = med[f"dense@{tag}"]
        res[tag] = {
            "tiles": tiles_of(tag, d),
            "sparsity": sparsity[tag],
            "dense_over_cudnn": dense / med["cudnn"],
            "dense_tflops": flops / dense / 1e9,
            "detect_fresh_over_dense": med[f"detect_fresh@{tag}"] / dense,
            "detect_list_over_dense": med[f"detect_list@{tag}"] / dense,
            "sparse0.5_detect_over_linear": med[f"sparse0.5_detect@{tag}"] / ((1 - sparsity[tag][0.5]) * dense),
            "sparse0.9_detect_over_linear": med[f"sparse0.9_detect@{tag}"] / ((1 - sparsity[tag][0.9]) * dense),
            "sparse0.9_over_linear": med[f"sparse0.9@{tag}"] / ((1 - sparsity[tag][0.9]) * dense),
        }
    return res


def compiled_kernel_stats(sass_dir=None):
    """Registers, spills and shared memory of every compiled specialization (evidence for the notes).

    With ``sass_dir``, also counts local-memory (spill) instructions in each kernel's SASS and writes the
    SASS there.
    """
    out = []
    try:
        for cache in fwd._lite_attention_fwd.fn.device_caches.values():
            for i, (key, kernel) in enumerate(cache[0].items()):
                row = {"key": str(key)[-700:], "n_regs": kernel.n_regs, "n_spills": kernel.n_spills,
                       "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                       "num_stages": kernel.metadata.num_stages}
                if sass_dir is not None:
                    try:
                        sass = kernel.asm["sass"]
                        row["sass_local_ld"] = sass.count("LDL")
                        row["sass_local_st"] = sass.count("STL")
                        with open(os.path.join(sass_dir, f"kernel{i}.sass"), "w") as f:
                            f.write(row["key"] + "\n" + sass)
                    except Exception as e:
                        row["sass_error"] = repr(e)
                out.append(row)
    except Exception as e:  # the attribute layout differs between Triton versions
        out.append({"error": repr(e)})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="kernel-variants")
    p.add_argument("--shapes", default="wan1.3b,hdim64")
    p.add_argument("--variants", default="words,stores", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--configs", default="4:2,4:3,8:2", help="num_warps:num_stages autotuned over ('' = all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=150, help="ms per do_bench call")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--sass", action="store_true", help="count spill instructions and keep each kernel's SASS")
    args = p.parse_args()
    variants = parse_variants(p, args.variants)
    if args.configs:
        fwd._lite_attention_fwd.configs = [triton.Config({}, num_warps=int(w), num_stages=int(s))
                                           for w, s in (c.split(":") for c in args.configs.split(","))]
    os.makedirs(args.out, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "configs": args.configs, "checks": {}, "timings": []}
    t0 = time.time()

    def save(sass_dir=None):
        report["kernels"] = compiled_kernel_stats(sass_dir)
        with open(os.path.join(args.out, "kernel_variants.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    if not args.skip_check:
        for variant in variants:
            report["checks"][variant] = row = check_variant(variant)
            print("check", variant, row, f"{time.time() - t0:.0f}s", flush=True)
        save()
    for name in filter(None, args.shapes.split(",")):
        fwd._lite_attention_fwd.cache.clear()  # autotune at this shape, not at the check's
        res = time_shape(name, variants, args.rounds, args.rep)
        report["timings"].append(res)
        print("shape", name, "cudnn ms", f"{res['ms']['cudnn']:.3f}", f"{time.time() - t0:.0f}s", flush=True)
        for tag in variants:
            print("  ", tag, {k: (round(x, 3) if isinstance(x, float) else x) for k, x in res[tag].items()}, flush=True)
        save()
    if args.sass:
        sass_dir = os.path.join(args.out, "sass")
        os.makedirs(sass_dir, exist_ok=True)
        save(sass_dir)
    print("total s", round(time.time() - t0), flush=True)


if __name__ == "__main__":
    main()
