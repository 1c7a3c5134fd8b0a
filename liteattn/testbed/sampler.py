"""Euler sampler for the rectified-flow testbed, with classifier-free guidance.

The model was trained on ``x_t = (1 - t) x0 + t noise`` to predict the
velocity ``noise - x0``, so generation integrates ``dx/dt = v`` from pure
noise at ``t = 1`` down to ``t = 0``. The transformer sees ``timestep = 1000 t``,
decreasing from 1000 towards 0, as Wan pipelines pass it.

Why separate conditional and unconditional calls, each inside
``transformer.cache_context("cond" / "uncond", step_index=i, ...)``: that is
how diffusers' Wan pipelines run guidance, and liteattn's integration keys its per-layer skip
state by that context, so the two branches keep separate skip sets. A batched
cond+uncond call would mix their attention patterns into one state.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch

__all__ = ["progress", "sample_video", "timesteps"]


def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0 (optionally shifted towards 1, as SD3/Wan do)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift: expected a positive float, got {shift!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


class _PlainProgress:
    """Fallback progress bar: one line per tenth of the work."""

    def __init__(self, iterable, total: int, desc: str):
        self.iterable, self.total, self.desc = iterable, total, desc

    def __iter__(self):
        start, shown = time.perf_counter(), -1
        for i, item in enumerate(self.iterable):
            yield item
            tenth = (10 * (i + 1)) // max(self.total, 1)
            if tenth != shown:
                shown = tenth
                print(f"{self.desc}: {i + 1}/{self.total} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)


def progress(iterable, total: int, desc: str, enabled: bool = True):
    """tqdm when it is installed, else a plain line-per-tenth counter; nothing when disabled."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _context(transformer, name: str, **where):
    cache_context = getattr(transformer, "cache_context", None)
    return cache_context(name, **where) if cache_context is not None else contextlib.nullcontext()


@torch.no_grad()
def sample_video(testbed, prompts: torch.Tensor, *, frames: int | None = None, size: int | None = None,
                 steps: int = 20, guidance: float = 4.0, seed: int | list[int] = 0, shift: float = 1.0,
                 show_progress: bool = True, desc: str = "sampling",
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Generate videos for ``prompts`` ``(B, MAX_SHAPES)``; returns float32 ``(B, 3, F, H, W)`` in [-1, 1].

    ``guidance <= 1`` skips the unconditional branch. The initial noise is drawn
    on the CPU from ``seed``, so a seed gives the same starting point on any
    device; ``seed`` may be one int per prompt, which makes each video
    independent of the others in the batch (a prompt and seed give the same
    video alone or batched). ``on_step(i)`` runs after each step (e.g. to read
    the skip state).
    """
    if guidance < 0:
        raise ValueError(f"guidance: expected a float >= 0, got {guidance!r}")
    transformer = testbed.transformer
    frames = frames or testbed.video["frames"]
    size = size or testbed.video["size"]
    batch = prompts.shape[0]
    dev, dtype = testbed.device, testbed.dtype
    shape = (testbed.video["channels"], frames, size, size)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed: expected one int or {batch} ints (one per prompt), got {len(seed)}")
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seed])
    else:
        noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(int(seed)))
    x = noise.to(dev)
    cond = testbed.encode(prompts)
    uncond = testbed.encode(testbed.null_prompt(batch)) if guidance > 1 else None
    levels = timesteps(steps, shift)
    for i in progress(range(steps), steps, desc, show_progress):
        t, t_next = float(levels[i]), float(levels[i + 1])
        timestep = torch.full((batch,), 1000.0 * t, device=dev)
        where = {"step_index": i, "sigma": t, "num_inference_steps": steps}  # as WanPipeline passes them
        with _context(transformer, "cond", **where):
            v = transformer(x.to(dtype), timestep, cond, return_dict=False)[0].float()
        if uncond is not None:
            with _context(transformer, "uncond", **where):
                v_uncond = transformer(x.to(dtype), timestep, uncond, return_dict=False)[0].float()
            v = v_uncond + guidance * (v - v_uncond)
        x = x + (t_next - t) * v
        if on_step is not None:
            on_step(i)
    return x.clamp(-1, 1).float()
