"""Host time per attention call of the diffusers integration path on the testbed.

Run: ``python lab/host_time.py [--out FILE.json]``. For the stock model, liteattn eagerly and liteattn with CUDA
graphs, it times (host clock, no device sync) each transformer forward of a generation's skipping steps while the
GPU works through the queue, and divides by the self-attention calls per forward. The host is then the only
thing measured: a forward returns as soon as its work is queued.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from liteattn.integrations import apply, remove
from liteattn.testbed import encode_prompt, load_testbed


def host_per_forward(testbed, frames, size, mode, threshold=-2.0, dense_steps=4, steps=24):
    prompt = encode_prompt("yellow striped circle, red square, blue triangle")[None]
    x = torch.randn(1, 3, frames, size, size, device="cuda", dtype=testbed.dtype)
    cond = testbed.encode(prompt)
    t = torch.full((1,), 500.0, device="cuda")
    handle = None if mode == "stock" else apply(testbed.transformer, threshold=threshold, dense_steps=dense_steps,
                                                 cuda_graph=mode == "graphs")
    times = []
    try:
        with torch.no_grad():
            for generation in range(3):  # the first two compile and capture
                for step in range(steps):
                    t0 = time.perf_counter()
                    with testbed.transformer.cache_context("cond", step_index=step):
                        testbed.transformer(x, t, cond, return_dict=False)
                    if generation == 2 and step > dense_steps:
                        times.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
    finally:
        if handle is not None:
            remove(testbed.transformer)
    layers = len(testbed.transformer.blocks)
    median = statistics.median(times)
    return {"host_ms_per_forward": 1e3 * median, "host_us_per_attention_call": 1e6 * median / layers,
            "forwards": len(times)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    # Small by default, so that the GPU is never the bottleneck and the host is what is timed.
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    testbed = load_testbed("cuda", torch.bfloat16)
    report = {mode: host_per_forward(testbed, args.frames, args.size, mode) for mode in ("stock", "eager", "graphs")}
    for mode, r in report.items():
        print(f"{mode:7s}: host {r['host_ms_per_forward']:.3f} ms per forward, "
              f"{r['host_us_per_attention_call']:.1f} us per attention call", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
