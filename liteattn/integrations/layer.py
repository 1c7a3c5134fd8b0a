"""One patched attention layer: its skip states per CFG context and its calls.

Why one :class:`~liteattn.LiteAttention` per (layer, context): the skip set
of a layer at step t predicts that layer's negligible tiles at step t+1 *for
the same conditioning*. The conditional and unconditional passes of
classifier-free guidance (separate transformer calls in Wan and HunyuanVideo)
see different prompts, so they keep separate states. Batched CFG (LTX: one
call, batch = [uncond, cond]) needs nothing more, as the state is per batch
element already.

Why thresholds are looked up per layer: a calibration profile
(:mod:`liteattn.calibration`) gives each layer its own threshold per step
range, resolved once per layer and token count (:meth:`LayerRuntime.threshold_at`).

Why a call may fall back to dense: liteattn takes no attention mask, dropout
or causal flag, and its GPU kernel takes bf16/fp16 with head_dim a multiple of
16. A call it cannot compute exactly runs the layer's original backend and is
counted by reason, so a mask is never silently dropped and a model in another
dtype still runs.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import _validation as V
from ..attention import LiteAttention, skip_softmax_attention
from ..kernels import SUPPORTED_HEAD_DIMS, TRITON_AVAILABLE, default_block_sizes
from ..state import merge_ranges
from . import timing
from .config import LiteAttentionConfig

__all__ = ["CallRecord", "ContextState", "ForwardInfo", "KeyPaddingMasks", "LayerRuntime", "LoggedCall",
           "count_fallback", "input_fallback_reason", "key_prefix_length", "per_call_attention"]

# An additive mask entry at or below this removes the key exactly: e^-1000
# underflows to 0 in every float format, so dropping the key changes nothing.
MASKED_BIAS = -1000.0


@dataclass(frozen=True)
class ForwardInfo:
    """Where a transformer forward stands, published to its layers for its duration."""

    context: str
    step: int
    generation: int


@dataclass
class CallRecord:
    """One attention call of a layer: ``mode`` is "sparse", "dense_step" or "fallback"."""

    step: int
    mode: str
    history_index: int | None = None  # into the LiteAttention's history, for sparse calls
    timer: object = None
    sparsity: object = None  # the skipped fraction of a per-call (skip-softmax) call, which keeps no history


@dataclass(frozen=True)
class LoggedCall:
    """One attention call made while a CUDA graph was captured: what replaying the graph must redo in Python.

    ``fresh``: a sparse call that started from full lists, refilling ``before``, the state of the last generation
    (else ``before`` is the state it read); ``after``: the state it wrote (the buffers the graph reads and writes);
    ``sparsity``: the device tensor the call appended to the layer's history (rewritten by each replay).
    """

    runtime: "LayerRuntime"
    context: str
    mode: str
    reason: str | None
    fresh: bool
    before: object
    after: object
    sparsity: torch.Tensor | None
    threshold: float | None = None  # the threshold the captured call used (a replay's key fixes it)


@dataclass
class ContextState:
    """A layer's skip state and call records in one context, for one generation.

    ``generation`` None means the state was prepared (seeded) before any call:
    it is adopted by the next generation instead of being reset.
    """

    attention: LiteAttention
    generation: int | None
    records: list[CallRecord] = field(default_factory=list)


def key_prefix_length(mask, seq_len_k: int) -> int | None:
    """The number of valid keys when ``mask`` only hides a tail of keys, else None.

    Accepted: bool masks (True = attend) and additive float masks (0 = attend,
    ``<= MASKED_BIAS`` or -inf = hidden), shaped ``(B, S_k)`` or
    ``(B or 1, H or 1, S_q or 1, S_k)``, that hide the same key suffix for
    every batch element, head and query row (HunyuanVideo's text padding).
    Attention with such a mask equals attention over the first L keys. One
    device sync.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4) or mask.shape[-1] != seq_len_k:
        return None
    if mask.dtype == torch.bool:
        valid, clean = mask, torch.ones((), dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        valid = mask == 0
        clean = (valid | (mask <= MASKED_BIAS)).all()
    else:
        return None
    valid = valid[:, None, None, :] if valid.dim() == 2 else valid
    per_key = valid.any(dim=2, keepdim=True).any(dim=1, keepdim=True)  # [B, 1, 1, S_k]
    lengths = per_key.sum(-1).flatten()  # [B]
    prefix = torch.arange(seq_len_k, device=mask.device) < lengths[:, None, None, None]
    ok = clean & (valid == per_key).all() & (per_key == prefix).all() & (lengths == lengths[0]).all()
    ok, length = torch.stack([ok.long(), lengths[0].long()]).tolist()
    return length if ok and length > 0 else None


class KeyPaddingMasks:
    """:func:`key_prefix_length`, read once per mask tensor.

    Every layer of one forward receives the same mask object, so its length
    is computed (and the device synced) once per forward, not once per layer.
    """

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, int | None] | None = None

    def key_length(self, mask, seq_len_k: int) -> int | None:
        if mask is None:
            return seq_len_k
        if self._last is None or self._last[0] is not mask:
            self._last = (mask, key_prefix_length(mask, seq_len_k))
        return self._last[1]

    def clear(self) -> None:
        """Forget the last mask (called when a forward ends, to release it)."""
        self._last = None


def input_fallback_reason(backend: str, query: torch.Tensor, qk_dtype: str | None = None,
                          pv_dtype: str | None = None) -> str | None:
    """Why liteattn cannot compute attention on ``query``'s dtype or head_dim under ``backend`` (and
    ``qk_dtype``, ``pv_dtype``), or None.

    The GPU kernel takes bf16/fp16 and head_dim a multiple of 16 up to 256, with 8-bit QK from 32 and fp8 P.V
    at 64 and 128; the PyTorch path also takes fp32/fp64. ``"dtype"``, ``"head_dim"``, ``"head_dim for 8-bit
    QK"`` or ``"head_dim for fp8 P.V"``: the call runs the model's own attention instead of failing.
    """
    if V.validate_backend(backend, query.device, TRITON_AVAILABLE) == "triton":
        if query.dtype not in V.KERNEL_DTYPES:
            return "dtype"
        if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
            return "head_dim"
        if qk_dtype is not None and query.shape[-1] < 32:  # the int8 products run 32 channels deep
            return "head_dim for 8-bit QK"
        if pv_dtype is not None and query.shape[-1] not in (64, 128):  # the Hopper kernel's head_dims
            return "head_dim for fp8 P.V"
    elif query.dtype not in V.REFERENCE_DTYPES:
        return "dtype"
    return None


def count_fallback(fallbacks: Counter, where: str, reason: str) -> None:
    """Count a dense fallback of ``where`` by ``reason``; warn the first time a reason occurs.

    Once per reason, so a model whose every layer falls back says so once and
    the summary carries the count.
    """
    if not fallbacks[reason]:
        warnings.warn(f"liteattn: an attention call of {where} ran dense ({reason}); such calls are counted in "
                      "summary().fallbacks", stacklevel=2)
    fallbacks[reason] += 1


def per_call_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, threshold: float,
                       scale: float | None, must_do: list[tuple[int, int]],
                       block_size: tuple[int, int] | None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Skip-softmax attention on BSHD tensors: ``(out, skipped fraction)``, nothing carried.

    Every tile's QK is computed; a tile negligible by liteattn's rule in this call skips its exponentials and P.V
    (:func:`liteattn.skip_softmax_attention`: the kernel on a GPU, the reference elsewhere). Its tiles are
    ``block_size``'s with query tiles of at most 64 rows (one consumer of the Hopper kernel decides on its own). The
    fraction is of P.V tiles skipped, a device tensor (no sync); QK costs what dense attention's does.
    """
    block_m, block_n = block_size or default_block_sizes(query.shape[-1])
    out, used = skip_softmax_attention(query, key, value, threshold=threshold, scale=scale, must_do=must_do,
                                       block_size=(min(block_m, 64), block_n), backend=backend)
    key_tiles = -(-key.shape[1] // block_n)
    return out, 1.0 - used.sum(dtype=torch.int64) / float(used.numel() * key_tiles)


class LayerRuntime:
    """The liteattn side of one patched attention module.

    The module's hook calls :meth:`enter` / :meth:`exit` around its forward;
    the dispatcher backend calls :meth:`attend` in between.

    Args:
        name: the module's name in the transformer.
        config: the patch's configuration.
        text_position: where the text tokens of joint attention sit ("end"), or None.
        dense_fn: the module's original attention, ``dense_fn(q, k, v, attn_mask=..., dropout_p=...,
            is_causal=..., scale=..., enable_gqa=..., parallel_config=...)``.
        masks: the transformer's shared :class:`KeyPaddingMasks`.
        fallbacks: the transformer's counter of dense fallbacks by reason.
        profile_key: the layer's name in a calibration profile (``"transformer_2:blocks.0.attn1"`` for a pipeline's
            second transformer); default ``name``.

    ``steer``, None unless a tool sets it on this instance, is called before each skipping call as
    ``steer(runtime, info, attention, q, k, v, scale, must_do, threshold)`` (BSHD tensors, the keys already cut to
    their valid length) and returns the threshold the call uses: calibration chooses thresholds from the call's own
    inputs with it (the marginal rule), and measurements read the inputs.
    """

    def __init__(self, name: str, config: LiteAttentionConfig, text_position: str | None,
                 dense_fn: Callable, masks: KeyPaddingMasks, fallbacks: Counter, profile_key: str | None = None):
        self.name = name
        self.profile_key = name if profile_key is None else profile_key
        self.config = config
        self.text_position = text_position
        self.dense_fn = dense_fn
        self.masks = masks
        self.fallbacks = fallbacks
        self.contexts: dict[str, ContextState] = {}
        self._forward: ForwardInfo | None = None
        self.log: list[LoggedCall] | None = None  # set while a CUDA graph of the forward is captured
        self._text_len: int | None = None
        self._calls = 0
        self.steer: Callable | None = None
        self._schedules: dict[int, tuple[tuple[int, float], ...] | None] = {}  # by token count

    # -- lifecycle of one module forward ---------------------------------------------
    def enter(self, forward: ForwardInfo | None, text_len: int | None) -> None:
        self._forward, self._text_len, self._calls = forward, text_len, 0

    def exit(self) -> None:
        self._forward, self._text_len = None, None

    def state(self, context: str, generation: int | None = None) -> ContextState:
        """This layer's state in ``context``, reset when a new generation starts."""
        state = self.contexts.get(context)
        if state is None:
            attention = LiteAttention(self.config.threshold_at(0), block_size=self.config.block_size,
                                      backend=self.config.backend, qk_dtype=self.config.qk_dtype,
                                      pv_dtype=self.config.pv_dtype)
            state = self.contexts[context] = ContextState(attention, generation)
        elif generation is not None and state.generation != generation:
            if state.generation is not None:
                state.attention.reset()
                state.records = []
            state.generation = generation
        return state

    def threshold_at(self, step: int, tokens: int) -> float:
        """This layer's threshold at ``step`` for a sequence of ``tokens`` tokens: the profile's (resolved once per
        token count), else the configuration's global one."""
        if tokens not in self._schedules:
            self._schedules[tokens] = self.config.layer_thresholds(self.profile_key, tokens)
        schedule = self._schedules[tokens]
        if schedule is None:
            return self.config.threshold_at(step)
        return schedule[self.config.profile.range_index(step)][1]

    # -- the attention call ------------------------------------------------------------
    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, parallel_config=None) -> torch.Tensor:
        """Attention for the dispatcher: BSHD in, BSHD out."""
        forward = self._forward
        self._calls += 1
        key_len, reason = self._check(query, key, attn_mask, dropout_p, is_causal, parallel_config)
        state = self.state(forward.context, forward.generation) if forward is not None else None
        mode = "fallback" if reason else "dense_step" if self._runs_stock(state, forward.step) else "sparse"
        timer = timing.start(query.device) if self.config.timing and self.log is None else None  # no event in a capture
        history_index = per_call_sparsity = threshold = None
        fresh = mode == "sparse" and state.attention.state is None
        before = (state.attention._spent if fresh else state.attention.state) if mode == "sparse" else None
        if mode == "sparse" and parallel_config is not None:  # diffusers' context parallelism: one call, many parts
            from .parallel import attend as attend_parallel

            out, threshold, per_call_sparsity = attend_parallel(self, forward, query, key, value, scale, enable_gqa,
                                                                parallel_config)
        elif mode == "sparse":
            attention = state.attention
            key, value = key[:, :key_len], value[:, :key_len]
            must_do = self._must_do(query.shape[1], key_len)
            threshold = self.threshold_at(forward.step, query.shape[1])
            if self.steer is not None:
                threshold = self.steer(self, forward, attention, query, key, value, scale, must_do, threshold)
            if self.config.skip_rule == "per_call":
                out, per_call_sparsity = per_call_attention(query, key, value, threshold, scale, must_do,
                                                            self.config.block_size, self.config.backend)
            else:
                attention.set_threshold(threshold)
                out = attention(query, key, value, scale=scale, must_do=must_do)
                history_index = attention.step - 1
        else:
            if reason:
                count_fallback(self.fallbacks, self.name, reason)
            out = self.dense_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa, parallel_config=parallel_config)
        if timer is not None:
            timer = timing.stop(timer)
        if state is not None:
            state.records.append(CallRecord(forward.step, mode, history_index, timer, per_call_sparsity))
        if self.log is not None:  # a CUDA graph is being captured: it must redo this call's bookkeeping
            self.log.append(LoggedCall(self, forward.context, mode, reason, fresh, before,
                                       state.attention.state if mode == "sparse" else None,
                                       state.attention._history[-1] if mode == "sparse" else None, threshold))
        return out

    def _runs_stock(self, state: ContextState, step: int) -> bool:
        """A configured dense step, or a step that cannot differ from dense attention: a configuration that never
        marks (threshold -inf at every step) while this context holds no skip state (none seeded, none carried).
        Both run the model's own attention, the same bits as ``remove()`` gives, where liteattn's walk over every
        tile would differ from it by rounding (~1e-7). A schedule that marks at some step runs its -inf steps
        through liteattn (``dense_steps`` gives stock steps first), so within a configuration a step's route
        does not change from one generation to the next, as CUDA graphs captured per kind of step assume."""
        if self.config.is_dense_step(step):
            return True
        return self.config.never_marks and state.attention.state is None

    def _check(self, query, key, attn_mask, dropout_p, is_causal, parallel_config) -> tuple[int | None, str | None]:
        """``(valid key length, None)``, or ``(None, reason)`` when the call must run dense."""
        if self._forward is None:
            return None, "outside_forward"
        if self._calls > 1:
            return None, "repeated_call"
        if parallel_config is not None:
            from .parallel import fallback_reason  # only diffusers passes a parallel_config: it is installed

            reason = fallback_reason(self, parallel_config, attn_mask)
            if reason:
                return None, reason
        if dropout_p:
            return None, "dropout"
        if is_causal:
            return None, "causal"
        if query.shape[1] != key.shape[1]:
            return None, "cross_attention"
        reason = input_fallback_reason(self.config.backend, query, self.config.qk_dtype, self.config.pv_dtype)
        if reason:
            return None, reason
        key_len = self.masks.key_length(attn_mask, key.shape[1])
        return (key_len, None) if key_len is not None else (None, "mask")

    def _must_do(self, seq_len_q: int, key_len: int) -> list[tuple[int, int]]:
        ranges = [(start, min(end, key_len)) for start, end in self.config.must_do if start < key_len]
        if self.text_position == "end" and self._text_len and self.config.text_tokens == "must_do":
            start = seq_len_q - self._text_len
            if start < key_len:
                ranges.append((start, key_len))
        return merge_ranges(ranges)
