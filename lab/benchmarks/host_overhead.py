"""How much of a short call's measured time is the host's (Python, validation, launch) rather than the GPU's.

For a few short cases (high skipped fractions), compares three timings of the same call:
``events`` (L2 flush, CUDA events around each call, as ``do_bench`` does and ``liteattn bench`` did before it
let the host get ahead of the GPU),
``graph`` (the call captured in a CUDA graph and replayed between the same flushes: GPU time only) and
``host`` (wall time per call while the GPU keeps up), plus a cProfile of the host path. (Until the kernels took
specs, ``--compare-lookups`` also timed the launch without its per-GPU / per-shape caches: raw
``host-lookups-h200.json``; git history has it.)
Run: ``python lab/benchmarks/host_overhead.py --out DIR``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch

from liteattn import lite_attention
from liteattn.bench.timing import time_cuda
from liteattn.kernels import default_block_sizes
from specs import random_state  # same folder: the script's directory is on sys.path

CASES = {"hdim64-s0.9": ((1, 16384, 24, 64), 0.9), "wan1.3b-s0.9": ((1, 32760, 12, 128), 0.9),
         "wan1.3b-s0.5": ((1, 32760, 12, 128), 0.5)}


def capture(fn):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def event_times(fn, reps, scratch=None):
    """GPU ms of ``reps`` calls of ``fn``, each bracketed by CUDA events after an L2 flush (a write of
    ``scratch``; None: no flush), all read after one synchronisation. No host lead: a host slower than
    the GPU shows in these times, which is what this script and ``timing_spread.py`` look for."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        if scratch is not None:
            scratch.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def graph_time(fn, reps=30):
    """Median GPU time of ``fn`` replayed from a CUDA graph, with the same L2 flush before each replay."""
    replay = capture(fn)
    scratch = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    return statistics.median(event_times(replay, reps, scratch))


def case_inputs(name):
    """Seeded q, k, v of case ``name`` and a random state skipping about its fraction of tiles."""
    (b, s, h, d), frac = CASES[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, random_state(b, h, s, *default_block_sizes(d), frac)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="host-overhead")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in CASES:
        q, k, v, state = case_inputs(name)
        for mode, thr in (("no-detect", float("-inf")), ("detect", -1e4)):
            def fn():
                return lite_attention(q, k, v, state, threshold=thr)
            events_ms = time_cuda(fn, budget_ms=300, min_reps=30, host_lead=False).median_ms
            graph_ms = graph_time(fn)
            torch.cuda.synchronize()
            n = 50
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host_ms = (time.perf_counter() - t0) / n * 1e3
            torch.cuda.synchronize()
            row = {"case": name, "mode": mode, "events_ms": events_ms, "graph_ms": graph_ms,
                   "host_ms_per_call": host_ms}
            rows.append(row)
            print(row, flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    with open(os.path.join(args.out, "host_profile.txt"), "w") as f:
        f.write(text.getvalue())
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(text.getvalue()[:6000])


if __name__ == "__main__":
    main()
