"""The configuration of a model patch: one frozen dataclass, checked once.

Why frozen and separate from the per-layer state: the same config object is
shared by every patched layer of every transformer of a pipeline, may be reused
for the next model, and must never change under a running generation.
``apply`` never mutates it; overrides produce a new one
(:func:`dataclasses.replace`).
"""
from __future__ import annotations

import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

from .. import _validation as V

__all__ = ["LiteAttentionConfig"]

TEXT_TOKEN_MODES = ("must_do", "skippable")
# "carry": liteattn's rule, a marked tile is never computed again in the generation. "per_call": the serving
# stacks' skip-softmax (BLASST): every tile's QK is computed at every call, and a tile found negligible skips only
# its exponentials and P.V in that call; nothing is carried to the next one.
SKIP_RULES = ("carry", "per_call")
DEFAULT_THRESHOLD = -10.0


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
        profile (`str`, `os.PathLike` or :class:`liteattn.calibration.Profile`, *optional*):
            A calibration profile (``liteattn calibrate``): a threshold per layer
            and per step range, and the number of dense first steps, chosen for
            this model. It is loaded and checked once, here; :func:`apply` refuses
            it for another model, and the first attention call for a token count
            its rule does not cover. ``threshold`` and ``dense_steps`` must then
            keep their defaults: the profile sets both. ``True`` / ``False`` (this
            field's meaning before calibration existed) still mean ``timing``,
            with a ``DeprecationWarning``.
        timing (`bool`, defaults to `False`):
            Time every attention call and transformer forward (CUDA events on a
            GPU, ``time.perf_counter`` on a CPU) for :meth:`summary`. Off by
            default: events are cheap, but reading them syncs the device.
        cuda_graph (`bool`, defaults to `False`):
            On a CUDA device under ``torch.no_grad()`` / ``inference_mode()``,
            capture each transformer forward in a CUDA graph (one per CFG context
            and kind of step) and replay it, so a step costs one launch instead
            of the host time of every module and attention call; the skip states
            stay exactly as without graphs (see :mod:`liteattn.integrations.graphs`).
            Attention calls inside a replayed forward are not timed (``timing``
            times whole forwards then).
        skip_rule (`str`, defaults to `"carry"`):
            ``"carry"``: liteattn's temporal rule, a tile found negligible is never
            computed again in the generation. ``"per_call"``: the serving stacks'
            skip-softmax (NVIDIA's BLASST), for comparison: each call computes every
            tile's QK, skips the exponentials and P.V of the tiles negligible in
            that call, and carries nothing (:func:`liteattn.skip_softmax_attention`:
            the kernel's skip-softmax mode on a GPU, the PyTorch reference
            elsewhere; query tiles of at most 64 rows decide together). Not with CUDA graphs:
            each call's skipped fraction is recorded from the call itself.
        qk_dtype (`str`, *optional*):
            ``"int8"``: attention scores from q and k rounded to int8 (k smoothed, one scale per tile;
            :func:`liteattn.lite_attention`), as accurate as 16 bits, faster on large head_dim-128 models
            (docs/api.md); ``"fp8"`` with ``backend="torch"`` only.
            Default None: scores from q and k as they are.
        pv_dtype (`str`, *optional*):
            ``"fp8"``: P.V from P and V rounded to float8 e4m3 (:func:`liteattn.lite_attention`), with
            ``qk_dtype="int8"``; on a GPU the Hopper kernel only. Faster again where calls run at the GPU's power
            limit (docs/benchmarks.md). Default None: P.V in 16 bits.
    """

    threshold: float | tuple[float, ...] = -10.0
    dense_steps: int = 0
    block_size: tuple[int, int] | None = None
    backend: str = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    text_tokens: str = "must_do"
    must_do: tuple[tuple[int, int], ...] = ()
    profile: object = None
    timing: bool = False
    cuda_graph: bool = False
    skip_rule: str = "carry"
    qk_dtype: str | None = None
    pv_dtype: str | None = None

    def __post_init__(self) -> None:
        # Frozen: the fields are normalised (lists to tuples, checked) once, here.
        if isinstance(self.profile, bool):
            warnings.warn("LiteAttentionConfig: profile=True/False is deprecated: per-call timing is the field "
                          "`timing` now (timing=True), and `profile` takes a calibration profile (a path or a "
                          "liteattn.calibration.Profile)", DeprecationWarning, stacklevel=_caller_stacklevel())
            object.__setattr__(self, "timing", self.timing or self.profile)
            object.__setattr__(self, "profile", None)
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
        if not isinstance(self.timing, bool):
            raise ValueError(f"timing: expected True or False, got {self.timing!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph: expected True or False, got {self.cuda_graph!r}")
        if self.skip_rule not in SKIP_RULES:
            raise ValueError(f"skip_rule: expected one of {SKIP_RULES}, got {self.skip_rule!r}")
        if self.skip_rule == "per_call" and self.cuda_graph:
            raise ValueError("cuda_graph: expected False with skip_rule='per_call' (its per-call skipped fractions "
                             "are recorded from each call, which a replayed graph does not make), got True")
        V.validate_qk_dtype(self.qk_dtype, self.backend, 64)  # the name; the head_dim is checked at each call
        if self.qk_dtype == "fp8" and self.backend != "torch":
            raise ValueError(f"qk_dtype='fp8' runs in the PyTorch reference only: expected backend='torch' with it, "
                             f"got backend={self.backend!r}; the kernels take qk_dtype='int8'")
        if self.qk_dtype is not None and self.skip_rule == "per_call":
            raise ValueError(f"qk_dtype: expected None with skip_rule='per_call' (skip-softmax computes Q.K^T in 16 "
                             f"bits), got {self.qk_dtype!r}")
        V.validate_pv_dtype(self.pv_dtype, self.qk_dtype, self.backend, 64)  # head_dim checked at each call
        if self.profile is not None:
            self._resolve_profile()

    def _resolve_profile(self) -> None:
        """Load and check the calibration profile once (the format lives in liteattn.profile, so the integrations never import the calibration package)."""
        from ..profile import as_profile

        profile = as_profile(self.profile)  # ValueError naming `profile` for a bad path or file
        if self.threshold != DEFAULT_THRESHOLD or self.dense_steps != 0:
            raise ValueError("profile: a calibration profile sets every layer's thresholds and the dense first steps; "
                             f"expected threshold and dense_steps left unset, got threshold={self.threshold!r}, "
                             f"dense_steps={self.dense_steps!r}")
        if profile.skip_rule != self.skip_rule:
            raise ValueError(f"skip_rule: the profile was calibrated for skip_rule={profile.skip_rule!r}; expected "
                             f"that, got {self.skip_rule!r}")
        object.__setattr__(self, "profile", profile)

    def threshold_at(self, step: int) -> float:
        """The global threshold of denoising step ``step`` (the schedule's last value repeats); without a profile,
        every layer's."""
        schedule = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        return schedule[min(step, len(schedule) - 1)]

    def layer_thresholds(self, layer: str, tokens: int) -> tuple[tuple[int, float], ...] | None:
        """``((first_step, threshold), ...)`` of ``layer`` (``"blocks.0.attn1"``, or ``"transformer_2:..."``) for a
        sequence of ``tokens`` tokens under the profile, or None without one (then :meth:`threshold_at` applies).

        Resolved once per layer and token count by the caller; a ``ValueError`` names what the profile does not
        cover (a layer it does not know, a token count its rule refuses)."""
        return None if self.profile is None else self.profile.layer_schedule(layer, tokens)

    @property
    def first_skipping_step(self) -> int:
        """The first step that may skip: the profile's dense steps, else ``dense_steps``."""
        return self.profile.dense_steps if self.profile is not None else self.dense_steps

    def is_dense_step(self, step: int) -> bool:
        """Whether step ``step`` runs the model's own dense attention."""
        return step < self.first_skipping_step

    def step_kind(self, step: int):
        """What decides every layer's threshold at ``step`` (a CUDA graph's key): the profile's step range, else the
        global threshold."""
        return ("range", self.profile.range_index(step)) if self.profile is not None else self.threshold_at(step)

    @property
    def never_marks(self) -> bool:
        """Whether no step can mark a tile (threshold -inf at every step): the configuration is dense attention."""
        if self.profile is not None:
            return self.profile.never_marks
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


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside liteattn and dataclasses (the user's
    call), however many of liteattn's frames (``apply``, ``dataclasses.replace``) lie between."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename in ("<string>", getattr(sys.modules.get("dataclasses"),
                                                                                       "__file__", None))):
        frame, level = frame.f_back, level + 1
    return level


def describe_threshold(config: LiteAttentionConfig) -> str:
    """Short text of the threshold (schedule), for the summary header."""
    def fmt(t: float) -> str:
        return "-inf" if t == -math.inf else f"{t:g}"

    if config.profile is not None:
        return f"per layer from profile {config.profile.name!r}"
    if isinstance(config.threshold, tuple):
        return "[" + ", ".join(fmt(t) for t in config.threshold) + "]"
    return fmt(config.threshold)
