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
import time
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["L2_FLUSH_BYTES", "CaseTimer", "Timing", "release_flush_buffers", "reps_for_budget", "split_reps",
           "summarize", "tflops", "time_cuda"]

L2_FLUSH_BYTES = 256 * 1024 * 1024  # well above any current GPU's L2 (H100: 50 MB)


def _host_seconds() -> float:
    """The host's clock for the time to issue a batch (one name, so a test can drive it with a fake GPU)."""
    return time.perf_counter()


@dataclass(frozen=True)
class Timing:
    """Milliseconds over ``reps`` timed runs."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    host_ms: float | None = None  # host time to issue one timed run (flush, events, the call)
    round_medians_ms: tuple[float, ...] | None = None  # median of each round's runs, in the order timed


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


def _cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep`` on the current device, measured now (the
    clock is not exposed, and it differs between an idle and a busy GPU)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


MAX_LEAD_MS = 5000.0
_FLUSH_BUFFERS: dict = {}


def _flush_buffer():
    """One L2-flush scratch buffer per device, shared by every timer (a shape's cases are alive together)."""
    import torch

    device = torch.cuda.current_device()
    if device not in _FLUSH_BUFFERS:
        _FLUSH_BUFFERS[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    return _FLUSH_BUFFERS[device]


def release_flush_buffers() -> None:
    """Free the flush buffers (the next timer allocates one again)."""
    _FLUSH_BUFFERS.clear()


def split_reps(reps: int, rounds: int) -> list[int]:
    """``reps`` runs spread over at most ``rounds`` rounds as evenly as possible (no empty round)."""
    if reps < 1 or rounds < 1:
        raise ValueError(f"reps/rounds: expected positive counts, got {reps}, {rounds}")
    rounds = min(rounds, reps)
    return [reps // rounds + (1 if i < reps % rounds else 0) for i in range(rounds)]


class CaseTimer:
    """Times one call on the current CUDA stream, in one go or in rounds.

    Construction runs ``warmup`` untimed calls (compilation, autotuning) and
    one timed call that sizes the repetition count (``reps``: the budget's
    worth, clamped to ``[min_reps, max_reps]``) and measures the host's time
    per run. Each :meth:`run` then times a batch: every run bracketed by
    CUDA events after an L2 flush that is not timed, all read after one
    synchronisation.

    Why rounds: the GPU's clock drifts while it works (power and temperature
    limits), by a few percent over the minute a large shape takes. Cases timed
    one after the other would see different clocks, and the ratios between
    them would move by as much from run to run; a few rounds over all cases
    give each case the same mix of clocks.

    Why the GPU first sleeps (``host_lead``): a short call (0.4 ms at s = 0.9)
    can take the host nearly as long to issue as the GPU to run, and whenever
    the GPU catches up with the host, an event pair measures Python, not the
    kernel (seen as bimodal timings, lab/kernel-notes.md v10). So the GPU is held
    in a spin for 1.5x the host's time to issue the batch, and the host
    enqueues every run before the GPU starts the first; if the spin still
    ended before the host was done, the batch is repeated with a longer one.
    The host's time per run is kept beside the GPU times (``host_ms``): a
    method whose host time exceeds its GPU time would be host-bound in a real
    loop. ``fn`` must not synchronise (the host would wait out the spin).
    """

    def __init__(self, fn: Callable[[], object], *, budget_ms: float = 300.0, min_reps: int = 5,
                 max_reps: int = 100, warmup: int = 1, flush_l2: bool = True, host_lead: bool = True):
        import torch

        self.fn = fn
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        self.scratch = _flush_buffer() if flush_l2 else None
        self.host_lead = host_lead and hasattr(torch.cuda, "_sleep")
        self.cycles_per_ms = _cycles_per_ms() if self.host_lead else 0.0
        (estimate,), self.host_ms, _ = self._timed(1, 0.0)
        self.reps = reps_for_budget(estimate, budget_ms, min_reps, max_reps)
        self.samples: list[float] = []
        self.round_medians: list[float] = []
        self._host_total_ms = 0.0

    def _timed(self, reps: int, lead_ms: float) -> tuple[list[float], float, bool]:
        """GPU ms per run, host ms per run, and whether the lead outlasted the host's enqueueing."""
        import torch

        new_event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        events = [(new_event(), new_event()) for _ in range(reps)]
        lead = (new_event(), new_event()) if lead_ms > 0 else None
        if lead is not None:
            lead[0].record()
            torch.cuda._sleep(int(min(lead_ms, MAX_LEAD_MS) * self.cycles_per_ms))
            lead[1].record()
        t0 = _host_seconds()
        for start, end in events:
            if self.scratch is not None:
                self.scratch.zero_()
            start.record()
            self.fn()
            end.record()
        host_total_ms = (_host_seconds() - t0) * 1e3
        torch.cuda.synchronize()
        ahead = lead is None or lead[0].elapsed_time(lead[1]) >= host_total_ms
        return [start.elapsed_time(end) for start, end in events], host_total_ms / reps, ahead

    def run(self, reps: int) -> None:
        """Time a batch of ``reps`` runs and add them to the samples."""
        if self.host_lead and self.samples:  # the clock may have moved since the last batch (power cap)
            self.cycles_per_ms = _cycles_per_ms()
        lead_ms = 1.5 * self.host_ms * reps + 1.0 if self.host_lead else 0.0
        samples, host_ms, ahead = self._timed(reps, lead_ms)
        if not ahead:  # the GPU caught up with the host: once more with a longer lead
            samples, host_ms, _ = self._timed(reps, 3.0 * host_ms * reps + 1.0)
        self.samples += samples
        self.round_medians.append(summarize(samples).median_ms)
        self._host_total_ms += host_ms * reps
        self.host_ms = self._host_total_ms / len(self.samples)

    def result(self) -> Timing:
        result = summarize(self.samples)
        return Timing(result.median_ms, result.p20_ms, result.p80_ms, result.reps, self.host_ms,
                      tuple(self.round_medians))


def time_cuda(fn: Callable[[], object], *, budget_ms: float = 300.0, min_reps: int = 5, max_reps: int = 100,
              warmup: int = 1, flush_l2: bool = True, host_lead: bool = True) -> Timing:
    """Time ``fn`` in one batch (:class:`CaseTimer`): warm-up, sizing, then the budget's worth of runs."""
    timer = CaseTimer(fn, budget_ms=budget_ms, min_reps=min_reps, max_reps=max_reps, warmup=warmup,
                      flush_l2=flush_l2, host_lead=host_lead)
    timer.run(timer.reps)
    return timer.result()
