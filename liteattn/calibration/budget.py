"""What a calibration must achieve: a quality floor on the final output, a sparsity, or upstream's per-layer bound.

Three kinds, because the field calibrates three ways and the issue asks to
compare them:

- ``fidelity``: the final output (the video) of each calibration input, sparse
  against dense with the same seed: PSNR or SSIM at least a floor, or the
  relative L2 error at most a ceiling, for the mean over the inputs (default)
  or for the worst one. The only kind that checks what the user sees; the
  search maximises sparsity under it.
- ``sparsity``: each layer skips at least a fraction of its tiles over the
  run, the convention of the serving stacks (TensorRT-LLM's and ModelOpt's
  ``target_sparsity``); quality is measured and recorded, not bounded.
- ``marginal``: CUDA LiteAttention's calibration rule: at every layer and
  step, the output error the step's new marks add (attention over the tiles
  kept before against after the step, relative L1) stays under a bound.
  Errors then add up over layers and steps unchecked, which is what the
  comparison measures.

A budget is written ``"psnr>=32"``, ``"ssim>=0.97"``, ``"rel_error<=0.05"``,
``"sparsity>=0.3"`` or ``"marginal_l1<=0.05"`` (:meth:`Budget.parse`);
``"worst:psnr>=30"`` bounds the worst input instead of the mean.

Why the mean by default: a search that pushes every threshold to the edge
of a bound fits the noise of the inputs it sees. The worst of a few inputs is
the noisiest statistic there is, and it gets worse on any larger set of
inputs, so a worst-case bound met in calibration is routinely missed on
held-out inputs; a mean generalises better (a profile's held-out measurement shows how well).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Budget", "METRICS"]

# metric -> (kind, direction: +1 when higher is better and the bound is a floor, -1 for a ceiling, valid range)
METRICS = {
    "psnr": ("fidelity", 1, (0.0, math.inf)),
    "ssim": ("fidelity", 1, (0.0, 1.0)),
    "rel_error": ("fidelity", -1, (0.0, math.inf)),
    "sparsity": ("sparsity", 1, (0.0, 1.0)),
    "marginal_l1": ("marginal", -1, (0.0, math.inf)),
}
_FORM = re.compile(r"^\s*(?:(mean|worst)\s*:\s*)?([a-z_0-9]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")
AGGREGATES = ("mean", "worst")


@dataclass(frozen=True)
class Budget:
    """One bound: ``metric`` (see :data:`METRICS`) and its ``value``.

    ``margin`` (fidelity only, in the metric's units) asks the calibration
    inputs to meet the bound by that much, so that inputs not seen in
    calibration still meet it more often. ``aggregate`` (fidelity only):
    ``"mean"`` bounds the mean over the inputs, ``"worst"`` the worst input.
    """

    metric: str
    value: float
    margin: float = 0.0
    aggregate: str = "mean"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"budget: expected one of {sorted(METRICS)}, got {self.metric!r}")
        low, high = METRICS[self.metric][2]
        value = float(self.value)
        if not (low < value <= high) or math.isnan(value) or math.isinf(value):
            raise ValueError(f"budget: {self.metric} bound expected in ({low:g}, {high:g}], got {self.value!r}")
        object.__setattr__(self, "value", value)
        if not float(self.margin) >= 0 or (self.margin and self.kind != "fidelity"):
            raise ValueError(f"budget: margin expected >= 0, and only for psnr, ssim or rel_error; got {self.margin!r} "
                             f"for {self.metric}")
        object.__setattr__(self, "margin", float(self.margin))
        if self.aggregate not in AGGREGATES or (self.aggregate != "mean" and self.kind != "fidelity"):
            raise ValueError(f"budget: aggregate expected one of {AGGREGATES} ('worst' only for psnr, ssim or "
                             f"rel_error), got {self.aggregate!r}")

    @classmethod
    def parse(cls, text: str, margin: float = 0.0) -> "Budget":
        """``"psnr>=32"``, ``"worst:psnr>=30"`` and the like; a ``ValueError`` says what is expected."""
        match = _FORM.match(text) if isinstance(text, str) else None
        if not match:
            raise ValueError(f"budget: expected 'psnr>=DB', 'ssim>=X', 'rel_error<=X' (optionally prefixed 'worst:'), "
                             f"'sparsity>=X' or 'marginal_l1<=X', got {text!r}")
        aggregate, metric, op, number = match.groups()
        if metric in METRICS and op != (">=" if METRICS[metric][1] > 0 else "<="):
            raise ValueError(f"budget: {metric} takes {'>=' if METRICS[metric][1] > 0 else '<='}, got {text!r}")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"budget: expected a number after {op}, got {text!r}") from None
        return cls(metric, value, margin, aggregate or "mean")

    @classmethod
    def of(cls, value) -> "Budget":
        """A :class:`Budget` from itself or its text form."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(f"budget: expected a liteattn.calibration.Budget or text like 'psnr>=32', got "
                         f"{type(value).__name__}")

    @property
    def kind(self) -> str:
        """``"fidelity"``, ``"sparsity"`` or ``"marginal"``."""
        return METRICS[self.metric][0]

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric][1] > 0

    def reduce(self, values) -> float:
        """The mean or the worst of per-input values: what the bound holds for."""
        values = list(values)
        if self.aggregate == "mean":
            return sum(values) / len(values)
        return min(values) if self.higher_is_better else max(values)

    def met(self, value: float, with_margin: bool = True) -> bool:
        """Whether ``value`` (a reduced or a single input's value) meets the bound (and its margin)."""
        margin = self.margin if with_margin else 0.0
        if math.isnan(value):
            return False
        return value >= self.value + margin if self.higher_is_better else value <= self.value - margin

    def __str__(self) -> str:
        text = f"{'worst:' if self.aggregate == 'worst' else ''}{self.metric}" \
               f"{'>=' if self.higher_is_better else '<='}{self.value:g}"
        return text + (f" (margin {self.margin:g})" if self.margin else "")

    def to_dict(self) -> dict:
        return {"metric": self.metric, "bound": ">=" if self.higher_is_better else "<=", "value": self.value,
                "margin": self.margin, "aggregate": self.aggregate, "kind": self.kind, "text": str(self)}
