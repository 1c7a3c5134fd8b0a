"""What the benchmark can run, as data: shapes, methods, skip patterns, defaults.

Why a registry and not flags scattered through the runner: the table, the
JSON, the plot and the ratio targets all key off these names, so each name is
defined once here and everything else looks it up.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_FRACTIONS", "DEFAULT_SHAPES", "METHODS", "PATTERNS", "QUICK_SHAPES", "SHAPES",
    "Method", "Pattern", "Shape", "parse_fractions", "parse_methods", "parse_patterns", "parse_shapes",
]


@dataclass(frozen=True)
class Shape:
    """One attention problem: ``(B, S, H, D)``, self-attention (``S_q == S_k``), non-causal."""

    name: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    note: str = ""

    @property
    def flops(self) -> int:
        """Dense forward FLOPs: two ``S x S x D`` matrix products per head, 2 FLOPs per multiply-add."""
        return 4 * self.batch * self.heads * self.seq_len * self.seq_len * self.head_dim

    @property
    def bshd(self) -> tuple[int, int, int, int]:
        return self.batch, self.seq_len, self.heads, self.head_dim


@dataclass(frozen=True)
class Method:
    """A way of computing attention. ``sparse`` methods take a tile mask and a skipped fraction."""

    name: str
    sparse: bool
    description: str


@dataclass(frozen=True)
class Pattern:
    """A family of tile masks parameterised by the skipped fraction ``s``."""

    name: str
    description: str


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("wan1.3b-480p", 1, 32760, 12, 128, "Wan2.1 1.3B, 480p, 81 frames"),
    Shape("wan14b-720p", 1, 75600, 40, 128, "Wan2.1 14B, 720p, 81 frames"),
    Shape("hdim64-16k", 1, 16384, 24, 64, "head_dim 64 models"),
    Shape("hunyuan-720p", 1, 118800, 24, 128, "HunyuanVideo, 720p, 129 frames"),
)}
# Small sizes for a smoke run: same head_dims, the d128 one ragged (S not a multiple of the tile) as Wan is.
QUICK_SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("quick-d128", 1, 4000, 4, 128, "smoke run, ragged last tile"),
    Shape("quick-d64", 1, 2048, 4, 64, "smoke run"),
)}
DEFAULT_SHAPES = ("wan1.3b-480p", "wan14b-720p", "hdim64-16k")  # hunyuan-720p is opt-in: it alone takes minutes
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 0.9)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sdpa-cudnn", False, "torch SDPA forced to SDPBackend.CUDNN_ATTENTION"),
    Method("sdpa-flash", False, "torch SDPA forced to SDPBackend.FLASH_ATTENTION"),
    Method("liteattn-dense", False, "lite_attention(..., enabled=False): every tile (the kernel's full walk), no "
           "detection"),
    Method("liteattn-detect", False, "skipping on, nothing skipped, threshold -1e4 (marks nothing): detection overhead "
           "at a generation's first step (fresh state)"),
    Method("liteattn-detect-list", False, "the same on a full list carried from an earlier step (index-list path)"),
    Method("flex", True, "compiled flex_attention, BlockMask.from_kv_blocks of the same tile mask"),
    Method("liteattn-sparse", True, "SkipState.from_dense(mask), threshold -inf: exactly the mask's tiles skipped"),
    Method("liteattn-int8", False, "liteattn-dense with qk_dtype='int8' (8-bit Q.K^T, the rounding pass included)"),
    Method("liteattn-int8-sparse", True, "liteattn-sparse with qk_dtype='int8'"),
    Method("liteattn-int8-fp8pv", False, "liteattn-int8 with pv_dtype='fp8' (P.V in fp8 as well; V's rounding pass "
           "included)"),
    Method("liteattn-int8-fp8pv-sparse", True, "liteattn-sparse with qk_dtype='int8', pv_dtype='fp8'"),
)}

# The default run: every method but the 8-bit modes, which are opt-in (--methods ...,liteattn-int8 or 'all'): they
# are faster than 16 bits dense at head_dim 128, and with tiles skipped only at large shapes (docs/benchmarks.md),
# and their rows would lengthen every run by about half each.
DEFAULT_METHODS = tuple(name for name in METHODS if not name.startswith("liteattn-int8"))

PATTERNS: dict[str, Pattern] = {p.name: p for p in (
    Pattern("random", "uniform random key tiles per (batch, head, query tile), >= 1 kept"),
    Pattern("random-uneven", "uniform random tiles per (batch, head): query tiles differ in count, >= 1 kept"),
    Pattern("banded", "a window of key tiles around the diagonal, its width giving the fraction"),
    Pattern("per-head", "each head its own band width, fractions spread around s with mean s"),
)}


def _parse_names(text: str, known: dict, argument: str, all_names: tuple[str, ...]) -> list[str]:
    if text.strip() == "all":
        return list(all_names)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{argument}: expected a comma-separated list of names from {list(known)}, got {text!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{argument}: unknown name(s) {unknown}; expected a comma-separated subset of {list(known)} "
                         "or 'all'")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def parse_shapes(text: str) -> list[Shape]:
    """``--shapes``: comma-separated preset names (quick ones too), or ``all`` for every full-size preset."""
    known = {**SHAPES, **QUICK_SHAPES}
    return [known[n] for n in _parse_names(text, known, "--shapes", tuple(SHAPES))]


def parse_methods(text: str) -> list[Method]:
    """``--methods``: comma-separated method names, or ``all`` (the default run is :data:`DEFAULT_METHODS`)."""
    return [METHODS[n] for n in _parse_names(text, METHODS, "--methods", tuple(METHODS))]


def parse_patterns(text: str) -> list[Pattern]:
    """``--patterns``: comma-separated pattern names, or ``all``."""
    return [PATTERNS[n] for n in _parse_names(text, PATTERNS, "--patterns", tuple(PATTERNS))]


def parse_fractions(text: str) -> list[float]:
    """``--fractions``: comma-separated skipped fractions, each in ``[0, 1)``."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--fractions: expected comma-separated numbers in [0, 1), got {item!r} in {text!r}") from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--fractions: each skipped fraction must be in [0, 1) (1 would skip everything), got {value}")
        values.append(value)
    return list(dict.fromkeys(values))
