"""Result records (timing rows, correctness checks) and the ratios that judge them.

Why ratios with targets: raw milliseconds depend on the GPU; the claims a
user cares about do not. liteattn is worth using when

- dense liteattn is no slower than cuDNN (``<= 1.00``),
- turning detection on costs at most 3% (``<= 1.03``),
- skipping a fraction ``s`` of the tiles costs at most 10% more than the
  ideal ``(1 - s) x dense`` (``<= 1.10``), against cuDNN and against
  liteattn's own dense time. FlexAttention is held to the same line, for context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from .clocks import ClockSummary
from .timing import Timing, tflops

__all__ = ["BF16_TOLERANCE", "Check", "FP8_PV_TOLERANCE", "Ratio", "Row", "RATIO_TARGETS", "Tolerance",
           "compute_ratios", "failed_row", "judge_errors", "run_status", "timed_row"]

DENSE_TARGET, DETECT_TARGET, SPARSE_TARGET = 1.00, 1.03, 1.10
INT8_TARGET = 1 / 1.4  # 8-bit Q.K^T: at least 1.4x cuDNN's bf16 throughput
RATIO_TARGETS = {
    "liteattn-dense / sdpa-cudnn": DENSE_TARGET,
    "liteattn-int8 / sdpa-cudnn": INT8_TARGET,
    "liteattn-int8-sparse / ((1-s) liteattn-int8)": SPARSE_TARGET,
    "liteattn-int8-fp8pv / sdpa-cudnn": INT8_TARGET,
    "liteattn-int8-fp8pv-sparse / ((1-s) liteattn-int8-fp8pv)": SPARSE_TARGET,
    "liteattn-detect / liteattn-dense": DETECT_TARGET,
    "liteattn-detect-list / liteattn-dense": DETECT_TARGET,
    "liteattn-sparse / ((1-s) sdpa-cudnn)": SPARSE_TARGET,
    "liteattn-sparse / ((1-s) liteattn-dense)": SPARSE_TARGET,
    "flex / ((1-s) sdpa-cudnn)": SPARSE_TARGET,
    "flex / ((1-s) liteattn-dense)": SPARSE_TARGET,
}


@dataclass
class Row:
    """One timed case. Dense methods have ``pattern=None`` and ``skipped=0``."""

    shape: str
    method: str
    pattern: str | None
    fraction: float  # requested skipped fraction
    skipped: float  # achieved skipped fraction of tiles
    status: str  # "ok", "failed" or "skipped"
    error: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    reps: int = 0
    tflops: float | None = None  # dense FLOPs / time: comparable across methods
    effective_tflops: float | None = None  # FLOPs actually computed ((1 - skipped) x dense) / time
    host_ms: float | None = None  # host time to issue one call (with the flush and events around it)
    round_medians_ms: list[float] | None = None  # median of each interleaved round (clock drift shows here)
    sm_clock_mhz: float | None = None  # median SM clock while the case's runs were timed (under a power cap
    power_w: float | None = None  # the clock is part of the result); None where it was not sampled
    clock_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def timed_row(shape: str, flops: int, method: str, timing: Timing, *, pattern: str | None = None,
              fraction: float = 0.0, skipped: float = 0.0, clocks: ClockSummary | None = None) -> Row:
    """A successful row with its TFLOP/s filled in from the dense FLOP count (and its clocks, if sampled)."""
    clocks = clocks or ClockSummary(None, None, 0)
    return Row(shape, method, pattern, fraction, skipped, "ok", "", timing.median_ms, timing.p20_ms, timing.p80_ms,
               timing.reps, tflops(flops, timing.median_ms), tflops(flops * (1.0 - skipped), timing.median_ms),
               timing.host_ms, None if timing.round_medians_ms is None else list(timing.round_medians_ms),
               clocks.sm_clock_mhz, clocks.power_w, clocks.samples)


def failed_row(shape: str, method: str, error: str, *, pattern: str | None = None, fraction: float = 0.0,
               skipped: float = 0.0, status: str = "failed") -> Row:
    return Row(shape, method, pattern, fraction, skipped, status, error)


@dataclass
class Check:
    """One correctness comparison before timing a shape."""

    shape: str
    name: str  # e.g. "liteattn-dense vs sdpa-cudnn"
    status: str  # "passed", "failed" or "error" (could not run)
    max_abs: float | None = None
    rel_l2: float | None = None
    ref_max_abs: float | None = None  # max |reference|, the scale max_abs is judged against
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# bf16 tolerances for two correct kernels compared with each other: both round the probabilities to bf16
# before P @ V and the output to bf16, which gives relative L2 differences of a few 1e-3. A wrong tile
# (skipped when it should not be, or vice versa) moves the output by O(1) relative.
@dataclass(frozen=True)
class Tolerance:
    """How far an output may be from the reference: relative L2, and max |difference| relative to max |reference|."""

    rel_l2: float
    max_abs: float


BF16_TOLERANCE = Tolerance(rel_l2=2e-2, max_abs=5e-2)
# fp8 P.V rounds each weight of P by up to 2^-4 of it: on the bench's random inputs, whose outputs are small averages
# of zero-mean values, that is a relative L2 of about 0.04 and a max |difference| of about 0.06 of max |reference|
# (H200 runs: lab/results/qk8); a wrong key order or scale is O(1).
FP8_PV_TOLERANCE = Tolerance(rel_l2=6e-2, max_abs=1.5e-1)


def judge_errors(max_abs: float, rel_l2: float, ref_max_abs: float, tol: Tolerance = BF16_TOLERANCE) -> bool:
    """Whether two attention outputs agree within ``tol`` (bf16's by default; NaN never passes)."""
    return rel_l2 <= tol.rel_l2 and max_abs <= tol.max_abs * ref_max_abs


@dataclass
class Ratio:
    shape: str
    name: str  # a key of RATIO_TARGETS
    pattern: str | None
    fraction: float  # achieved skipped fraction (0 for dense ratios)
    value: float
    target: float

    @property
    def ok(self) -> bool:
        return self.value <= self.target

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def compute_ratios(rows: Iterable[Row]) -> list[Ratio]:
    """All ratios whose numerator and denominator rows both succeeded, per shape."""
    rows = [r for r in rows if r.status == "ok" and r.median_ms]
    dense = {(r.shape, r.method): r.median_ms for r in rows if r.pattern is None}
    ratios = []
    for shape in dict.fromkeys(r.shape for r in rows):
        cudnn, lite = dense.get((shape, "sdpa-cudnn")), dense.get((shape, "liteattn-dense"))
        if lite and cudnn:
            ratios.append(_ratio(shape, "liteattn-dense / sdpa-cudnn", None, 0.0, lite / cudnn))
        int8 = dense.get((shape, "liteattn-int8"))
        if int8 and cudnn:
            ratios.append(_ratio(shape, "liteattn-int8 / sdpa-cudnn", None, 0.0, int8 / cudnn))
        pv8 = dense.get((shape, "liteattn-int8-fp8pv"))
        if pv8 and cudnn:
            ratios.append(_ratio(shape, "liteattn-int8-fp8pv / sdpa-cudnn", None, 0.0, pv8 / cudnn))
        for name in ("liteattn-detect", "liteattn-detect-list"):
            detect = dense.get((shape, name))
            if detect and lite:
                ratios.append(_ratio(shape, f"{name} / liteattn-dense", None, 0.0, detect / lite))
        for r in rows:
            if r.shape != shape or r.pattern is None:
                continue
            if r.method == "liteattn-int8-sparse" and int8:
                ratios.append(_ratio(shape, "liteattn-int8-sparse / ((1-s) liteattn-int8)", r.pattern, r.skipped,
                                     r.median_ms / ((1.0 - r.skipped) * int8)))
            if r.method == "liteattn-int8-fp8pv-sparse" and pv8:
                ratios.append(_ratio(shape, "liteattn-int8-fp8pv-sparse / ((1-s) liteattn-int8-fp8pv)", r.pattern,
                                     r.skipped, r.median_ms / ((1.0 - r.skipped) * pv8)))
            if r.method not in ("liteattn-sparse", "flex"):
                continue
            for base_name, base in (("sdpa-cudnn", cudnn), ("liteattn-dense", lite)):
                if base:
                    name = f"{r.method} / ((1-s) {base_name})"
                    ratios.append(_ratio(shape, name, r.pattern, r.skipped, r.median_ms / ((1.0 - r.skipped) * base)))
    return ratios


def _ratio(shape, name, pattern, fraction, value) -> Ratio:
    return Ratio(shape, name, pattern, fraction, value, RATIO_TARGETS[name])


def run_status(checks: Iterable[Check], rows: Iterable[Row]) -> str:
    """The run's verdict, worst first.

    ``failed``: a correctness check was above tolerance. ``unchecked``: a
    check could not run (e.g. FlexAttention unavailable), so a number may be
    unverified. ``incomplete``: a case was skipped for time. Else ``passed``.
    Method failures (e.g. an SDPA backend not available on this GPU) are
    reported per row and do not change the verdict: they are facts about the
    platform, not about liteattn.
    """
    checks, rows = list(checks), list(rows)
    if any(c.status == "failed" for c in checks):
        return "failed"
    if any(c.status != "passed" for c in checks):
        return "unchecked"
    if any(r.status == "skipped" for r in rows):
        return "incomplete"
    return "passed"
