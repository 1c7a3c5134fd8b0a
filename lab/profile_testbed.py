"""Where a denoising step of the testbed spends its GPU time, and what liteattn skips, eagerly (no CUDA graphs).

Run: ``python lab/profile_testbed.py --weights DIR --out FILE.json``. For the GPU demo's size it reports
(1) the share of attention kernels in a dense step's GPU kernel time (torch.profiler), (2) per threshold, the
skipped fraction per step, PSNR against dense, attention and wall time of one generation, and (3) the host time
per transformer forward while the GPU keeps up.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from liteattn.integrations import apply, remove
from liteattn.testbed import encode_prompt, load_testbed
from liteattn.testbed.metrics import psnr
from liteattn.testbed.sampler import sample_video


def attention_share(testbed, frames, size, prompt):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, frames, size, size, device="cuda", dtype=testbed.dtype)
    t = torch.full((1,), 500.0, device="cuda")
    cond = testbed.encode(prompt)
    with torch.no_grad():
        for _ in range(3):
            testbed.transformer(x, t, cond, return_dict=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                testbed.transformer(x, t, cond, return_dict=False)
            torch.cuda.synchronize()
    total, attn, names = 0.0, 0.0, {}
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if e.key.startswith("aten::") or e.key.startswith("cuda") or us <= 0:
            continue
        total += us
        names[e.key[:80]] = us
        if any(w in e.key.lower() for w in ("flash", "fmha", "attention", "cudnn", "sdpa", "efficient")):
            attn += us
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {"kernel_ms_per_forward": total / 5e3, "attention_ms_per_forward": attn / 5e3,
            "attention_share": attn / total if total else None, "top_kernels_ms": {k: v / 5e3 for k, v in top}}


def generation(testbed, prompt, frames, size, steps, threshold, dense_steps, timing=True):
    handle = apply(testbed.transformer, threshold=threshold, dense_steps=dense_steps, timing=timing)
    try:
        kw = dict(frames=frames, size=size, steps=steps, guidance=4.0, seed=0, show_progress=False)
        sample_video(testbed, prompt, **dict(kw, steps=min(steps, dense_steps + 2)))  # compile outside the timing
        torch.cuda.synchronize()
        start = time.perf_counter()
        video = sample_video(testbed, prompt, **kw)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        s = handle.summary()
        per_step = [round(v["sparsity"], 4) for _, v in sorted(s.per_step().items())]
        return video.cpu(), {"wall_s": wall, "attention_s": (s.attention_ms or 0) / 1e3, "sparsity": s.sparsity,
                             "per_step": per_step}
    finally:
        remove(testbed.transformer)


def host_per_forward(testbed, prompt, frames, size, threshold):
    """Host seconds per forward: many forwards queued back to back on a small batch, no sync in between."""
    out = {}
    for label, kw in (("stock", None), ("liteattn", dict(threshold=threshold))):
        handle = apply(testbed.transformer, **kw) if kw else None
        try:
            x = torch.randn(1, 3, frames, size, size, device="cuda", dtype=testbed.dtype)
            cond = testbed.encode(prompt)
            with torch.no_grad():
                for i in range(4):
                    with testbed.transformer.cache_context("cond", step_index=i):
                        testbed.transformer(x, torch.full((1,), 500.0, device="cuda"), cond, return_dict=False)
                torch.cuda.synchronize()
                n, host = 20, 0.0
                for i in range(n):
                    t0 = time.perf_counter()
                    with testbed.transformer.cache_context("cond", step_index=4 + i):
                        testbed.transformer(x, torch.full((1,), 500.0, device="cuda"), cond, return_dict=False)
                    host += time.perf_counter() - t0
                t0 = time.perf_counter()
                torch.cuda.synchronize()
                out[label] = {"host_ms_per_forward": 1e3 * host / n, "tail_sync_ms": 1e3 * (time.perf_counter() - t0)}
        finally:
            if handle is not None:
                remove(testbed.transformer)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--thresholds", default="-1.5,-3,-5")
    p.add_argument("--dense-steps", type=int, default=3)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    testbed = load_testbed("cuda", torch.bfloat16, path=args.weights)
    prompt = encode_prompt("yellow striped circle, red square, blue triangle")[None]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "frames": args.frames,
              "size": args.size, "tokens": testbed.tokens_per_video(args.frames, args.size)}
    report["dense_step"] = attention_share(testbed, args.frames, args.size, prompt)
    print(json.dumps(report["dense_step"], indent=1), flush=True)
    dense, report["dense"] = generation(testbed, prompt, args.frames, args.size, args.steps, -10.0, args.steps)
    print("dense", report["dense"], flush=True)
    for th in (float(x) for x in args.thresholds.split(",")):
        video, r = generation(testbed, prompt, args.frames, args.size, args.steps, th, args.dense_steps)
        r["psnr_vs_dense"] = psnr(video, dense)
        report[f"threshold {th:g}"] = r
        print(th, r, flush=True)
    report["host"] = host_per_forward(testbed, prompt, args.frames, args.size, float(args.thresholds.split(",")[0]))
    print(report["host"], flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
