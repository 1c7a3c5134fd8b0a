"""Tiny randomly initialised diffusers video transformers, and loops that call them as the pipelines do.

Why loops and not the pipelines: diffusers' video pipelines need ``transformers``
(their text encoders and tokenizers), which the test environment does not
install. What the integration sees is the calling pattern, and the loops copy
it from diffusers 0.42:

- Wan: separate ``"cond"`` / ``"uncond"`` forwards per step inside
  ``cache_context(name, step_index=i, ...)``.
- LTX-Video: one batched ``[uncond, cond]`` forward per step inside
  ``cache_context("cond_uncond")``, no step index.
- HunyuanVideo: separate ``"cond"`` / ``"uncond"`` forwards, no step index,
  text padding mask.

Like a pipeline, a loop ends with ``_reset_stateful_cache()``
(``maybe_free_model_hooks``) unless told not to.

Random weights give nearly flat attention; ``sharpen`` scales the query
RMS-norm weights of the self-attention layers so that some key tiles become
negligible and liteattn has something to skip.

Helpers are fixtures (not imports) so that other ``conftest.py`` files cannot
shadow them.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # before liteattn imports Triton: its CPU interpreter runs the kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:  # the diffusers tests skip themselves without it; the others must still collect
    import diffusers
except ImportError:  # pragma: no cover - depends on the environment
    diffusers = None

WAN_LATENT = (1, 16, 5, 8, 16)  # (B, C, F, H, W) -> 5 * 4 * 8 = 160 tokens: 10 tiles of 16
LTX_SHAPE = (3, 4, 8)  # frames, height, width -> 96 tokens
HUNYUAN_LATENT = (1, 4, 3, 4, 8)  # 96 video tokens
TEXT_LEN = 16
TILES = (16, 16)


def _finish(model, dtype, names: tuple[str, ...], sharpen: float):
    """Eval mode, in ``dtype`` (``double()``/``half()``: ``to(dtype)`` warns about float32 modules), sharpened."""
    cast = {torch.float32: lambda m: m, torch.float64: nn.Module.double, torch.float16: nn.Module.half}[dtype]
    model = cast(model).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(names) and getattr(module, "norm_q", None) is not None:
                module.norm_q.weight.mul_(sharpen)
    return model


def _wan(dtype=torch.float32, sharpen: float = 1.0, seed: int = 0, head_dim: int = 12):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return _finish(model, dtype, ("attn1",), sharpen)


def _ltx(dtype=torch.float32, sharpen: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    )
    return _finish(model, dtype, ("attn1",), sharpen)


def _hunyuan(dtype=torch.float32, sharpen: float = 1.0, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    )
    return _finish(model, dtype, ("transformer_blocks.0.attn",), sharpen)


def _timesteps(steps: int) -> torch.Tensor:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def _wan_generate(model, seed=0, steps=3, guidance=True, step_index=True, update=True, finish=True,
                  timesteps=None, latent=WAN_LATENT):
    """Wan's denoising loop; returns the final latents and the cond outputs of every step."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(latent, generator=gen).to(param)
    cond_text = torch.randn(1, TEXT_LEN, 32, generator=gen).to(param)
    uncond_text = torch.randn(1, TEXT_LEN, 32, generator=gen).to(param)
    timesteps = _timesteps(steps) if timesteps is None else timesteps
    cond_outputs = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            info = {"step_index": i, "num_inference_steps": len(timesteps)} if step_index else {}
            with model.cache_context("cond", **info):
                cond = model(hidden_states=x, timestep=t.expand(1).to(x.device), encoder_hidden_states=cond_text,
                             return_dict=False)[0]
            cond_outputs.append(cond)
            pred = cond
            if guidance:
                with model.cache_context("uncond", **info):
                    uncond = model(hidden_states=x, timestep=t.expand(1).to(x.device),
                                   encoder_hidden_states=uncond_text,
                                   return_dict=False)[0]
                pred = uncond + 5.0 * (cond - uncond)
            if update:
                x = x - 0.1 * pred
    if finish:
        model._reset_stateful_cache()
    return x, cond_outputs


def _ltx_generate(model, seed=0, steps=3, finish=True):
    """LTX's loop: one batched [uncond, cond] forward per step under "cond_uncond"."""
    frames, height, width = LTX_SHAPE
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames * height * width, 8, generator=gen).to(dtype)
    text = torch.randn(2, TEXT_LEN, 16, generator=gen).to(dtype)  # [uncond, cond]
    text_mask = torch.ones(2, TEXT_LEN, dtype=dtype)
    with torch.no_grad():
        for t in _timesteps(steps):
            with model.cache_context("cond_uncond"):
                pred = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=text, timestep=t.expand(2),
                             encoder_attention_mask=text_mask, num_frames=frames, height=height, width=width,
                             return_dict=False)[0]
            uncond, cond = pred.chunk(2)
            x = x - 0.1 * (uncond + 3.0 * (cond - uncond))
    if finish:
        model._reset_stateful_cache()
    return x


def _hunyuan_generate(model, seed=0, steps=2, text_lengths=(11,), finish=True):
    """HunyuanVideo's loop with true CFG; ``text_lengths`` are the unpadded prompt lengths per batch element."""
    dtype = next(model.parameters()).dtype
    batch = len(text_lengths)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + HUNYUAN_LATENT[1:], generator=gen).to(dtype)
    texts = [torch.randn(batch, TEXT_LEN, 16, generator=gen).to(dtype) for _ in range(2)]
    pooled = torch.randn(batch, 8, generator=gen).to(dtype)
    mask = (torch.arange(TEXT_LEN)[None] < torch.tensor(text_lengths)[:, None]).to(dtype)
    with torch.no_grad():
        for t in _timesteps(steps):
            preds = []
            for name, text in zip(("cond", "uncond"), texts):
                with model.cache_context(name):
                    preds.append(model(hidden_states=x, timestep=t.expand(batch), encoder_hidden_states=text,
                                       encoder_attention_mask=mask, pooled_projections=pooled,
                                       guidance=torch.full((batch,), 6000.0, dtype=dtype), return_dict=False)[0])
            cond, uncond = preds
            x = x - 0.1 * (uncond + 2.0 * (cond - uncond))
    if finish:
        model._reset_stateful_cache()
    return x


@pytest.fixture(scope="session")
def tiny():
    """Builders of the tiny transformers: ``tiny.wan(dtype=..., sharpen=...)``, ``tiny.ltx``, ``tiny.hunyuan``."""
    class Tiny:
        wan, ltx, hunyuan = staticmethod(_wan), staticmethod(_ltx), staticmethod(_hunyuan)

    return Tiny


@pytest.fixture(scope="session")
def loops():
    """The pipeline-like loops: ``loops.wan``, ``loops.ltx``, ``loops.hunyuan``."""
    class Loops:
        wan, ltx, hunyuan = staticmethod(_wan_generate), staticmethod(_ltx_generate), staticmethod(_hunyuan_generate)
        timesteps = staticmethod(_timesteps)

    return Loops


@pytest.fixture(scope="session")
def tiles():
    return TILES


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the Triton kernel runs: the GPU if there is one, else Triton's CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible per run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
