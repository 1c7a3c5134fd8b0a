"""8-bit Q.K^T (``qk_dtype="int8"``), with P.V in 16 bits and in fp8 (``pv_dtype="fp8"``), beside the 16-bit kernel
and cuDNN, in one process: time dense and at set skipped fractions, and accuracy against the 16-bit kernel's output.

Accuracy is measured as SageAttention reports it (cosine similarity and relative L1 of the output against 16-bit
attention) on two kinds of inputs: random normal q, k, v, and the same with a shared offset added to every key (as
a DiT's keys have; smoothing K is what keeps 8 bits accurate there). Skip decisions: the lists one call with
detection leaves, int8 against 16 bits, on inputs with spatial locality (a fraction of every row negligible).

Run on a GPU: ``python lab/benchmarks/qk8_timing.py [--shapes wan1.3b] [--fractions 0.5,0.9] [--rounds 7]
[--reps 5] [--clocks] [--out FILE]``. Medians of interleaved rounds (each in a new seeded order), CUDA events;
``--clocks`` adds each call's median SM clock and board power (``nvidia-smi``), since the large shapes run at the
board's power cap.
"""
from __future__ import annotations

import argparse
import json

import torch

import liteattn
from kernel_dev import rows_against_cudnn, sdpa  # same folder: the script's directory is on sys.path
from kernel_variants import SHAPES
from liteattn import SkipState
from liteattn.bench.masks import build_mask
from liteattn.bench.run import _positive
from liteattn.kernels import default_block_sizes
from liteattn.kernels.quant import quantize_qk, quantize_v

MODES = {"int8": dict(qk_dtype="int8"), "int8pv8": dict(qk_dtype="int8", pv_dtype="fp8")}


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    a, r = out.float().flatten(), ref.float().flatten()
    return {"cos": torch.nn.functional.cosine_similarity(a, r, dim=0).item(),
            "rel_l1": ((a - r).abs().sum() / r.abs().sum()).item()}


def local_inputs(shape, seed: int):
    """BSHD bf16 q, k, v with spatial locality (token i attends mostly near i) and a shared key offset."""
    b, s, h, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pos = torch.arange(s, device="cuda", dtype=torch.float32)[:, None]
    freqs = torch.pi / (64.0 * 2.0 ** torch.linspace(0, 6, d // 2, device="cuda"))
    feat = torch.cat([(pos * freqs).sin(), (pos * freqs).cos()], -1) * (2.5 * d ** 0.25 / (d / 2) ** 0.5 * 2)
    q = feat[None, :, None, :] + 0.3 * torch.randn(b, s, h, d, device="cuda", generator=gen)
    k = feat[None, :, None, :] + 0.3 * torch.randn(b, s, h, d, device="cuda", generator=gen)
    k = k + 2.0 * torch.randn(1, 1, h, d, device="cuda", generator=gen)
    v = torch.randn(b, s, h, d, device="cuda", generator=gen)
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def measure_shape(name: str, fractions, rounds: int, reps: int, clocks: bool = False) -> dict:
    shape = SHAPES[name]
    b, s, h, d = shape
    bm, bn = default_block_sizes(d)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    offset = (3.0 * torch.randn(1, 1, h, d, device="cuda", generator=gen)).to(torch.bfloat16)
    acc = {}
    for label, keys in (("random", k), ("key offset", k + offset)):
        ref = liteattn.lite_attention(q, keys, v, enabled=False)[0]
        for mode, kw in MODES.items():
            out = liteattn.lite_attention(q, keys, v, enabled=False, **kw)[0]
            acc[label if mode == "int8" else f"{label}, {mode}"] = accuracy(out, ref)
    # Skip decisions after one call with detection, from a fresh state, 16 bits against each 8-bit mode.
    lq, lk, lv = local_inputs(shape, seed=1)
    lists = {"16bit": liteattn.lite_attention(lq, lk, lv, None, threshold=-5.0)[1].to_dense()}
    for mode, kw in MODES.items():
        lists[mode] = liteattn.lite_attention(lq, lk, lv, None, threshold=-5.0, **kw)[1].to_dense()
    acc["decisions"] = {"agree": (lists["16bit"] == lists["int8"]).float().mean().item(),
                        "agree_int8pv8": (lists["16bit"] == lists["int8pv8"]).float().mean().item(),
                        **{f"marked_{m}": 1.0 - x.float().mean().item() for m, x in lists.items()}}
    del lq, lk, lv, lists
    if min(a["cos"] for key, a in acc.items() if key != "decisions") < 0.99:
        raise SystemExit(f"{name}: an 8-bit output far from 16 bits: {acc}")

    q_bhsd, k_bhsd, v_bhsd = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    calls = {"cudnn": lambda: sdpa(q, k, v),
             "rounding_pass": lambda: quantize_qk(q_bhsd, k_bhsd, bm, bn),
             "rounding_pass_v": lambda: quantize_v(v_bhsd, bn),
             "bf16_dense": lambda: liteattn.lite_attention(q, k, v, enabled=False)}
    for mode, kw in MODES.items():
        calls[f"{mode}_dense"] = lambda kw=kw: liteattn.lite_attention(q, k, v, enabled=False, **kw)
    tiles = (b, h, -(-s // bm), -(-s // bn))
    skipped = {}
    for f in fractions:
        mask = build_mask("random", tiles, f, generator=gen, device="cuda")
        state = SkipState.from_dense(mask, s, s, bm, bn)
        skipped[f"{f:g}"] = 1.0 - mask.float().mean().item()
        calls[f"bf16@{f:g}"] = lambda st=state: liteattn.lite_attention(q, k, v, st, threshold=float("-inf"))
        for mode, kw in MODES.items():
            calls[f"{mode}@{f:g}"] = lambda st=state, kw=kw: liteattn.lite_attention(
                q, k, v, st, threshold=float("-inf"), **kw)
    rows, times = rows_against_cudnn(calls, rounds, reps, clocks)
    return {"shape": list(shape), "tiles": [bm, bn], "accuracy": acc, "skipped": skipped, "ms": rows,
            "rounds": times}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="wan1.3b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--fractions", default="0.5,0.9")
    p.add_argument("--rounds", type=_positive(int), default=7)
    p.add_argument("--reps", type=_positive(int), default=5)
    p.add_argument("--clocks", action="store_true", help="record each call's median SM clock and board power")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rounds": args.rounds,
              "reps": args.reps, "shapes": {}}
    for name in args.shapes.split(","):
        r = result["shapes"][name] = measure_shape(name, fractions, args.rounds, args.reps, args.clocks)
        print(name, json.dumps(r["accuracy"]), json.dumps(r["ms"]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
