"""Integrations of liteattn into model libraries (diffusers video pipelines).

Why thin wrappers here: ``import liteattn`` must work without diffusers
installed, and importing diffusers costs seconds. The functions below import
the diffusers glue (:mod:`liteattn.integrations.diffusers`) on first call.
"""
from __future__ import annotations

from .config import LiteAttentionConfig

__all__ = ["LiteAttentionConfig", "apply", "new_generation", "remove", "summary"]


def apply(pipe_or_transformer, threshold=None, *, config: LiteAttentionConfig | None = None, **overrides):
    """Route a video pipeline's self-attention layers through liteattn.

    Every self-attention layer gets its own :class:`~liteattn.LiteAttention`,
    with a separate skip state per CFG context (the ``"cond"`` / ``"uncond"``
    transformer calls of Wan and HunyuanVideo); cross-attention is left as it
    is. Skip states start fresh whenever a generation starts (detected from the
    pipeline's step index or from the timestep going up; see
    :func:`new_generation`). Supported: Wan (``WanTransformer3DModel``, also
    Wan 2.2's ``transformer_2``), LTX-Video and HunyuanVideo (text tokens of its
    joint attention are never skipped; its text-padding mask is honoured); other
    dispatcher-based transformers with ``include=...``. Method: "LiteAttention:
    A Temporal Sparse Attention for Diffusion Transformers".

    Args:
        pipe_or_transformer: a diffusers pipeline (its ``transformer`` and
            ``transformer_2`` are patched) or a transformer module.
        threshold (`float` or sequence of `float`, *optional*):
            overrides ``config.threshold`` (default ``-10.0``; a sequence is a
            per-step schedule).
        config (:class:`LiteAttentionConfig`, *optional*): the settings; never modified.
        **overrides: any other :class:`LiteAttentionConfig` field, e.g.
            ``dense_steps=5``, ``block_size=(64, 64)``, ``timing=True``, or
            ``profile="profile.json"`` (a calibration profile from
            :func:`liteattn.calibrate`: per-layer thresholds and dense first steps,
            refused for another model).

    Returns:
        A handle with ``summary()``, ``remove()``, ``new_generation()`` and
        ``attention(layer, context)``.

    Raises:
        ValueError: liteattn is already applied, an argument is invalid, no
            layer matches, or the calibration profile was made for another model
            (the message names what differs).
        NotImplementedError: an unknown transformer family without ``include``,
            or a layer that calls SDPA directly (CogVideoX).

    Example::

        >>> pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-14B-Diffusers", torch_dtype=torch.bfloat16)
        >>> handle = liteattn.integrations.apply(pipe, threshold=-10.0, dense_steps=2, timing=True)
        >>> video = pipe(prompt, num_inference_steps=50).frames[0]
        >>> print(handle.summary())
        >>> liteattn.integrations.remove(pipe)
    """
    from .diffusers import apply as _apply

    return _apply(pipe_or_transformer, threshold, config=config, **overrides)


def remove(pipe_or_transformer) -> None:
    """Undo :func:`apply`: hooks removed, attention processors restored exactly.

    Warns (and does nothing) when liteattn is not applied.
    """
    from .diffusers import remove as _remove

    _remove(pipe_or_transformer)


def new_generation(pipe_or_transformer) -> None:
    """Start a new generation at the next forward of every context: fresh skip states.

    Pipelines need no call: the pipeline's step index (Wan), the timestep
    going up between calls, and the stateful-hook reset that diffusers
    pipelines run when they finish already start one. Call it when driving the
    transformer yourself with repeated timesteps.
    """
    from .diffusers import new_generation as _new_generation

    _new_generation(pipe_or_transformer)


def summary(pipe_or_transformer):
    """Sparsity per layer and per step of the latest generation (times with ``timing=True``).

    Returns a :class:`~liteattn.integrations.report.Summary`: ``print()`` it
    for tables, or use ``per_step()``, ``per_layer()``, ``calls`` and ``to_dict()``.
    """
    from .diffusers import summary as _summary

    return _summary(pipe_or_transformer)
