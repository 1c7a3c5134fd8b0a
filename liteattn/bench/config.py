"""What one ``liteattn bench`` run depends on, resolved from its command line (:func:`.run.resolve_config`).

A module of its own so that the command (:mod:`.run`) and the GPU run (:mod:`.runner`) share it without
importing each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .registry import Method, Pattern, Shape

__all__ = ["SPARSE_CHECK_FRACTION", "BenchConfig"]

SPARSE_CHECK_FRACTION = 0.5  # the gate's mask: random pattern, half the tiles skipped


@dataclass
class BenchConfig:
    """Everything a run depends on, resolved from the command line."""

    shapes: list[Shape]
    methods: list[Method]
    patterns: list[Pattern]
    fractions: list[float]
    layout: str
    out: Path
    seed: int
    max_minutes: float
    budget_ms: float  # timing budget per case; the rep count is clamped to [min_reps, max_reps]
    min_reps: int
    max_reps: int
    quick: bool
    rounds: int = 10  # each shape's cases are timed in this many interleaved rounds
    # At least this many runs for the cases without a mask (dense methods, detection): targets 1-2 compare such
    # calls within 2-3 %, which 10 runs of a 200 ms call in a few orders did not resolve
    # (lab/benchmarks-history.md §2.1).
    dense_min_reps: int = 0
    clocks: bool = True  # sample the SM clock and power while each case is timed (nvidia-smi)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(shapes=[asdict(s) for s in self.shapes], methods=[m.name for m in self.methods],
                 patterns=[p.name for p in self.patterns], out=str(self.out))
        return d
