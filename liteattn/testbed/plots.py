"""Figures of the demo: sparsity per denoising step and skip masks (matplotlib, imported lazily)."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_rows", "plot_skip_masks", "plot_sparsity"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sparsity(per_step: dict[int, float], per_layer: dict[str, dict[int, float]], path: str | Path,
                  title: str, dense_steps: int = 0) -> Path:
    """Skipped fraction of tiles per step: the mean over layers (thick) and each layer (thin); the first
    ``dense_steps`` steps shaded and labelled (they run the model's own dense attention)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 3.4))
    if dense_steps:
        ax.axvspan(-0.5, dense_steps - 0.5, color="0.88", zorder=0)
        ax.text(dense_steps / 2 - 0.5, 50, f"first {dense_steps} steps\ndense: they\nlay out\nthe video",
                ha="center", va="center", fontsize=6.5, color="0.3")
    for name, steps in per_layer.items():
        xs = sorted(steps)
        ax.plot(xs, [100 * steps[s] for s in xs], lw=0.9, alpha=0.6, label=name)
    xs = sorted(per_step)
    ax.plot(xs, [100 * per_step[s] for s in xs], color="black", lw=2.2, label="mean")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("tiles skipped (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="layer", title_fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_skip_masks(masks: dict[str, torch.Tensor], path: str | Path, tiles_per_frame: tuple[float, float],
                    title: str) -> Path:
    """One row per layer, one column per head: query tile x key tile, computed (light) or skipped (dark).

    ``masks`` maps a layer name to a bool ``(H, QT, KT)`` tensor (True = computed),
    i.e. ``SkipState.to_dense()[0]``. ``tiles_per_frame`` is (query tiles, key tiles)
    per video frame: dotted lines mark frame boundaries.
    """
    plt = _pyplot()
    names = list(masks)
    heads = max(m.shape[0] for m in masks.values())
    fig, axes = plt.subplots(len(names), heads, figsize=(2.1 * heads, 2.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        mask = masks[name].cpu()
        for h in range(heads):
            ax = axes[row, h]
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= mask.shape[0]:
                ax.axis("off")
                continue
            ax.imshow(mask[h].float().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            per_q, per_k = tiles_per_frame
            if per_k >= 1:
                for b in torch.arange(per_k, mask.shape[-1], per_k).tolist():
                    ax.axvline(b - 0.5, color="tab:orange", lw=0.4, ls=":")
            if per_q >= 1:
                for b in torch.arange(per_q, mask.shape[-2], per_q).tolist():
                    ax.axhline(b - 0.5, color="tab:orange", lw=0.4, ls=":")
            skipped = 1 - mask[h].float().mean().item()
            ax.set_title(f"{name} h{h}: {skipped:.0%} skipped", fontsize=7)
            if h == 0:
                ax.set_ylabel("query tile", fontsize=7)
            if row == len(names) - 1:
                ax.set_xlabel("key tile", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rows(videos: list[torch.Tensor], labels: list[str], path: str | Path, every: int = 1,
              title: str = "") -> Path:
    """One labelled row per video ``(3, F, H, W)`` in [-1, 1], every ``every``-th frame, frames numbered."""
    plt = _pyplot()
    picked = list(range(0, videos[0].shape[1], every))
    fig, axes = plt.subplots(len(videos), len(picked), figsize=(1.2 * len(picked) + 0.8, 1.25 * len(videos) + 0.5),
                             squeeze=False)
    for row, (video, label) in enumerate(zip(videos, labels)):
        frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
        for col, f in enumerate(picked):
            ax = axes[row, col]
            ax.imshow(frames[f].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
