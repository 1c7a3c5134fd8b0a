"""The configuration of a model patch: one frozen dataclass, checked once.

Why frozen and separate from the per-layer state: the same config object is
shared by every patched layer of every transformer of a pipeline, may be reused
for the next model, and must never change under a running generation.
``apply`` never mutates it; overrides produce a new one
(:func:`dataclasses.replace`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from .. import _validation as V

__all__ = ["LiteAttentionConfig"]

TEXT_TOKEN_MODES = ("must_do", "skippable")


@dataclass(frozen=True)
class LiteAttentionConfig:
    """How :func:`liteattn.integrations.apply` patches a diffusers video transformer.

    Args:
        threshold (`float` or sequence of `float`, defaults to `-10.0`):
            Negative log2 threshold below which a key tile is marked negligible
            and never computed again in the generation (``-inf`` marks nothing),
            or a per-step schedule indexed by the denoising step (the last value
            repeats).
        dense_steps (`int`, defaults to `0`):
            The first ``dense_steps`` denoising steps run the model's own dense
            attention backend, as serving stacks do: the earliest, noisiest steps
            shape the layout of the video, and their attention maps are the least
            like the later ones. Skipping starts fresh at step ``dense_steps``.
        block_size (`tuple[int, int]`, *optional*):
            ``(block_m, block_n)`` tile sizes; default per head_dim.
        backend (`str`, defaults to `"auto"`):
            ``"auto"`` (Triton on GPU, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        include (sequence of `str`, *optional*):
            Regular expressions (``re.search``) on module names choosing the
            self-attention layers to patch. Default: the model family's
            self-attention layers (required for families liteattn does not know).
        exclude (sequence of `str`, defaults to `()`):
            Regular expressions on module names of layers to keep dense, e.g.
            ``(r"^blocks\\.0\\.",)`` for the first block.
        text_tokens (`str`, defaults to `"must_do"`):
            Joint attention (HunyuanVideo: the sequence is video tokens, then text
            tokens): ``"must_do"`` never skips tiles that touch text tokens, as
            the prompt conditions every video token; ``"skippable"`` treats them
            like video tokens.
        must_do (sequence of `(start, end)`, defaults to `()`):
            Extra token ranges (end exclusive) never skipped in any patched layer,
            e.g. the first latent frame of an image-to-video model. Ranges past a
            layer's sequence length are clipped.
        profile (`bool`, defaults to `False`):
            Time every attention call and transformer forward (CUDA events on a
            GPU, ``time.perf_counter`` on a CPU) for :meth:`summary`. Off by
            default: events are cheap, but reading them syncs the device.
        cuda_graph (`bool`, defaults to `False`):
            On a CUDA device under ``torch.no_grad()`` / ``inference_mode()``,
            capture each transformer forward in a CUDA graph (one per CFG context
            and kind of step) and replay it, so a step costs one launch instead
            of the host time of every module and attention call; the skip states
            stay exactly as without graphs (see :mod:`liteattn.integrations.graphs`).
            Attention calls inside a replayed forward are not timed (``profile``
            times whole forwards then).
    """

    threshold: float | tuple[float, ...] = -10.0
    dense_steps: int = 0
    block_size: tuple[int, int] | None = None
    backend: str = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    text_tokens: str = "must_do"
    must_do: tuple[tuple[int, int], ...] = ()
    profile: bool = False
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        # Frozen: the fields are normalised (lists to tuples, checked) once, here.
        object.__setattr__(self, "threshold", V.validate_threshold_schedule(self.threshold))
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps: expected an int >= 0 (steps run dense first), got {self.dense_steps!r}")
        object.__setattr__(self, "block_size", V.validate_block_size(self.block_size))
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {self.backend!r}")
        object.__setattr__(self, "include", None if self.include is None else _patterns("include", self.include))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        if self.text_tokens not in TEXT_TOKEN_MODES:
            raise ValueError(f"text_tokens: expected one of {TEXT_TOKEN_MODES}, got {self.text_tokens!r}")
        object.__setattr__(self, "must_do", _ranges(self.must_do))
        if not isinstance(self.profile, bool):
            raise ValueError(f"profile: expected True or False, got {self.profile!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph: expected True or False, got {self.cuda_graph!r}")

    def threshold_at(self, step: int) -> float:
        """The threshold of denoising step ``step`` (the schedule's last value repeats)."""
        schedule = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        return schedule[min(step, len(schedule) - 1)]

    def is_dense_step(self, step: int) -> bool:
        """Whether step ``step`` runs the model's own dense attention."""
        return step < self.dense_steps

    @property
    def never_marks(self) -> bool:
        """Whether no step can mark a tile (threshold -inf at every step): the configuration is dense attention."""
        schedule = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        return all(t == -math.inf for t in schedule)


def _patterns(name: str, patterns) -> tuple[str, ...]:
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{name}: expected regular expressions (str), got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({err})") from None
    return patterns


def _ranges(ranges: Sequence) -> tuple[tuple[int, int], ...]:
    out = []
    for item in ranges:
        try:
            start, end = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"must_do: expected (start, end) token ranges, got {item!r}") from None
        if not 0 <= start < end:
            raise ValueError(f"must_do: range ({start}, {end}) must satisfy 0 <= start < end")
        out.append((start, end))
    return tuple(sorted(out))


def describe_threshold(config: LiteAttentionConfig) -> str:
    """Short text of the threshold (schedule), for the summary header."""
    def fmt(t: float) -> str:
        return "-inf" if t == -math.inf else f"{t:g}"

    if isinstance(config.threshold, tuple):
        return "[" + ", ".join(fmt(t) for t in config.threshold) + "]"
    return fmt(config.threshold)
