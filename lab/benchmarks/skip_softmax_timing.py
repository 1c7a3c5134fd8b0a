"""Attention time against the skipped fraction for liteattn's carried rule and the per-call skip-softmax rule, on
the same kernel, beside cuDNN, in one process.

Why synthetic inputs: skip-softmax decides from the scores of the call itself, so the skipped fraction cannot be
set with a mask as ``liteattn bench`` does for the carried rule; instead the keys of every key tile from
``keep`` on are pushed far along the queries' shared direction (about 25 log2 units below the rest), so that both
rules find exactly those tiles negligible in every query tile. The carried rule then runs one step later: from the
state those tiles were dropped from (its list walk with detection on, as at every step of a generation); the
per-call rule computes every tile's QK and skips the softmax and P.V of those tiles in the call itself. A fraction
of 0 times the per-call rule's decision where it skips nothing, beside the full walk (``enabled=False``).

Run on a GPU: ``python lab/benchmarks/skip_softmax_timing.py [--shapes wan1.3b,hdim64] [--fractions 0,0.5,0.9]
[--rounds 11] [--reps 5] [--out FILE]``. Medians of interleaved rounds (each in a new seeded order), CUDA events.
"""
from __future__ import annotations

import argparse
import json

import torch

import liteattn
from kernel_dev import rows_against_cudnn, sdpa  # same folder: the script's directory is on sys.path
from kernel_variants import SHAPES
from liteattn import SkipState
from liteattn.bench.masks import keep_count
from liteattn.bench.run import _positive
from liteattn.kernels import default_block_sizes

THRESHOLD = -5.0


def inputs(shape, keep: int, block_n: int, seed: int = 0):
    """q, k, v (BSHD bf16) whose key tiles from ``keep`` on are negligible for every query row."""
    b, s, h, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=gen) for _ in range(3))
    u = torch.randn(1, 1, h, d, device="cuda", generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    q = 0.5 * q + 4.0 * u
    k[:, keep * block_n:] -= 50.0 * u  # raw scores ~200 lower: ~25 log2 units at head_dim 128, ~36 at 64
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def time_shape(name: str, fractions, rounds: int, reps: int) -> dict:
    shape = SHAPES[name]
    b, s, h, d = shape
    bm, bn = default_block_sizes(d)
    kt = -(-s // bn)
    calls, checks = {}, {}
    data = {}
    for f in fractions:
        keep = keep_count(f, kt)
        q, k, v = inputs(shape, keep, bn)
        mask = torch.zeros(b, h, -(-s // bm), kt, dtype=torch.bool, device="cuda")
        mask[..., :keep] = True
        state = SkipState.from_dense(mask, s, s, bm, bn)
        data[f] = (q, k, v, state)
        # Correctness: both rules give attention over the kept tiles, and the per-call rule used exactly those.
        carried, _ = liteattn.lite_attention(q, k, v, state.clone(), threshold=THRESHOLD)
        per_call, used = liteattn.skip_softmax_attention(q, k, v, threshold=THRESHOLD)
        want = sdpa(q[:, :, :, :], k[:, :keep * bn], v[:, :keep * bn])
        checks[f] = {"keep_tiles": keep, "key_tiles": kt, "skipped": 1 - keep / kt,
                     "per_call_skipped": 1.0 - used.sum().item() / (used.numel() * kt),
                     "carried_max_abs_err": (carried.float() - want.float()).abs().max().item(),
                     "per_call_max_abs_err": (per_call.float() - want.float()).abs().max().item()}
        if abs(checks[f]["per_call_skipped"] - checks[f]["skipped"]) > 1e-9 or \
                max(checks[f]["carried_max_abs_err"], checks[f]["per_call_max_abs_err"]) > 3e-2:
            raise SystemExit(f"{name} fraction {f}: {checks[f]}")
        # Each timed carried call reads the same state (a clone per call would be timed too): the list walk
        # with detection writes the next lists into the state's spare buffers, which is what a step does.
        calls[f"carry@{f:g}"] = lambda q=q, k=k, v=v, st=state: liteattn.lite_attention(q, k, v, st,
                                                                                          threshold=THRESHOLD)
        calls[f"per_call@{f:g}"] = lambda q=q, k=k, v=v: liteattn.skip_softmax_attention(q, k, v,
                                                                                           threshold=THRESHOLD)
    q, k, v, _ = data[fractions[0]]
    calls["cudnn"] = lambda: sdpa(q, k, v)
    calls["liteattn_full"] = lambda: liteattn.lite_attention(q, k, v, enabled=False)
    rows, times = rows_against_cudnn(calls, rounds, reps)
    return {"shape": list(shape), "tiles": [bm, bn], "threshold": THRESHOLD, "checks": checks, "ms": rows,
            "rounds": times}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="wan1.3b,hdim64", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--fractions", default="0,0.5,0.9")
    p.add_argument("--rounds", type=_positive(int), default=11)
    p.add_argument("--reps", type=_positive(int), default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("skip_softmax_timing.py times CUDA kernels: no CUDA GPU is visible")
    fractions = [float(x) for x in args.fractions.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rounds": args.rounds,
              "reps": args.reps, "shapes": {}}
    for name in args.shapes.split(","):
        res = time_shape(name, fractions, args.rounds, args.reps)
        result["shapes"][name] = res
        print(name, json.dumps(res["checks"]), json.dumps(res["ms"]), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
