"""liteattn inside a real, tiny diffusers ``WanPipeline`` (offline: no tokenizer or text encoder).

The other integration tests drive transformers with loops that copy the pipelines'
calling pattern; this one runs ``WanPipeline.__call__`` itself, CFG and step
indices included, so a change in how the pipeline calls the model shows here.
"""
from __future__ import annotations

import pytest
import torch

import liteattn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # WanPipeline's module imports it

THRESHOLD = -1.0
SHARP = 20.0  # peaky attention in a random model, so that tiles become negligible


def _pipeline(sharp: float):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.endswith("attn1"):
                module.norm_q.weight.mul_(sharp)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 16, 32, generator=gen)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=-embeds, height=96, width=96, num_frames=9,
                num_inference_steps=4, guidance_scale=5.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).frames


def test_wan_pipeline_matches_stock_and_skips():
    pipe = _pipeline(SHARP)
    stock = _generate(pipe)

    handle = liteattn.apply(pipe, threshold=-1e30, block_size=(16, 16), backend="torch")
    no_skip = _generate(pipe)
    liteattn.remove(pipe)
    torch.testing.assert_close(no_skip, stock, rtol=0, atol=1e-5)

    handle = liteattn.apply(pipe, threshold=THRESHOLD, block_size=(16, 16), backend="torch")
    first = _generate(pipe)
    per_step = handle.summary().per_step()
    second = _generate(pipe)
    again = handle.summary().per_step()
    liteattn.remove(pipe)

    assert per_step[0]["sparsity"] == 0.0 and per_step[3]["sparsity"] > 0.0, per_step
    assert again == per_step  # the second generation started from fresh states
    assert torch.equal(second, first)
    assert torch.equal(_generate(pipe), stock)  # removed: the stock pipeline again
