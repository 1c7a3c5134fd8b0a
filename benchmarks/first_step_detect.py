"""Dense, first-step detection (fresh state) and later-step detection (full list) at the HunyuanVideo 720p
shape (1, 118800, 24, 128), per kernel variant: four back-to-back calls each, CUDA events, no L2 flush (a call
takes ~0.28 s, far beyond what the L2 holds). A cross-check of `liteattn bench`'s detection ratios
(KERNEL_NOTES.md, v9). Run: ``python benchmarks/first_step_detect.py sm90,persist``.
"""
from __future__ import annotations

import sys

import torch

from kernel_variants import set_variant  # same folder: the script's directory is on sys.path
from liteattn import SkipState, lite_attention


def main(variants):
    b, s, h, d = 1, 118800, 24, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt = kt = -(-s // 128)
    full = SkipState.full(b, h, s, s, 128, 128, "cuda")
    listed = SkipState.from_dense(torch.ones(b, h, qt, kt, dtype=torch.bool, device="cuda"), s, s, 128, 128)
    cases = {"dense": lambda: lite_attention(q, k, v, enabled=False),
             "fresh": lambda: lite_attention(q, k, v, full, threshold=-1e4),
             "list": lambda: lite_attention(q, k, v, listed, threshold=-1e4)}
    for var in variants:
        set_variant(var)
        for case, fn in cases.items():
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(4):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            print(var, case, sorted(times), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["sm90", "persist"])
