"""GPU timing with CUDA events, and the statistics the report uses.

Why our own loop rather than ``triton.testing.do_bench``: ``do_bench`` picks
its repetition count from a time budget, so a 200 ms attention call (Wan 14B
at 720p) would be timed once or twice and its p20/p80 would mean nothing.
Here the count is the budget's worth *but at least* ``min_reps``. As in
``do_bench``, the L2 cache is flushed before every run (a 256 MB write), so
each call starts cold, as it does inside a real model between layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["L2_FLUSH_BYTES", "Timing", "reps_for_budget", "summarize", "tflops", "time_cuda"]

L2_FLUSH_BYTES = 256 * 1024 * 1024  # well above any current GPU's L2 (H100: 50 MB)


@dataclass(frozen=True)
class Timing:
    """Milliseconds over ``reps`` timed runs."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, 20th and 80th percentile of per-run times."""
    if not samples_ms:
        raise ValueError("samples_ms: expected at least one timing sample, got none")
    if any(not math.isfinite(x) or x < 0 for x in samples_ms):
        raise ValueError(f"samples_ms: expected finite non-negative milliseconds, got {list(samples_ms)}")
    values = sorted(float(x) for x in samples_ms)
    return Timing(_percentile(values, 50), _percentile(values, 20), _percentile(values, 80), len(values))


def reps_for_budget(estimate_ms: float, budget_ms: float, min_reps: int, max_reps: int) -> int:
    """How many timed runs fit in ``budget_ms``, clamped to ``[min_reps, max_reps]``."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"min_reps/max_reps: expected 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    if estimate_ms <= 0 or not math.isfinite(estimate_ms):
        return max_reps
    return max(min_reps, min(max_reps, int(budget_ms / estimate_ms)))


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    if ms <= 0:
        raise ValueError(f"ms: expected a positive time, got {ms}")
    return flops / (ms * 1e-3) / 1e12


def time_cuda(fn: Callable[[], object], *, budget_ms: float = 300.0, min_reps: int = 5, max_reps: int = 100,
              warmup: int = 1, flush_l2: bool = True) -> Timing:
    """Time ``fn`` on the current CUDA stream.

    ``warmup`` untimed calls absorb compilation and autotuning; one timed call
    sizes the repetition count; then each run is bracketed by CUDA events
    (after an L2 flush that is not timed) and all are read after a single
    synchronisation, so the host never stalls the GPU between runs.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None

    def timed(reps: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if scratch is not None:
                scratch.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    estimate = timed(1)[0]
    reps = reps_for_budget(estimate, budget_ms, min_reps, max_reps)
    return summarize(timed(reps))
