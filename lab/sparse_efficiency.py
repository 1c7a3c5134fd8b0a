"""How close a skipping step's attention comes to (1 - s) x the dense attention, on the testbed's own skip states.

Run: ``python lab/sparse_efficiency.py [--threshold -1 --dense-steps 3]``. Generates the GPU demo's video with
liteattn, takes every layer's skip state (cond pass) after the last step, and times per layer, on random q/k/v of
the demo's shape: cuDNN SDPA (the dense run's attention), liteattn's dense walk, and liteattn on the state (with
detection, as in a real step), the last with the persistent kernel's items in index order and longest list
first. Prints each layer's skipped fraction s and time over (1 - s) x cuDNN.
"""
from __future__ import annotations

import argparse

import torch
import triton

from benchmarks.specs import attend  # lab/benchmarks/specs.py (the script's folder, lab/, is on sys.path)
from liteattn import lite_attention
from liteattn.integrations import apply, remove
from liteattn.testbed import encode_prompt, load_testbed
from liteattn.testbed.sampler import sample_video


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threshold", type=float, default=-1.0)
    p.add_argument("--dense-steps", type=int, default=3)
    args = p.parse_args()
    testbed = load_testbed("cuda", torch.bfloat16)
    prompt = encode_prompt("yellow striped circle, red square, blue triangle")[None]
    handle = apply(testbed.transformer, threshold=args.threshold, dense_steps=args.dense_steps)
    sample_video(testbed, prompt, frames=32, size=64, steps=30, guidance=4.0, seed=0, show_progress=False)
    states = {name: handle.attention(name, "cond").state.clone() for name in handle.layers}
    remove(testbed.transformer)
    s_len, heads, dim = testbed.tokens_per_video(32, 64), 4, 64
    q, k, v = (torch.randn(1, s_len, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
    dense = bench(lambda: lite_attention(q, k, v, None, threshold=float("-inf")))
    print(f"cuDNN {cudnn:.3f} ms, liteattn dense walk {dense:.3f} ms ({dense / cudnn:.3f}x)")
    for name, state in states.items():
        s = state.sparsity()
        row = [f"{name}: s {s:.3f}"]
        for order in ("persist", "persist-sorted"):  # the shipped rule; a head's longest lists first
            t = bench(lambda: attend(q, k, v, state, threshold=args.threshold, variant=order))
            row.append(f"order {order}: {t:.3f} ms = {t / ((1 - s) * cudnn):.3f} x (1-s) cuDNN, "
                       f"{t / ((1 - s) * dense):.3f} x (1-s) liteattn dense")
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
