"""Why the SM clock is where it is while one call repeats: ``nvidia-smi``'s clock, power and active clock-event
reasons (power cap, thermal, hardware slowdown; a bit mask) sampled every 20 ms while the call runs back to back.

Why: under the 700 W cap a call that spends less energy per tile gets more clock, and a call below the cap may still
run under the maximum clock; the 8-bit QK mode's speed differs between shapes by exactly that (lab/kernel-notes.md).

Run on a GPU: ``python lab/benchmarks/clock_reasons.py [--shapes wan1.3b,wan14b] [--seconds 4]``; prints per call
the median clock and power and the reasons' masks with their share of the samples.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import tempfile
import time

import torch

import liteattn
from kernel_dev import sdpa  # same folder: the script's directory is on sys.path
from kernel_variants import SHAPES

QUERY = "--query-gpu=clocks.sm,power.draw,clocks_event_reasons.active"


def sampled(fn, seconds: float) -> list[tuple[float, float, str]]:
    """``fn`` repeated for ``seconds`` while ``nvidia-smi`` samples (MHz, W, reasons mask) every 20 ms."""
    fn()
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "samples.csv")
        with open(path, "w") as out:
            proc = subprocess.Popen(["nvidia-smi", QUERY, "--format=csv,noheader,nounits", "-lms", "20"], stdout=out)
            time.sleep(0.3)
            end = time.time() + seconds
            while time.time() < end:
                fn()
                torch.cuda.synchronize()
            proc.terminate()
            proc.wait()
        rows = []
        with open(path) as fh:
            for line in fh:
                parts = [p.strip() for p in line.split(",")]
                try:
                    rows.append((float(parts[0]), float(parts[1]), parts[2]))
                except (ValueError, IndexError):
                    continue
    return rows[len(rows) // 5:]  # drop the ramp at the start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="wan1.3b,wan14b")
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    for name in args.shapes.split(","):
        torch.manual_seed(0)
        q, k, v = (torch.randn(*SHAPES[name], device="cuda", dtype=torch.bfloat16) for _ in range(3))
        calls = {"cudnn": lambda: sdpa(q, k, v),
                 "bf16_dense": lambda: liteattn.lite_attention(q, k, v, enabled=False),
                 "int8_dense": lambda: liteattn.lite_attention(q, k, v, enabled=False, qk_dtype="int8")}
        for label, fn in calls.items():
            rows = sampled(fn, args.seconds)
            reasons = collections.Counter(r for _, _, r in rows)
            print(f"{name} {label}: SM MHz median {statistics.median(m for m, _, _ in rows):.0f}, power W median "
                  f"{statistics.median(w for _, w, _ in rows):.0f}, samples {len(rows)}, reasons "
                  + ", ".join(f"{mask} {n / len(rows):.0%}" for mask, n in reasons.most_common()), flush=True)


if __name__ == "__main__":
    main()
