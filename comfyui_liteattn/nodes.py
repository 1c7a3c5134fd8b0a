"""The LiteAttention node: a Wan model whose self-attention skips tiles that stay negligible.

Why so little here: what the patched model computes (the step from the
sigmas, the CFG branch of each batch row, the block, when a generation starts,
which calls run through liteattn) is ``liteattn.integrations.comfyui``,
tested without ComfyUI. This file installs those objects on a clone of the
MODEL, as ComfyUI's own model patches do, so the input model is untouched:

- the attention override (``transformer_options["optimized_attention_override"]``),
  chaining the one already set, so it composes with other attention patches;
- one replace patch per Wan block, chaining any replace patch already there,
  which tells the override which block is running;
- two sampling callbacks: a new sampling run starts a new generation, and the
  end of the run frees the skip states and logs what was skipped.
"""
from __future__ import annotations

import logging

from liteattn.integrations.comfyui import (
    NEVER_SKIP, PV_DTYPE_CHOICES, QK_DTYPE_CHOICES, BlockIndexPatch, LiteAttentionOverride, check_calibration_profile,
    pv_dtype_from_input, qk_dtype_from_input, threshold_from_input,
)
from liteattn.integrations.config import LiteAttentionConfig

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "LiteAttention", "apply_lite_attention"]

OVERRIDE_KEY = "optimized_attention_override"
CALLBACK_KEY = "liteattn"
DEFAULT_THRESHOLD = -10.0
DEFAULT_DENSE_STEPS = 2


def apply_lite_attention(model, threshold: float = DEFAULT_THRESHOLD, dense_steps: int = DEFAULT_DENSE_STEPS,
                         calibration_profile: str = "", qk_dtype: str = "16-bit", pv_dtype: str = "16-bit"):
    """A clone of the ComfyUI MODEL ``model`` (a Wan 2.1 / 2.2 model) with liteattn's self-attention.

    Applying it to a model that already has it replaces the earlier settings
    (the override and block patches installed before the earlier node stay chained).
    """
    import comfy.patcher_extension
    from comfy.ldm.wan.model import WanModel

    check_calibration_profile(calibration_profile)
    config = LiteAttentionConfig(threshold=threshold_from_input(threshold), dense_steps=dense_steps,
                                 qk_dtype=qk_dtype_from_input(qk_dtype), pv_dtype=pv_dtype_from_input(pv_dtype))
    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, WanModel):
        raise ValueError(f"model: expected a Wan 2.1 / 2.2 model (ComfyUI's WanModel and its variants), got "
                         f"{type(diffusion_model).__name__}")
    patched = model.clone()
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for index in range(len(diffusion_model.blocks)):
        previous = replace.get(("double_block", index))
        if isinstance(previous, BlockIndexPatch):
            previous = previous.previous
        patched.set_model_patch_replace(BlockIndexPatch(index, previous), "dit", "double_block", index)
    options = patched.model_options["transformer_options"]  # set after the replace patches, which copy the dict
    previous = options.get(OVERRIDE_KEY)
    if isinstance(previous, LiteAttentionOverride):
        previous = previous.previous
    override = options[OVERRIDE_KEY] = LiteAttentionOverride(config, previous)

    def finish(_patcher) -> None:
        override.release()
        logging.info("%s", override.summary_line())

    callbacks = comfy.patcher_extension.CallbacksMP
    for call_type, callback in ((callbacks.ON_PRE_RUN, lambda _patcher: override.new_generation()),
                                (callbacks.ON_CLEANUP, finish)):
        patched.remove_callbacks_with_key(call_type, CALLBACK_KEY)
        patched.add_callback_with_key(call_type, CALLBACK_KEY, callback)
    return patched


class LiteAttention:
    """ComfyUI node (V1 API): MODEL in, MODEL with liteattn's self-attention out."""

    DESCRIPTION = (
        "Temporal sparse attention for Wan 2.1 / 2.2: while computing self-attention, marks key tiles whose "
        "weight is negligible and never computes them again in that generation, so every step is cheaper than "
        "the one before. Cross-attention runs as before. For Wan 2.2 A14B, put one node on each expert.")
    CATEGORY = "advanced/model"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Wan 2.1 / 2.2 model (text-to-video, image-to-video, ...)."}),
                "threshold": ("FLOAT", {
                    "default": DEFAULT_THRESHOLD, "min": NEVER_SKIP, "max": -0.1, "step": 0.1,
                    "tooltip": "How small a tile's weight must be to be skipped from then on, in log2 units below "
                               "the row's largest: -10 skips tiles under 2^-10 of it. Closer to 0 skips more and "
                               f"costs more quality. {NEVER_SKIP:g} never skips: the model's own attention, as "
                               "without this node."}),
                "dense_steps": ("INT", {
                    "default": DEFAULT_DENSE_STEPS, "min": 0, "max": 10000,
                    "tooltip": "The first denoising steps of each sampler run use the model's usual attention; "
                               "skipping starts after them. These steps lay out the video."}),
            },
            "optional": {
                "calibration_profile": ("STRING", {
                    "default": "",
                    "tooltip": "Path of a calibration profile file. Leave empty: profiles are made for diffusers "
                               "pipelines, and the node refuses them until it can match their layers."}),
                "qk_dtype": (list(QK_DTYPE_CHOICES), {
                    "default": "16-bit",
                    "tooltip": "Precision of the attention scores. int8 rounds q and k to 8 bits (as SageAttention "
                               "does): on an H200 it took 13-16 % less attention time at Wan 14B's size, with 99.9 % "
                               "of the skip decisions unchanged, but more at Wan 1.3B's once tiles are skipped."}),
                "pv_dtype": (list(PV_DTYPE_CHOICES), {
                    "default": "16-bit",
                    "tooltip": "Precision of the attention's P.V product, with int8 scores. fp8 rounds P and V to "
                               "8-bit floats (as SageAttention2 does), on Hopper GPUs only: on an H200 it took 4-10 % "
                               "less attention time than int8 alone at Wan 14B's size, dense or with half the tiles "
                               "skipped, but more than int8 alone at Wan 1.3B's once tiles are skipped."}),
            },
        }

    def patch(self, model, threshold, dense_steps, calibration_profile="", qk_dtype="16-bit", pv_dtype="16-bit"):
        return (apply_lite_attention(model, threshold, dense_steps, calibration_profile, qk_dtype, pv_dtype),)


NODE_CLASS_MAPPINGS = {"LiteAttention": LiteAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"LiteAttention": "LiteAttention (temporal sparse attention)"}
