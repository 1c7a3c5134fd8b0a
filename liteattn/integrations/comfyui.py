"""liteattn in ComfyUI: everything the LiteAttention node decides, without importing ComfyUI.

Why this split: ComfyUI is not a dependency of liteattn (nor could its code be
part of it), and a node is a thin layer over what ComfyUI hands an attention
override: tensors and the ``transformer_options`` dict. So the routing, the
step, the CFG branch, the block and the reset rule live here and are tested
without ComfyUI; the node (the ``comfyui_liteattn`` folder users drop into
``custom_nodes/``) only installs these objects on a cloned ``ModelPatcher``.

How a Wan attention call reaches liteattn (ComfyUI v0.3.64 and newer):

1. ComfyUI's ``wrap_attn`` calls ``transformer_options["optimized_attention_override"](func, q, k, v,
   heads=..., transformer_options=...)`` for every attention of the model,
   with q/k/v as ``(B, S, H*D)``; ``func`` is ComfyUI's own attention.
2. Each Wan block gets a :class:`BlockIndexPatch` as its ``("dit",
   ("double_block", i))`` replace patch, which hands the block a copy of
   ``transformer_options`` carrying the block's index (newer ComfyUI versions
   pass ``block_index`` themselves; v0.3.64 passes nothing).
3. :class:`LiteAttentionOverride` sends the self-attention of a known block
   through liteattn, with one :class:`~liteattn.LiteAttention` per (block, CFG
   branch, conditioning entry); cross-attention and every call it cannot
   compute exactly go to the override that was installed before it, or to
   ComfyUI's own attention.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Sequence

import torch

from ..attention import LiteAttention
from . import timing
from .config import LiteAttentionConfig, describe_threshold
from .layer import CallRecord, count_fallback, input_fallback_reason
from .report import AttentionCall, Summary

__all__ = ["BLOCK_KEY", "NEVER_SKIP", "BlockIndexPatch", "Chunk", "GenerationTracker", "LiteAttentionOverride",
           "PV_DTYPE_CHOICES", "QK_DTYPE_CHOICES", "block_of", "check_calibration_profile", "pv_dtype_from_input",
           "qk_dtype_from_input", "split_chunks",
           "step_from_sigmas", "threshold_from_input"]

# The key under which a BlockIndexPatch passes its block's index down to the attention calls of that block.
BLOCK_KEY = "liteattn_block"
# Set in a block's transformer_options once its self-attention ran: Wan runs self-attention first in a block, and a
# later call shaped like it (cross-attention over as many text tokens as there are video tokens) is not it.
SELF_ATTENTION_DONE_KEY = "liteattn_self_attention_done"
# The node's threshold widget holds finite numbers only (ComfyUI stores workflows as JSON, which has no -inf):
# its minimum stands for liteattn's -inf, "never mark a tile". 2**-100 of the row max is far below anything a
# tile could contribute in bf16/fp16/fp32 accumulation, so no finite setting near it would differ in practice.
NEVER_SKIP = -100.0
# The node's score-precision choices (a ComfyUI combo holds strings) and the qk_dtype each stands for.
QK_DTYPE_CHOICES = MappingProxyType({"16-bit": None, "int8": "int8"})
# Its P.V-precision choices and the pv_dtype each stands for.
PV_DTYPE_CHOICES = MappingProxyType({"16-bit": None, "fp8": "fp8"})
# ComfyUI's cond_or_uncond entries: the index of the conditioning list in the guider, 0 positive, 1 negative.
BRANCH_NAMES = {0: "cond", 1: "uncond"}
# Relative tolerance for finding the current sigma in the schedule (the one ComfyUI's context windows use).
SIGMA_RTOL = 1e-4


def threshold_from_input(value) -> float:
    """The node's threshold widget value as a liteattn threshold.

    Negative log2 units, as in :func:`liteattn.lite_attention`; values at or
    below :data:`NEVER_SKIP` (and ``-inf``) become ``-inf``: nothing is
    marked, and the model runs its own attention (the same output as without
    the node).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value >= 0:
        raise ValueError(f"threshold: expected a negative number in log2 units (e.g. -10.0; {NEVER_SKIP:g} or "
                         f"lower never skips), got {value!r}")
    return -math.inf if value <= NEVER_SKIP else float(value)


def _choice(argument: str, choices, value):
    """A combo input's value as the setting it stands for. A workflow saved with another value names it in the
    error instead of running with a setting it did not choose."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument}: expected one of {list(choices)}, got {value!r}")
    return choices[value]


def qk_dtype_from_input(value) -> str | None:
    """The node's score-precision choice as a ``qk_dtype``: ``"16-bit"`` (scores from q and k as they are) or
    ``"int8"`` (8-bit Q·Kᵀ, :func:`liteattn.lite_attention`)."""
    return _choice("qk_dtype", QK_DTYPE_CHOICES, value)


def pv_dtype_from_input(value) -> str | None:
    """The node's P.V-precision choice as a ``pv_dtype``: ``"16-bit"`` or ``"fp8"`` (P and V rounded to float8
    e4m3, with int8 scores; :func:`liteattn.lite_attention`)."""
    return _choice("pv_dtype", PV_DTYPE_CHOICES, value)


def check_calibration_profile(path) -> None:
    """Validate the node's calibration-profile input; an empty one means none.

    A profile (:mod:`liteattn.profile`) binds its thresholds to a diffusers
    transformer: its class, configuration hash and layer names. ComfyUI loads
    the same weights into its own model classes, whose blocks the node cannot
    yet match to a profile's layers, so a valid profile is refused with
    ``NotImplementedError`` rather than ignored or applied to the wrong
    layers: a workflow never runs with settings it did not ask for.
    """
    if path is None or (isinstance(path, str) and not path.strip()):
        return
    if not isinstance(path, (str, Path)):
        raise ValueError(f"calibration_profile: expected the path of a profile file or an empty string, got {path!r}")
    if not Path(path).expanduser().is_file():
        raise ValueError(f"calibration_profile: expected the path of an existing file (or nothing), got {str(path)!r}")
    from ..profile import Profile

    try:
        profile = Profile.load(Path(path).expanduser())
    except ValueError as err:
        raise ValueError(f"calibration_profile: {str(err).removeprefix('profile: ')}") from None
    raise NotImplementedError(
        f"calibration_profile: {profile.name!r} was calibrated on diffusers' "
        f"{', '.join(sorted(b.class_name for b in profile.models.values()))}, whose layers this node cannot match to "
        "ComfyUI's model yet; use it with liteattn.apply on the diffusers pipeline, or leave the input empty "
        "(threshold and dense_steps then apply to every block)")


def step_from_sigmas(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """The denoising step of a model call at noise level ``sigma``, counted in ``sample_sigmas``.

    Why from the sigmas: ComfyUI passes a model call its noise level and the
    sampler's schedule, no step index. The schedule is what the sampler runs:
    KSamplerAdvanced passes its slice, so steps count from that slice's start
    (each Wan 2.2 expert counts from 0).

    ``sigma`` found in the schedule (relative tolerance 1e-4): its first
    index. Otherwise, for a solver's evaluation between two levels (Heun,
    DPM++ 2S, ...): the step whose interval holds it, i.e. the last level above
    ``sigma`` (0 above the first level).
    """
    levels = [float(s) for s in sample_sigmas]
    if not levels:
        raise ValueError("sample_sigmas: expected a non-empty schedule of noise levels, got an empty one")
    sigma = float(sigma)
    if math.isnan(sigma):
        raise ValueError(f"sigma: expected a noise level, got {sigma}")
    for index, level in enumerate(levels):
        if math.isclose(level, sigma, rel_tol=SIGMA_RTOL):
            return index
    return max((index for index, level in enumerate(levels[:-1]) if level > sigma), default=0)


def block_of(transformer_options: dict) -> int | None:
    """The index of the block running this attention call, None outside a known block.

    :class:`BlockIndexPatch`'s key first (it is set only inside a block it
    patched), then ComfyUI's own ``block_index`` (newer versions).
    """
    block = transformer_options.get(BLOCK_KEY, transformer_options.get("block_index"))
    return block if isinstance(block, int) and not isinstance(block, bool) else None


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of a batched model call, from one conditioning entry.

    ``key`` identifies the entry's skip states: its branch, the uuid ComfyUI
    drew for it (fresh for every sampling run) and, under context windows, the
    window's frames.
    """

    branch: str
    start: int
    stop: int
    uuid: object = None
    window: tuple | None = None

    @property
    def key(self) -> tuple:
        return self.branch, self.uuid, self.window


def split_chunks(batch: int, cond_or_uncond: Sequence[int] | None, uuids: Sequence | None = None,
                 window: Sequence[int] | None = None) -> list[Chunk]:
    """The conditioning entries of a model call of ``batch`` rows, in row order.

    Why split: ComfyUI batches the positive and negative passes of CFG into one
    call when memory allows (``cond_or_uncond == [1, 0]``, equal row counts)
    and runs them separately when it does not, and may change its mind between
    steps. A skip state per entry is valid either way. ``cond_or_uncond``
    None or empty (a call outside a sampler): one entry, branch ``"default"``.
    ``uuids`` are used when there is one per entry.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    window = tuple(window) if window is not None else None
    if not cond_or_uncond:
        return [Chunk("default", 0, batch, None, window)]
    entries = len(cond_or_uncond)
    if batch % entries:
        raise ValueError(f"cond_or_uncond: expected a divisor of the batch ({batch} rows), got {entries} entries")
    if uuids is None or len(uuids) != entries:
        uuids = [None] * entries
    rows = batch // entries
    return [Chunk(BRANCH_NAMES.get(index, f"branch{index}"), i * rows, (i + 1) * rows, uuid, window)
            for i, (index, uuid) in enumerate(zip(cond_or_uncond, uuids))]


class GenerationTracker:
    """When the skip states of a patched model start over.

    A skip set predicts the next step of the same generation only. States are
    keyed by the uuid of their conditioning entry, which ComfyUI draws afresh
    for every sampling run, so a new run never meets an old state; what is
    left is to know when to drop the old ones and to catch a generation that
    starts over without new uuids. A new generation starts:

    - at the first call,
    - after :meth:`start` (the node calls it when ComfyUI starts a sampling run),
    - when the step goes down: the sigmas restarted (a restart sampler, or a
      caller that reuses its conditioning).

    The step never goes down within one generation, whatever the CFG batching:
    the passes of one step share it, and a solver's extra evaluations only
    move forward.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._last_step: int | None = None
        self._pending = True

    def start(self) -> None:
        """The next call starts a new generation."""
        self._pending = True

    def observe(self, step: int) -> bool:
        """Record a call at ``step``; True when it starts a new generation."""
        new = self._pending or (self._last_step is not None and step < self._last_step)
        if new:
            self.generation += 1
            self._pending = False
        self._last_step = step
        return new


class BlockIndexPatch:
    """The ``("dit", ("double_block", i))`` replace patch that tells block ``i``'s attention calls who they are.

    Wan's blocks receive ``transformer_options`` from the patch's ``args``; this
    passes a copy holding :data:`BLOCK_KEY` = ``index``, so the dict shared by
    the whole forward is never changed. A replace patch installed before this
    one (``previous``) still runs, with the copy; without one, the original block.
    """

    def __init__(self, index: int, previous: Callable | None = None):
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index: expected a block index (int >= 0), got {index!r}")
        if previous is not None and not callable(previous):
            raise ValueError(f"previous: expected a replace patch (callable) or None, got {type(previous).__name__}")
        self.index = index
        self.previous = previous

    def __call__(self, args: dict, extra: dict):
        options = args.get("transformer_options")
        if isinstance(options, dict):
            args = dict(args, transformer_options=dict(options, **{BLOCK_KEY: self.index}))
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __repr__(self) -> str:
        return f"BlockIndexPatch({self.index}, previous={self.previous!r})"


@dataclass
class _Slot:
    """The skip state and call records of one (block, conditioning entry) in the current generation."""

    block: int
    label: str
    attention: LiteAttention
    records: list[CallRecord]


# ComfyUI's attention functions: attention_xxx(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
# skip_output_reshape=False, **kwargs). The override receives the same arguments, positional or not.
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


class LiteAttentionOverride:
    """ComfyUI's ``optimized_attention_override`` for a Wan model: self-attention through liteattn.

    Called as ``override(func, q, k, v, heads=..., transformer_options=..., ...)``
    for every attention of the model. A self-attention call (q, k, v of one
    shape) inside a block known from :func:`block_of` runs through liteattn,
    split into its conditioning entries (:func:`split_chunks`), one
    :class:`~liteattn.LiteAttention` per (block, entry), at the step given by
    :func:`step_from_sigmas`. Steps before ``config.dense_steps``, and every
    step of a configuration that never marks (threshold -inf throughout), run
    the model's own attention, bit for bit. Everything else (cross-attention, masks, other
    layouts, a dtype or head_dim liteattn cannot compute, calls outside a
    sampler) goes to ``previous`` (the override installed before this one) or,
    without one, to ComfyUI's ``func``: nothing the model or another patch
    does is lost. Such calls, except cross-attention, are counted in
    :meth:`summary`'s fallbacks.

    Args:
        config: threshold (or per-step schedule), dense_steps, block_size,
            backend and timing; its other fields (layer selection, text
            tokens, must-do ranges, CUDA graphs, a calibration profile, the
            skip rule) are diffusers' and do not apply.
        previous: the override to chain, or None.
    """

    def __init__(self, config: LiteAttentionConfig | None = None, previous: Callable | None = None):
        if config is None:
            config = LiteAttentionConfig()
        if not isinstance(config, LiteAttentionConfig):
            raise ValueError(f"config: expected a LiteAttentionConfig or None, got {type(config).__name__}")
        if previous is not None and not callable(previous):
            raise ValueError(f"previous: expected an attention override (callable) or None, "
                             f"got {type(previous).__name__}")
        self.config = config
        self.previous = previous
        self.generations = GenerationTracker()
        self.fallbacks: Counter = Counter()
        self._slots: dict[tuple, _Slot] = {}
        self._labels: dict[tuple, str] = {}
        self._sigmas = self._schedule = None  # the tensors the cached step was read from
        self._levels: list[float] = []
        self._step: int | None = None

    def __deepcopy__(self, memo) -> "LiteAttentionOverride":
        # ComfyUI deep-copies model_options on every ModelPatcher.clone(), but copies callbacks by reference:
        # the clones of a patched model share this override, so the callbacks reach the override that runs.
        return self

    # -- lifecycle (the node wires these to ComfyUI's sampling callbacks) ----------
    def new_generation(self) -> None:
        """A new generation starts: fresh skip states, records and fallback counts."""
        self._slots, self._labels = {}, {}
        self.fallbacks.clear()
        self.generations.start()

    def release(self) -> None:
        """Free the skip states (device memory) once sampling is over; the records stay for :meth:`summary`."""
        for slot in self._slots.values():
            _ = slot.attention.history  # turns the sparsities into floats before their state goes
            slot.attention.state = None

    # -- the attention call ------------------------------------------------------------
    def __call__(self, func: Callable, *args, **kwargs):
        call = dict(zip(_POSITIONAL, args), **kwargs)
        options = kwargs.get("transformer_options")
        options = options if isinstance(options, dict) else {}
        q, k, v = call.get("q"), call.get("k"), call.get("v")
        if not all(isinstance(x, torch.Tensor) for x in (q, k, v)) or not q.shape == k.shape == v.shape:
            return self._dense(func, args, kwargs)  # cross-attention (or not attention over tensors): not ours
        block = block_of(options)
        if block is not None:
            if options.get(SELF_ATTENTION_DONE_KEY) == block:
                return self._dense(func, args, kwargs)  # the block's self-attention ran: this is cross-attention
            options[SELF_ATTENTION_DONE_KEY] = block
        reason = self._unsupported(call, q, block)
        step = None
        if reason is None:
            step = self._step_of(options)
            reason = "no_sample_sigmas" if step is None else None
        if reason is None:
            try:
                chunks = split_chunks(q.shape[0], options.get("cond_or_uncond"), options.get("uuids"),
                                      getattr(options.get("context_window"), "index_list", None))
            except ValueError:
                chunks, reason = None, "batch_split"
        if reason is not None:
            count_fallback(self.fallbacks, "a ComfyUI Wan model", reason)
            return self._dense(func, args, kwargs)
        if self.generations.observe(step):
            self._slots, self._labels = {}, {}
        slots = [self._slot(block, chunk) for chunk in chunks]
        if self.config.is_dense_step(step) or self.config.never_marks:
            timer = timing.start(q.device) if self.config.timing else None
            out = self._dense(func, args, kwargs)
            timer = timing.stop(timer) if timer is not None else None
            for slot in slots:  # one timer for the batch, reported on its first entry
                slot.records.append(CallRecord(step, "dense_step", None, timer if slot is slots[0] else None))
            return out
        return self._sparse(q, k, v, call["heads"], step, chunks, slots)

    def _dense(self, func: Callable, args: tuple, kwargs: dict):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _unsupported(self, call: dict, q: torch.Tensor, block: int | None) -> str | None:
        """Why this self-attention call must run the model's own attention, or None."""
        if block is None:
            return "outside_block"
        if call.get("mask") is not None:
            return "mask"
        if call.get("skip_reshape") or call.get("skip_output_reshape") or q.dim() != 3:
            return "layout"
        heads = call.get("heads")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or q.shape[-1] % heads:
            return "heads"
        return input_fallback_reason(self.config.backend, q.unflatten(-1, (heads, -1)), self.config.qk_dtype,
                                     self.config.pv_dtype)

    def _step_of(self, options: dict) -> int | None:
        """The step of this call, read once per model forward.

        Every attention call of a forward carries the same ``sigmas`` tensor, so
        its value (one device sync) is read when a new one arrives.
        """
        sigmas, schedule = options.get("sigmas"), options.get("sample_sigmas")
        if sigmas is None or schedule is None:
            return None
        if schedule is not self._schedule:
            self._schedule, self._sigmas = schedule, None
            self._levels = schedule.flatten().tolist() if isinstance(schedule, torch.Tensor) else list(schedule)
        if sigmas is not self._sigmas:
            sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else float(max(sigmas))
            self._sigmas, self._step = sigmas, step_from_sigmas(sigma, self._levels)
        return self._step

    def _slot(self, block: int, chunk: Chunk) -> _Slot:
        slot = self._slots.get((block, chunk.key))
        if slot is None:
            attention = LiteAttention(self.config.threshold_at(0), block_size=self.config.block_size,
                                      backend=self.config.backend, qk_dtype=self.config.qk_dtype,
                                      pv_dtype=self.config.pv_dtype)
            slot = self._slots[(block, chunk.key)] = _Slot(block, self._label(chunk), attention, [])
        return slot

    def _label(self, chunk: Chunk) -> str:
        """``"cond"``, ``"uncond"``; ``"cond#2"`` for a branch's second conditioning entry; ``"@0-15"`` for a window."""
        entry = (chunk.branch, chunk.uuid)
        if entry not in self._labels:
            ordinal = sum(branch == chunk.branch for branch, _ in self._labels) + 1
            self._labels[entry] = chunk.branch if ordinal == 1 else f"{chunk.branch}#{ordinal}"
        label = self._labels[entry]
        return label if chunk.window is None else f"{label}@{chunk.window[0]}-{chunk.window[-1]}"

    def _sparse(self, q, k, v, heads: int, step: int, chunks: list[Chunk], slots: list[_Slot]) -> torch.Tensor:
        threshold = self.config.threshold_at(step)
        outs = []
        for chunk, slot in zip(chunks, slots):
            rows = slice(chunk.start, chunk.stop)
            timer = timing.start(q.device) if self.config.timing else None
            attention = slot.attention
            attention.set_threshold(threshold)
            out = attention(*(x[rows].unflatten(-1, (heads, -1)) for x in (q, k, v)))
            if timer is not None:
                timer = timing.stop(timer)
            slot.records.append(CallRecord(step, "sparse", attention.step - 1, timer))
            outs.append(out.flatten(-2))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # -- what happened -----------------------------------------------------------------
    def summary(self) -> Summary:
        """Sparsity per block and per step of the latest generation (times with ``config.timing``).

        Blocks are named ``blocks.<i>`` and contexts by CFG branch (``"cond"``,
        ``"uncond"``), as in :func:`liteattn.integrations.summary`.
        """
        calls = []
        for slot in self._slots.values():
            history = slot.attention.history
            for r in slot.records:
                sparsity = history[r.history_index] if r.history_index is not None else 0.0
                calls.append(AttentionCall("model", slot.label, f"blocks.{slot.block}", r.step, r.mode, sparsity,
                                           timing.elapsed_ms(r.timer)))
        blocks = len({slot.block for slot in self._slots.values()})
        tiles = "default" if self.config.block_size is None else "x".join(map(str, self.config.block_size))
        scores = "" if self.config.qk_dtype is None else f", scores {self.config.qk_dtype}"
        scores += "" if self.config.pv_dtype is None else f", P.V {self.config.pv_dtype}"
        header = (f"liteattn (ComfyUI): threshold {describe_threshold(self.config)}, dense_steps "
                  f"{self.config.dense_steps}, tiles {tiles}, backend {self.config.backend}{scores}, {blocks} blocks "
                  "seen")
        return Summary(calls, [], dict(self.fallbacks), header)

    def summary_line(self) -> str:
        """One line for ComfyUI's log: skipped tiles over the run, at the last step, and per step."""
        summary = self.summary()
        if not summary.calls:
            return "liteattn: no self-attention call went through liteattn in the last run"
        per_step = summary.per_step()
        last = per_step[max(per_step)]["sparsity"]
        steps = " ".join(f"{100 * row['sparsity']:.0f}" for row in per_step.values())
        line = (f"liteattn: skipped {summary.sparsity:.1%} of tiles over the run, {last:.1%} at the last step; "
                f"per step (%): {steps}")
        if summary.fallbacks:
            line += "; dense fallbacks: " + ", ".join(f"{k}={n}" for k, n in sorted(summary.fallbacks.items()))
        return line

    def __repr__(self) -> str:
        return (f"LiteAttentionOverride(threshold={describe_threshold(self.config)}, "
                f"dense_steps={self.config.dense_steps}, previous={self.previous!r})")
