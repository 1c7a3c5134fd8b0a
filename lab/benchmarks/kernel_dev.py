"""Kernel development check on a GPU: correctness at real sizes, then variant timings.

Used while tuning the kernel (see lab/kernel-notes.md); the user-facing benchmark is ``liteattn bench``.
Run: ``python lab/benchmarks/kernel_dev.py --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import liteattn
import liteattn.kernels.portable as portable
from liteattn import SkipState, lite_attention
from liteattn.kernels import default_block_sizes
from liteattn.reference import lite_attention_reference
from specs import attend  # same folder: the script's directory is on sys.path


def sdpa(q, k, v, backend=SDPBackend.CUDNN_ATTENTION):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def err(a, b):
    d = (a.float() - b.float()).abs()
    return {"max_abs": d.max().item(), "rel_l2": (d.norm() / b.float().norm()).item()}


def interleaved_medians(calls: dict, rounds: int, reps: int, windows: dict | None = None) -> tuple[dict, dict]:
    """Each call's median time over ``rounds`` rounds of ``reps`` timed runs (CUDA events), the calls of a round in a
    new seeded order: under the power cap a call's speed depends on what ran before it. Returns the medians and every
    round's time, by key; ``windows``, if given, gets each key's host time spans (for
    :func:`liteattn.bench.clocks.summarize`)."""
    import random
    import statistics

    from liteattn.bench.clocks import host_now
    from liteattn.bench.timing import time_cuda

    times = {key: [] for key in calls}
    for r in range(rounds):
        order = list(calls)
        random.Random(r).shuffle(order)
        for key in order:
            t0 = host_now()
            times[key].append(time_cuda(calls[key], budget_ms=0, min_reps=reps, max_reps=reps).median_ms)
            if windows is not None:
                windows.setdefault(key, []).append((t0, host_now()))
    return {key: statistics.median(t) for key, t in times.items()}, times


def rows_against_cudnn(calls: dict, rounds: int, reps: int, clocks: bool = False) -> tuple[dict, dict]:
    """Every call run once (compiled and autotuned outside the timed rounds), then timed by
    :func:`interleaved_medians`; returns ``{key: {"ms", "over_cudnn"}}`` (``calls`` has a ``"cudnn"`` entry; with
    ``clocks``, also each key's median SM clock and board power while it ran, sampled by ``nvidia-smi``) and every
    round's time."""
    from liteattn.bench import clocks as sm_clocks

    for fn in calls.values():
        fn()
    torch.cuda.synchronize()
    windows = {}
    if clocks:
        with sm_clocks.ClockSampler(sm_clocks.device_id()) as sampler:
            sampler.wait_for_first_sample()
            med, times = interleaved_medians(calls, rounds, reps, windows)
            samples = sampler.stop()
        if sampler.error:
            print("clocks:", sampler.error)
    else:
        med, times = interleaved_medians(calls, rounds, reps)
    rows = {key: {"ms": round(ms, 4), "over_cudnn": round(ms / med["cudnn"], 4)} for key, ms in med.items()}
    for key, spans in windows.items():
        c = sm_clocks.summarize(samples, spans)
        rows[key].update(sm_clock_mhz=c.sm_clock_mhz, power_w=c.power_w)
    return rows, times


def bench(fn, reps=50):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def structured_qkv(b, s, h, d):
    """bf16 BSHD q, k, v on the GPU whose scores are local along the sequence, so thresholds mark tiles."""
    pos = torch.linspace(0, 8, s, device="cuda")
    feats = torch.stack([torch.cos(pos * (f + 1) * 0.7) for f in range(d)], -1) * 2.5
    q = (feats[None, :, None] + 0.3 * torch.randn(b, s, h, d, device="cuda")).bfloat16()
    k = (feats[None, :, None] + 0.3 * torch.randn(b, s, h, d, device="cuda")).bfloat16()
    v = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def correctness(rows):
    torch.manual_seed(0)
    cases = [
        ("wan1.3b bshd", 1, 32760, 12, 12, 128, "bshd"),
        ("gqa bhsd ragged", 2, 4100, 8, 2, 128, "bhsd"),
        ("hdim64", 1, 16384, 24, 24, 64, "bshd"),
        ("hdim96 ragged", 1, 3000, 4, 4, 96, "bshd"),
        ("hdim256", 1, 2000, 4, 4, 256, "bshd"),
    ]
    for name, b, s, h, hk, d, layout in cases:
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
        ref = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION if d <= 128 else SDPBackend.FLASH_ATTENTION)
        qq, kk, vv = ((x.transpose(1, 2).contiguous() if layout == "bhsd" else x) for x in (q, k, v))
        for mode, kw in (("dense", dict(enabled=False)), ("thr-10", dict(threshold=-10.0))):
            out, lse, st = lite_attention(qq, kk, vv, threshold=kw.get("threshold", -10.0),
                                          enabled=kw.get("enabled", True), layout=layout, return_lse=True)
            out = out.transpose(1, 2) if layout == "bhsd" else out
            assert not torch.isnan(out).any()
            e = err(out, ref)
            lse_ref = torch.logsumexp((q.transpose(1, 2)[:, :, :256].float() @ k.transpose(1, 2).repeat_interleave(h // hk, 1).float().transpose(-1, -2)) * d ** -0.5, -1)
            e["lse_max_abs_first256"] = (lse[:, :, :256] - lse_ref).abs().max().item()
            e.update(case=name, mode=mode, sparsity_next=st.sparsity())
            rows.append(e)
            print("correct", e, flush=True)
    # Structured inputs: states written by the kernel vs the reference (GPU, fp32 reference).
    b, s, h, d = 1, 4096, 4, 128
    q, k, v = structured_qkv(b, s, h, d)
    bm, bn = default_block_sizes(d)
    st = SkipState.full(b, h, s, s, bm, bn, "cuda")
    out, lse, nxt = lite_attention(q, k, v, st.clone(), threshold=-6.0, return_lse=True)
    ro, rl, (rc, ri), scores = lite_attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         st, -6.0, return_scores=True)
    ref_state = SkipState(rc, ri, s, s, bm, bn)
    diff = nxt.to_dense() ^ ref_state.to_dense()
    row = {"case": "state vs reference", "kernel_sparsity": nxt.sparsity(), "ref_sparsity": ref_state.sparsity(),
           "tiles_differ": int(diff.sum()), "out_max_abs": (out.float() - ro.transpose(1, 2).float()).abs().max().item(),
           "lse_max_abs": (lse - rl).abs().max().item()}
    rows.append(row)
    print("correct", row, flush=True)


def timings(rows, shapes, block_sizes):
    for (name, (b, s, h, d)), bs in ((x, bs) for x in shapes.items() for bs in (block_sizes or [None])):
        torch.manual_seed(0)
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        flops = 4 * b * h * s * s * d
        bm, bn = bs or default_block_sizes(d)
        qt, kt = math.ceil(s / bm), math.ceil(s / bn)
        res = {"shape": name, "block": (bm, bn)}
        res["cudnn_ms"] = bench(lambda: sdpa(q, k, v))
        res["dense_ms"] = bench(lambda: lite_attention(q, k, v, enabled=False, block_size=(bm, bn)))
        full = SkipState.full(b, h, s, s, bm, bn, "cuda")
        res["detect_ms"] = bench(lambda: lite_attention(q, k, v, full, threshold=-1e4))
        # A full list that is not known to be fresh walks the index-list path.
        full_list = SkipState.from_dense(torch.ones(b, h, qt, kt, dtype=torch.bool, device="cuda"), s, s, bm, bn)
        res["list_ms"] = bench(lambda: lite_attention(q, k, v, full_list, threshold=float("-inf")))
        res["detect_list_ms"] = bench(lambda: lite_attention(q, k, v, full_list, threshold=-1e4))
        for frac in (0.5, 0.9):  # banded: every query tile keeps the same number of tiles around its diagonal
            width = max(1, round((1 - frac) * kt))
            centre = (torch.arange(qt, device="cuda") * kt) // qt
            lo = (centre - width // 2).clamp(0, kt - width)
            cols = torch.arange(kt, device="cuda")
            keep = ((cols[None] >= lo[:, None]) & (cols[None] < lo[:, None] + width)).expand(b, h, qt, kt)
            st = SkipState.from_dense(keep.contiguous(), s, s, bm, bn)
            res[f"band{frac}_ms"] = bench(lambda: lite_attention(q, k, v, st, threshold=float("-inf")))
            res[f"band{frac}_over_own_linear"] = res[f"band{frac}_ms"] / ((1 - st.sparsity()) * res["dense_ms"])
        for frac in (0.5, 0.9):
            keep = torch.rand(b, h, qt, kt, device="cuda") >= frac
            keep[..., 0] = True
            st = SkipState.from_dense(keep, s, s, bm, bn)
            res[f"sparse{frac}_ms"] = bench(lambda: lite_attention(q, k, v, st, threshold=float("-inf")))
            res[f"sparse{frac}_actual"] = st.sparsity()
        res["cudnn_tflops"] = flops / res["cudnn_ms"] / 1e9
        res["dense_tflops"] = flops / res["dense_ms"] / 1e9
        res["dense_over_cudnn"] = res["dense_ms"] / res["cudnn_ms"]
        res["detect_over_dense"] = res["detect_ms"] / res["dense_ms"]
        for frac in (0.5, 0.9):
            res[f"sparse{frac}_over_linear"] = res[f"sparse{frac}_ms"] / ((1 - res[f"sparse{frac}_actual"]) * res["cudnn_ms"])
            res[f"sparse{frac}_over_own_linear"] = res[f"sparse{frac}_ms"] / ((1 - res[f"sparse{frac}_actual"]) * res["dense_ms"])
        res["sparse0.9_unordered_ms"] = bench(lambda: attend(q, k, v, st, threshold=float("-inf"), variant="index"))
        res["best_config"] = str(getattr(portable._lite_attention_fwd, "best_config", None))
        rows.append(res)
        print("time", res, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="kernel-dev")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--shapes", default="wan1.3b,hdim64")
    p.add_argument("--blocks", default="", help="e.g. 128x128,128x64")
    args = p.parse_args()
    all_shapes = {"wan1.3b": (1, 32760, 12, 128), "hdim64": (1, 16384, 24, 64), "wan14b": (1, 75600, 40, 128)}
    rows = []
    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if not args.skip_correctness:
        correctness(rows)
    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",") if b]
    timings(rows, {k: all_shapes[k] for k in args.shapes.split(",")}, blocks)
    import os
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_dev.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "liteattn": liteattn.__version__, "rows": rows}, f, indent=1)
    print("total s", time.time() - t0)


if __name__ == "__main__":
    main()
