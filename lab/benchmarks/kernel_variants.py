"""Time kernel variants side by side on a GPU: the shipped specialization against changed specs (lab/kernel-notes.md).

A variant is a change of the spec a call resolves to (``specs.py``: ``persist`` the shipped kernel, ``triton`` the
portable kernel, ``persist-*`` one sm90 setting changed). Every variant is first checked (output vs cuDNN, written
state vs the PyTorch reference on structured inputs), then timed in interleaved rounds, each in a new seeded order,
so that clock drift hits all variants alike.
Result files of earlier kernel versions used tags of code that is gone (``specs.py`` lists them).
Run: ``python lab/benchmarks/kernel_variants.py --out DIR [--shapes wan1.3b,hdim64] [--variants persist,triton]``.
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

import liteattn.kernels.portable as portable
from kernel_dev import sdpa, structured_qkv  # same folder: the script's directory is on sys.path
from liteattn import SkipState
from liteattn.kernels import default_block_sizes
from liteattn.reference import lite_attention_reference
from specs import VARIANTS, attend, parse_variants, random_state

SHAPES = {"wan1.3b": (1, 32760, 12, 128), "hdim64": (1, 16384, 24, 64), "wan14b": (1, 75600, 40, 128),
          "hunyuan": (1, 118800, 24, 128), "d128-32k": (1, 32768, 12, 128)}


def check_variant(variant):
    """Output vs cuDNN on random inputs and the written state vs the reference on structured ones."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8200, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sdpa(q, k, v)
    row = {}
    for mode, kw in (("dense", dict(enabled=False)), ("detect", dict(threshold=-1e4))):
        out, _ = attend(q, k, v, variant=variant, **kw)
        row[f"{mode}_max_abs"] = (out.float() - ref.float()).abs().max().item()
        row[f"{mode}_nan"] = bool(out.isnan().any())
    b, s, h, d = 1, 4096, 4, 128
    q, k, v = structured_qkv(b, s, h, d)
    bm, bn = default_block_sizes(d)
    for name, st in (("fresh", SkipState.full(b, h, s, s, bm, bn, "cuda")),
                     ("list", SkipState.from_dense(torch.rand(b, h, s // bm, s // bn, device="cuda") > 0.3,
                                                   s, s, bm, bn))):
        before = st.clone()
        _, nxt = attend(q, k, v, st, threshold=-6.0, variant=variant)
        _, _, (rc, ri) = lite_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  before, -6.0)
        want = SkipState(rc, ri, s, s, bm, bn)
        row[f"state_{name}_tiles_differ"] = int((nxt.to_dense() ^ want.to_dense()).sum())
        row[f"state_{name}_marked"] = float(before.to_dense().sum() - want.to_dense().sum())
    return row


def make_cases(q, k, v, bm, bn, variant):
    """The timed calls of one variant, and the skipped fraction of its random states."""
    b, s, h, _ = q.shape
    qt, kt = math.ceil(s / bm), math.ceil(s / bn)
    full = SkipState.full(b, h, s, s, bm, bn, "cuda")
    full_list = SkipState.from_dense(torch.ones(b, h, qt, kt, dtype=torch.bool, device="cuda"), s, s, bm, bn)
    sparse = {f: random_state(b, h, s, bm, bn, f) for f in (0.5, 0.9)}
    cases = {
        "dense": lambda: attend(q, k, v, enabled=False, variant=variant),
        "detect_fresh": lambda: attend(q, k, v, full, threshold=-1e4, variant=variant),
        "detect_list": lambda: attend(q, k, v, full_list, threshold=-1e4, variant=variant),
        "sparse0.5_detect": lambda: attend(q, k, v, sparse[0.5], threshold=-1e4, variant=variant),
        "sparse0.9_detect": lambda: attend(q, k, v, sparse[0.9], threshold=-1e4, variant=variant),
        "sparse0.9": lambda: attend(q, k, v, sparse[0.9], threshold=float("-inf"), variant=variant),
    }
    return cases, {f: st.sparsity() for f, st in sparse.items()}


def time_shape(name, variants, rounds, rep):
    b, s, h, d = SHAPES[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases, sparsity = {}, {}
    for variant in variants:
        cases[variant], sparsity[variant] = make_cases(q, k, v, *default_block_sizes(d), variant)
    times = {"cudnn": []}
    times.update({f"{c}@{v}": [] for v in variants for c in cases[v]})
    for variant in variants:  # compile and autotune outside the timed rounds
        for fn in cases[variant].values():
            fn()
    torch.cuda.synchronize()
    # Each round in a new seeded order: under the power cap a call's speed depends on what ran before it.
    order = [("cudnn", lambda: sdpa(q, k, v))]
    order += [(f"{c}@{variant}", fn) for variant in variants for c, fn in cases[variant].items()]
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key, fn in order:
            times[key].append(triton.testing.do_bench(fn, warmup=10, rep=rep))
    med = {key: statistics.median(v) for key, v in times.items()}
    flops = 4 * b * h * s * s * d
    res = {"shape": name, "dims": (b, s, h, d), "ms": med, "rounds": times,
           "cudnn_tflops": flops / med["cudnn"] / 1e9}
    for tag in variants:
        dense = med[f"dense@{tag}"]
        res[tag] = {
            "tiles": default_block_sizes(d),
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
    """Registers, spills and shared memory of every compiled specialization of the portable kernel (evidence for
    the notes).

    With ``sass_dir``, also counts local-memory (spill) instructions in each kernel's SASS and writes the
    SASS there.
    """
    out = []
    try:
        for cache in portable._lite_attention_fwd.fn.device_caches.values():
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
    p.add_argument("--variants", default="persist,triton", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep", type=int, default=150, help="ms per do_bench call")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--sass", action="store_true", help="count spill instructions and keep each kernel's SASS")
    args = p.parse_args()
    variants = parse_variants(p, args.variants)
    os.makedirs(args.out, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "checks": {}, "timings": []}
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
        portable._lite_attention_fwd.cache.clear()  # autotune at this shape, not at the check's
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
