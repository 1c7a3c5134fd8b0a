"""What a patched model did: sparsity and time per layer and per step.

Why built after the run: skipped fractions and timers live on the device
during generation (reading them per call would sync). The summary reads them
all at once, from the records the patched layers keep for the latest
generation of each context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import fmean

__all__ = ["AttentionCall", "ForwardCall", "Summary"]


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of one patched layer.

    ``mode``: "sparse" (liteattn), "dense_step" (a configured dense step) or
    "fallback" (a call liteattn could not compute exactly, run dense).
    ``sparsity``: fraction of tiles skipped (0 for dense calls).
    ``attention_ms``: None unless the patch was applied with ``timing=True``.
    """

    transformer: str
    context: str
    layer: str
    step: int
    mode: str
    sparsity: float
    attention_ms: float | None


@dataclass(frozen=True)
class ForwardCall:
    """One transformer forward (one denoising step of one context)."""

    transformer: str
    context: str
    step: int
    forward_ms: float | None


@dataclass
class Summary:
    """Per-call records plus aggregates; ``str(summary)`` is a printable table."""

    calls: list[AttentionCall]
    forwards: list[ForwardCall]
    fallbacks: dict[str, int] = field(default_factory=dict)
    header: str = ""

    @property
    def sparsity(self) -> float:
        """Mean skipped fraction over all attention calls (0.0 without calls)."""
        return fmean(c.sparsity for c in self.calls) if self.calls else 0.0

    @property
    def attention_ms(self) -> float | None:
        """Total attention time, None when not timed."""
        return _total(c.attention_ms for c in self.calls)

    def per_step(self) -> dict[int, dict]:
        """``{step: {"sparsity", "attention_ms", "forward_ms", "calls", "dense"}}`` over layers and contexts."""
        steps = sorted({c.step for c in self.calls} | {f.step for f in self.forwards})
        out = {}
        for step in steps:
            calls = [c for c in self.calls if c.step == step]
            out[step] = {
                "sparsity": fmean(c.sparsity for c in calls) if calls else 0.0,
                "attention_ms": _total(c.attention_ms for c in calls),
                "forward_ms": _total(f.forward_ms for f in self.forwards if f.step == step),
                "calls": len(calls),
                "dense": sum(c.mode != "sparse" for c in calls),
            }
        return out

    def per_layer(self) -> dict[str, dict]:
        """``{layer: {"sparsity", "attention_ms", "calls", "dense"}}`` over steps and contexts.

        Layers are named ``"transformer_2:blocks.0.attn1"`` when the pipeline
        has more than one patched transformer, else by their module name.
        """
        several = len({c.transformer for c in self.calls}) > 1
        groups: dict[str, list[AttentionCall]] = {}
        for c in self.calls:
            groups.setdefault(f"{c.transformer}:{c.layer}" if several else c.layer, []).append(c)
        return {
            name: {
                "sparsity": fmean(c.sparsity for c in calls),
                "attention_ms": _total(c.attention_ms for c in calls),
                "calls": len(calls),
                "dense": sum(c.mode != "sparse" for c in calls),
            }
            for name, calls in groups.items()
        }

    def to_dict(self) -> dict:
        """JSON-ready: the aggregates and every call."""
        return {
            "sparsity": self.sparsity,
            "attention_ms": self.attention_ms,
            "fallbacks": dict(self.fallbacks),
            "per_step": {str(k): v for k, v in self.per_step().items()},
            "per_layer": self.per_layer(),
            "calls": [asdict(c) for c in self.calls],
            "forwards": [asdict(f) for f in self.forwards],
        }

    def table(self) -> str:
        """Per-step and per-layer tables with the totals."""
        contexts = ", ".join(sorted({c.context for c in self.calls})) or "none"
        lines = [self.header] if self.header else []
        lines.append(f"{len(self.calls)} attention calls, contexts: {contexts}; mean sparsity {self.sparsity:.1%}; "
                     f"attention {_ms(self.attention_ms)} ms")
        lines.append("")
        lines.append(f"{'step':>6} {'sparsity':>9} {'attention ms':>13} {'forward ms':>11} {'calls':>6} {'dense':>6}")
        for step, row in self.per_step().items():
            lines.append(f"{step:>6} {row['sparsity']:>9.1%} {_ms(row['attention_ms']):>13} "
                         f"{_ms(row['forward_ms']):>11} {row['calls']:>6} {row['dense']:>6}")
        layers = self.per_layer()
        width = max([5] + [len(name) for name in layers])
        lines.append("")
        lines.append(f"{'layer':<{width}} {'sparsity':>9} {'attention ms':>13} {'calls':>6} {'dense':>6}")
        for name, row in layers.items():
            lines.append(f"{name:<{width}} {row['sparsity']:>9.1%} {_ms(row['attention_ms']):>13} "
                         f"{row['calls']:>6} {row['dense']:>6}")
        if self.fallbacks:
            lines.append("")
            lines.append("dense fallbacks: " + ", ".join(f"{k}={v}" for k, v in sorted(self.fallbacks.items())))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _total(values) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
