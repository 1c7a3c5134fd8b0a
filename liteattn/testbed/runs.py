"""One timed generation of the testbed, dense or with liteattn, measured the same way for both.

Why one function for both: a speed-up is only honest when the two runs go
through the same code. The dense run is liteattn's own patch with every step
dense (``dense_steps = steps``): the model's own attention backend runs, and
the patch's hooks, CUDA graphs and timers are the same as in the liteattn run.

What is measured on a GPU, and how:

- wall time of one generation, after warm-up generations that compile every
  kernel and capture every CUDA graph (with ``cuda_graph``, a step is then
  one graph launch per CFG branch, so the host's Python no longer hides the
  GPU's time);
- GPU time of the attention kernels and of all kernels, from
  ``torch.profiler`` over one more, eager generation (kernel durations do not
  depend on how they were launched).

On a CPU everything is synchronous: the patch's ``timing`` timers give the
attention time directly, and there is no warm-up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["Generation", "generate", "warmup_steps", "ATTENTION_KERNELS"]

# Kernel names that are attention: liteattn's kernels and the SDPA backends' (cuDNN, FlashAttention, efficient).
ATTENTION_KERNELS = ("lite_attention", "flash", "fmha", "cudnn", "sdpa", "attention", "efficient_attention")


@dataclass
class Generation:
    """A generated batch and how it went."""

    video: torch.Tensor  # (B, 3, F, H, W) float32 on the CPU
    wall_s: float
    attention_s: float | None  # GPU kernel time (GPU) or timed calls (CPU) of attention; None when not measured
    kernels_s: float | None  # GPU time of every kernel (GPU only)
    summary: object  # the patch's Summary of the timed generation
    masks: dict = field(default_factory=dict)  # layer -> (H, QT, KT) bool skip mask after the last step
    tiles: tuple[int, int] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_seconds(fn) -> tuple[float, float]:
    """(attention kernels, all kernels) GPU seconds of ``fn()``, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    attention = total = 0.0
    for event in prof.key_averages():
        name = event.key
        if name.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            continue
        us = getattr(event, "device_time_total", None)
        us = event.cuda_time_total if us is None else us
        total += us
        if any(tag in name.lower() for tag in ATTENTION_KERNELS):
            attention += us
    return attention / 1e6, total / 1e6


def warmup_steps(config, steps: int) -> int:
    """Steps of one warm-up generation: every kind of step at least twice before timing (graphs are captured at a
    kind's second sighting), i.e. the dense steps, and the skipping steps of each of a profile's step ranges."""
    starts = config.profile.range_starts if config.profile is not None else ()
    return min(steps, max((config.first_skipping_step, *starts)) + 5)


def generate(testbed, prompts: torch.Tensor, seeds: list[int], *, frames: int, size: int, steps: int,
             guidance: float, threshold: float | None, dense_steps: int, block_size=None, cuda_graph: bool = True,
             warmup: int = 2, kernel_times: bool = True, mask_layers: tuple[int, ...] = (),
             show_progress: bool = False, desc: str = "sampling", profile=None,
             qk_dtype: str | None = None, pv_dtype: str | None = None) -> Generation:
    """Generate ``prompts`` with per-prompt ``seeds``; ``threshold=None`` runs every step dense.

    ``profile``: a calibration profile (a path or a :class:`liteattn.calibration.Profile`) instead of
    ``threshold`` and ``dense_steps``: per-layer thresholds and its own dense first steps. ``qk_dtype``: liteattn's
    8-bit Q.K^T in the skipping steps, and ``pv_dtype`` its fp8 P.V (:func:`liteattn.lite_attention`).

    ``warmup`` generations (GPU only) come first, running 5 steps past the first
    skipping step (with a profile, past its last step range's start): enough to
    see every kind of step twice, so that every CUDA graph is captured before
    the timed run. ``mask_layers``: block indices whose skip
    masks (``"cond"`` context) are returned.
    """
    from ..integrations import apply, remove
    from .sampler import sample_video

    device = testbed.device
    on_gpu = device.type == "cuda"
    sparse = threshold is not None or profile is not None
    if profile is not None:
        if threshold is not None:
            raise ValueError("threshold: expected None with a profile (the profile sets the thresholds), got "
                             f"{threshold!r}")
        options = dict(profile=profile, block_size=block_size, qk_dtype=qk_dtype, pv_dtype=pv_dtype)
    else:
        options = dict(threshold=threshold if sparse else -10.0, dense_steps=dense_steps if sparse else steps,
                       block_size=block_size, qk_dtype=qk_dtype, pv_dtype=pv_dtype)
    sample = dict(prompts=prompts, frames=frames, size=size, guidance=guidance, seed=list(seeds))
    transformer = testbed.transformer
    handle = apply(transformer, timing=not on_gpu, cuda_graph=cuda_graph and on_gpu, **options)
    try:
        if on_gpu:
            for _ in range(warmup):
                sample_video(testbed, steps=warmup_steps(handle.config, steps), show_progress=False, **sample)
        _sync(device)
        start = time.perf_counter()
        video = sample_video(testbed, steps=steps, show_progress=show_progress, desc=desc, **sample)
        _sync(device)
        wall = time.perf_counter() - start
        summary = handle.summary()
        masks, tiles = {}, None
        for index in mask_layers:
            state = handle.attention(f"blocks.{index}.attn1", "cond").state
            if sparse and state is not None:
                masks[f"blocks.{index}.attn1"] = state.to_dense()[0].cpu()
                tiles = (state.block_m, state.block_n)
    finally:
        remove(transformer)
    attention_s = kernels_s = None
    if on_gpu and kernel_times:
        handle = apply(transformer, **options)  # eager: the profiler sees every kernel
        try:
            attention_s, kernels_s = _kernel_seconds(
                lambda: sample_video(testbed, steps=steps, show_progress=False, **sample))
        finally:
            remove(transformer)
    elif not on_gpu:
        attention_s = (summary.attention_ms or 0.0) / 1e3
    return Generation(video.cpu(), wall, attention_s, kernels_s, summary, masks, tiles)
