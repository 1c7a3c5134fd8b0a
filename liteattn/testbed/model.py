"""The testbed: a small Wan transformer trained on the procedural shape videos.

Why diffusers' own ``WanTransformer3DModel`` and not a look-alike: liteattn's
diffusers integration patches that class's attention, so the testbed exercises
exactly the code path a real Wan 2.1 / 2.2 checkpoint would. The model works
in pixel space (no VAE): 3 input channels, patches of ``(1, 2, 2)`` pixels, so a
16-frame 32x32 video is 16 * 16 * 16 = 4096 tokens, attention dominates the
cost, and a 128-token tile is half a frame.

Text conditioning is replaced by a :class:`PromptEncoder`: one learned vector
per prompt token (shape kind, colour, texture) plus one per slot, fed to the
transformer as ``encoder_hidden_states``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import MAX_SHAPES, VOCAB_SIZE

__all__ = ["PromptEncoder", "Testbed", "TRANSFORMER_CONFIG", "WEIGHTS_DIR", "build_testbed", "load_testbed",
           "save_testbed"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "testbed.safetensors"
CONFIG_FILE = "config.json"

TRANSFORMER_CONFIG = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 128,
    "freq_dim": 256,
    "ffn_dim": 1024,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 256,
}
# The default generation size (the GPU demo's): 32 frames of 64x64 pixels = 32,768 tokens, the token count of
# Wan2.1-1.3B at 480p. The same weights also generate 32x32 frames (the CPU demo's size): see train.py.
VIDEO_CONFIG = {"size": 64, "frames": 32, "channels": 3}


class PromptEncoder(nn.Module):
    """Prompt tokens ``(B, MAX_SHAPES)`` -> ``encoder_hidden_states (B, MAX_SHAPES, dim)``."""

    def __init__(self, dim: int, vocab_size: int = VOCAB_SIZE, slots: int = MAX_SHAPES):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.slot = nn.Parameter(torch.randn(slots, dim) * 0.02)
        nn.init.normal_(self.token.weight, std=0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.slot.shape[0]:
            raise ValueError(f"tokens: expected (B, {self.slot.shape[0]}) prompt tokens, got {tuple(tokens.shape)}")
        return self.token(tokens) + self.slot


@dataclass
class Testbed:
    """The transformer, its prompt encoder and the video geometry they were trained for."""

    transformer: nn.Module
    prompt_encoder: PromptEncoder
    video: dict = field(default_factory=lambda: dict(VIDEO_CONFIG))
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (some small modules stay float32, see :meth:`to`)."""
        return self.transformer.patch_embedding.weight.dtype

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states`` for prompt tokens, in the transformer's dtype and device."""
        return self.prompt_encoder(tokens.to(self.device)).to(self.dtype)

    def null_prompt(self, batch: int) -> torch.Tensor:
        """The unconditional prompt (all slots empty) for classifier-free guidance."""
        return torch.zeros(batch, self.prompt_encoder.slot.shape[0], dtype=torch.long)

    def tokens_per_video(self, frames: int, size: int | None = None) -> int:
        """Sequence length the transformer sees for a video of this many frames."""
        pt, ph, pw = self.transformer.config.patch_size
        size = size or self.video["size"]
        return (frames // pt) * (size // ph) * (size // pw)

    def to(self, device=None, dtype=None) -> "Testbed":
        """Move to ``device``; cast to ``dtype`` as ``from_pretrained`` would.

        Like diffusers' loader, the modules Wan lists in ``_keep_in_fp32_modules``
        (rotary table, time embedding, modulation tables, norms) stay float32:
        they are cheap and their precision matters.
        """
        nn.Module.to(self.transformer, device=device, dtype=dtype)
        if dtype is not None and dtype != torch.float32:
            keep = getattr(self.transformer, "_keep_in_fp32_modules", None) or []
            for name, module in self.transformer.named_modules():
                if any(part in keep for part in name.split(".")):
                    module.float()
            for name, param in self.transformer.named_parameters():
                if any(part in keep for part in name.split(".")):
                    param.data = param.data.float()
        self.prompt_encoder.to(device=device)
        return self


def build_testbed(transformer_config: dict | None = None, video: dict | None = None) -> Testbed:
    """A freshly initialised testbed (for training)."""
    from diffusers import WanTransformer3DModel

    config = dict(TRANSFORMER_CONFIG, **(transformer_config or {}))
    config["patch_size"] = tuple(config["patch_size"])
    transformer = WanTransformer3DModel(**config)
    nn.init.zeros_(transformer.proj_out.weight)  # start by predicting zero velocity: a stable first step
    nn.init.zeros_(transformer.proj_out.bias)
    return Testbed(transformer, PromptEncoder(config["text_dim"]), dict(VIDEO_CONFIG, **(video or {})))


def save_testbed(testbed: Testbed, directory: str | Path, info: dict | None = None) -> Path:
    """Write ``testbed.safetensors`` (fp16) and ``config.json`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v for k, v in testbed.transformer.state_dict().items()}
    tensors.update({f"prompt_encoder.{k}": v for k, v in testbed.prompt_encoder.state_dict().items()})
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()},
              str(directory / WEIGHTS_FILE))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in testbed.transformer.config.items()
              if k in TRANSFORMER_CONFIG or k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")}
    meta = {"transformer": config, "video": testbed.video, "vocab_size": testbed.prompt_encoder.token.num_embeddings,
            "info": dict(testbed.info, **(info or {}))}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _resize_slots(slot: torch.Tensor, slots: int) -> torch.Tensor:
    """Slot vectors for ``slots`` slots from a model trained with another count (to continue training).

    New slots start as copies of the last trained one plus a little noise, so a
    prompt that fills them means "one more shape" from the first step on.
    """
    if slots <= slot.shape[0]:
        return slot[:slots].clone()
    extra = slot[-1:].expand(slots - slot.shape[0], -1)
    noise = torch.randn(extra.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    return torch.cat([slot, extra + noise])


def load_testbed(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 path: str | Path | None = None, slots: int | None = None) -> Testbed:
    """Load the shipped testbed (or the one saved in ``path``) in inference mode.

    The weights are stored as fp16; ``dtype`` is what the transformer computes
    in (float32 on a CPU, bfloat16 or float16 on a GPU). The prompt encoder
    stays float32: it is a table lookup. ``slots`` resizes the prompt encoder
    to that many shape slots (only to continue training a model saved with
    another count; default: the saved count).
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    directory = Path(path) if path is not None else WEIGHTS_DIR
    if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
        raise ValueError(f"path: expected a folder holding {WEIGHTS_FILE} and {CONFIG_FILE}, got {directory}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float32, float16 or bfloat16, got {dtype}")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    config = dict(meta["transformer"], patch_size=tuple(meta["transformer"]["patch_size"]))
    transformer = WanTransformer3DModel(**config)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    slots = tensors["prompt_encoder.slot"].shape[0] if slots is None else slots
    encoder = PromptEncoder(config["text_dim"], vocab_size=meta["vocab_size"], slots=slots)
    for prefix, module in (("transformer.", transformer), ("prompt_encoder.", encoder)):
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        if prefix == "prompt_encoder." and state["slot"].shape[0] != slots:
            state["slot"] = _resize_slots(state["slot"], slots)
        module.load_state_dict(state, strict=True)
    testbed = Testbed(transformer.eval().requires_grad_(False), encoder.eval().requires_grad_(False),
                      meta["video"], meta.get("info", {}))
    return testbed.to(device=torch.device(device), dtype=dtype)
