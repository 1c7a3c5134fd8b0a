"""Where an 8-bit call's LSE departs from the reference's on a GPU: the rounding pass (GPU against CPU) and the
kernel's LSE before the smoothing shift, for the shapes of tests/test_qk_int8_kernel.py's GQA cases.

Run on a GPU: ``python lab/qk8_lse_check.py [--seed N]``; prints one JSON line per case."""
from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, "tests")
from conftest import _local_qkv  # noqa: E402

from liteattn import SkipState, lite_attention  # noqa: E402
from liteattn.kernels.quant import quantize_qk  # noqa: E402
from liteattn.reference import _RoundedQK, _tiles, lite_attention_reference  # noqa: E402

CASES = {"d32-gqa": (4, 2, 96, 32, (16, 16)), "d128-gqa": (4, 2, 1000, 128, (128, 64)),
         "d128-gqa-128": (4, 2, 1000, 128, (128, 128)), "d128-mha": (2, 2, 1000, 128, (128, 64))}


def check(name, seed):
    heads, kv_heads, s, d, block = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (x.bfloat16() for x in _local_qkv(1, s, heads, kv_heads, d, generator=gen, strength=2.0))
    k = k + 1.5 * torch.randn(d, generator=gen).bfloat16()
    scale = d ** -0.5
    gpu = quantize_qk(q.cuda(), k.cuda(), *block)
    ref = _RoundedQK(q, k, *block, heads // kv_heads, scale, "int8", torch.float32)
    row = {"case": name, "shift_vs_ref": (scale * gpu.shift.cpu().double() - ref.correction.double()).abs().max().item(),
           "q8_vs_ref": (_tiles(gpu.q8.cpu().double(), block[0]) - ref.q8).abs().max().item()}
    full = SkipState.full(1, heads, s, s, *block)
    want, want_lse, _ = lite_attention_reference(q, k, v, full, float("-inf"), None, None, qk_dtype="int8")
    for label, thr in (("dense", None), ("detect", float("-inf"))):
        st = None if thr is None else SkipState.full(1, heads, s, s, *block, device="cuda")
        out, lse, _ = lite_attention(q.cuda(), k.cuda(), v.cuda(), st, threshold=thr or -1.0, layout="bhsd",
                                     return_lse=True, qk_dtype="int8", enabled=thr is not None,
                                     block_size=block)
        err = (lse.cpu().double() - want_lse.double()).abs()
        row[f"{label}_lse_max"] = err.max().item()
        row[f"{label}_lse_rows_over_2e-3"] = int((err > 2e-3).sum())
        raw = lse.cpu().double() - scale * gpu.shift.cpu().double()
        ref_raw = want_lse.double() - ref.correction.double()
        row[f"{label}_raw_lse_max"] = (raw - ref_raw).abs().max().item()
        bad = (err > 2e-3).nonzero()
        row[f"{label}_bad_heads_rows"] = bad[:8, 1:].tolist()
        row[f"{label}_out_max"] = (out.cpu().float() - want.float()).abs().max().item()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1275046130)
    args = p.parse_args()
    for name in CASES:
        try:
            check(name, args.seed)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next case
            print(json.dumps({"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}), flush=True)
