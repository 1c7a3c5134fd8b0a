"""Where the run-to-run spread of short sparse calls comes from (lab/kernel-notes.md, v9/v10).

``liteattn bench`` found some s = 0.9 points bimodal (p20 far below the median) while the banded runs at the
same shape were tight. This script times the bench's exact calls (same inputs, same mask builders, same
``liteattn-sparse`` callable) four ways and keeps every sample:

- ``events``: L2 flush, CUDA events around each call (the bench's method);
- ``graph``: the call captured in a CUDA graph, replayed between the same flushes (GPU time only: if the
  spread vanishes here, the host is to blame);
- ``warm``: events without the flush;
- ``host``: wall time per call while the GPU keeps up.

each with the persistent kernel claiming a head's query tiles longest list first (``specs.py``'s
``persist-sorted``) and in index order (``persist-index``), without and with detection
(threshold -1e4: the kernel checks every tile and rewrites the state, marking nothing). It also reports
whether the call synchronizes with the GPU (``torch.cuda.set_sync_debug_mode``), which would put host time
into event timings.
Run: ``python lab/benchmarks/timing_spread.py --out DIR [--reps 60]``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from host_overhead import capture, event_times  # same folder: the script's directory is on sys.path
from liteattn import SkipState
from liteattn.bench import methods as M
from liteattn.bench.masks import achieved_fraction, build_mask
from liteattn.bench.registry import SHAPES
from liteattn.bench.timing import L2_FLUSH_BYTES, summarize
from specs import attend

SHAPE_NAMES = ("hdim64-16k", "wan1.3b-480p")
PATTERNS = ("banded", "per-head", "random")
# (mode, launch order by work); natural order first, so that a slow start of the process cannot favour it.
MODES = (("sparse", False), ("sparse", True), ("detect", False), ("detect", True))


def _summary(samples):
    t = summarize(samples)
    return {"median": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms, "min": min(samples), "max": max(samples)}


def _syncs(fn) -> str:
    """Empty if ``fn`` never waits for the GPU, else the first warning torch raised."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return ""
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _measure(fn, reps, scratch, **row):
    fn()
    torch.cuda.synchronize()
    row["syncs"] = _syncs(fn)
    row["events"] = event_times(fn, reps, scratch)
    row["graph"] = event_times(capture(fn), reps, scratch)
    row["warm"] = event_times(fn, reps)
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    row["host_ms_per_call"] = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    brief = {k: {a: round(b, 4) for a, b in _summary(row[k]).items()} for k in ("events", "graph", "warm")}
    print(row["shape"], row["pattern"], row["mode"], "by_work" if row["by_work"] else "natural", brief,
          f"host {row['host_ms_per_call']:.3f} ms", f"syncs: {row['syncs'] or 'no'}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="timing-spread")
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    rows = []
    for shape_name in SHAPE_NAMES:
        inp = M.make_inputs(SHAPES[shape_name], "shared", "cuda", 0)
        for pattern in PATTERNS:
            gen = torch.Generator(device="cuda").manual_seed(1)
            mask = build_mask(pattern, inp.tiles, 0.9, generator=gen, device="cuda")
            s = inp.shape.seq_len
            state = SkipState.from_dense(mask, s, s, *inp.block)  # as the bench's liteattn-sparse builds it
            threshold = {"sparse": float("-inf"), "detect": M.DETECT_THRESHOLD}
            for mode, by_work in MODES:
                variant = "persist-sorted" if by_work else "persist-index"  # forced either way

                def fn(mode=mode, variant=variant):
                    return attend(inp.q, inp.k, inp.v, state, threshold=threshold[mode], variant=variant)[0]
                rows.append(_measure(fn, args.reps, scratch, shape=shape_name, pattern=pattern, mode=mode,
                                     by_work=by_work, skipped=achieved_fraction(mask)))
    with open(os.path.join(args.out, "timing_spread.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
