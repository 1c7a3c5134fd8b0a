"""Look inside the testbed's self-attention: where does each head look?

Why: temporal sparsity only pays off when attention is concentrated, so the
training run records, for one layer, (a) how much attention mass each frame
sends to each other frame and (b) the full attention map of one query token.
A trained model shows mass near the diagonal (local in time) and small
spatial blobs (local in space) that differ from head to head; a random model
shows uniform smears.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["capture_attention", "plot_attention"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: interleaved (even, odd) channel pairs rotated by the position angle."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    c, s = cos[..., 0::2].float(), sin[..., 1::2].float()
    return torch.stack([even * c - odd * s, even * s + odd * c], -1).flatten(-2)


class _Recorder:
    """Attention processor wrapper that records statistics of the self-attention, then runs the original."""

    def __init__(self, inner, frames: int, query_index: int):
        self.inner, self.frames, self.query_index = inner, frames, query_index
        self.frame_mass = None  # (H, F, F)
        self.query_map = None  # (H, S)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k = q[0].float().transpose(0, 1), k[0].float().transpose(0, 1)  # (H, S, D)
        scale = q.shape[-1] ** -0.5
        heads, seq, _ = q.shape
        per_frame = seq // self.frames
        mass = torch.zeros(heads, self.frames, self.frames, device=q.device)
        for h in range(heads):  # one head at a time keeps memory at S*S floats
            probs = torch.softmax(q[h] @ k[h].T * scale, dim=-1)
            mass[h] = probs.view(self.frames, per_frame, self.frames, per_frame).sum(-1).mean(1)
        self.frame_mass = mass.cpu()
        scores = torch.einsum("hd,hsd->hs", q[:, self.query_index], k) * scale
        self.query_map = torch.softmax(scores, dim=-1).cpu()
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@torch.no_grad()
def capture_attention(testbed, video: torch.Tensor, prompts: torch.Tensor, layer: int, t: float = 0.5,
                      seed: int = 0) -> dict:
    """Run one denoising call on ``video`` noised to level ``t``; return layer ``layer``'s attention stats.

    Returns ``{"frame_mass": (H, F, F), "query_map": (H, F, h, w), "query": (frame, row, col), "layer", "t"}``
    for the first video of the batch; the query token is the centre of the middle frame.
    """
    blocks = testbed.transformer.blocks
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer: expected 0 <= layer < {len(blocks)}, got {layer}")
    _, _, frames, height, width = video.shape
    pt, ph, pw = testbed.transformer.config.patch_size
    grid = (frames // pt, height // ph, width // pw)
    query = (grid[0] // 2, grid[1] // 2, grid[2] // 2)
    query_index = (query[0] * grid[1] + query[1]) * grid[2] + query[2]
    attn = blocks[layer].attn1
    original = attn.processor
    recorder = _Recorder(original, grid[0], query_index)
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(seed)).to(video.device)
    x = ((1 - t) * video + t * noise)[:1].to(testbed.dtype)
    attn.set_processor(recorder)
    try:
        testbed.transformer(x, torch.full((1,), 1000.0 * t, device=x.device), testbed.encode(prompts[:1]),
                            return_dict=False)
    finally:
        attn.set_processor(original)
    return {"frame_mass": recorder.frame_mass, "query_map": recorder.query_map.view(-1, *grid),
            "query": query, "layer": layer, "t": t}


def plot_attention(stats: dict, path: str | Path) -> Path:
    """One row per head: frame-to-frame attention mass, then the query token's map over every frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass, qmap = stats["frame_mass"], stats["query_map"]
    heads, frames = qmap.shape[0], qmap.shape[1]
    fig, axes = plt.subplots(heads, 2, figsize=(2.2 + 0.9 * frames, 2.0 * heads),
                             gridspec_kw={"width_ratios": [1, frames / 2.2]}, squeeze=False)
    qf, qr, qc = stats["query"]
    for h in range(heads):
        ax = axes[h, 0]
        ax.imshow(mass[h].numpy(), cmap="magma", vmin=0)
        ax.set_title(f"head {h}: frame -> frame mass", fontsize=8)
        ax.set_xlabel("key frame", fontsize=7)
        ax.set_ylabel("query frame", fontsize=7)
        ax.tick_params(labelsize=6)
        strip = torch.cat([torch.nn.functional.pad(qmap[h, f], (0, 1), value=float("nan")) for f in range(frames)], 1)
        ax = axes[h, 1]
        ax.imshow(strip.numpy() ** 0.5, cmap="viridis")  # sqrt: show the tail as well as the peak
        ax.plot([qf * (qmap.shape[3] + 1) + qc], [qr], "r+", markersize=6)
        ax.set_title(f"head {h}: one token's attention (red +) over frames 0..{frames - 1}, sqrt scale",
                     fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(f"self-attention of layer {stats['layer']} at t = {stats['t']:.2f}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
