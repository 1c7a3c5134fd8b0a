"""Writing videos as GIFs and PNG frame strips (Pillow, imported lazily).

Why upscaling with nearest neighbour: the testbed's frames are 32x32 pixels;
a viewer's smoothing would hide exactly the small differences a dense-vs-sparse
comparison is about.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["frame_grid", "label_columns", "save_gif", "save_strip"]


def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    """``(3, F, H, W)`` in [-1, 1] -> uint8 ``(F, H, W, 3)``."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: expected (3, F, H, W), got {tuple(video.shape)}")
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


def frame_grid(videos: list[torch.Tensor], columns: int, scale: int = 4, gap: int = 2) -> torch.Tensor:
    """Tile videos ``[(3, F, H, W), ...]`` into one uint8 video ``(F, H', W', 3)``, upscaled by ``scale``."""
    if not videos:
        raise ValueError("videos: expected at least one video")
    frames = [_to_uint8(v) for v in videos]
    f, h, w, _ = frames[0].shape
    rows = (len(frames) + columns - 1) // columns
    out = torch.full((f, rows * (h * scale + gap) + gap, columns * (w * scale + gap) + gap, 3), 255, dtype=torch.uint8)
    for i, clip in enumerate(frames):
        r, c = divmod(i, columns)
        big = clip.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        y, x = gap + r * (h * scale + gap), gap + c * (w * scale + gap)
        out[:, y:y + h * scale, x:x + w * scale] = big
    return out


def save_gif(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write uint8 ``(F, H, W, 3)`` frames as a looping GIF."""
    from PIL import Image

    images = [Image.fromarray(f.numpy()) for f in frames]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def save_strip(frames: torch.Tensor, path: str | Path, every: int = 1) -> Path:
    """Write uint8 ``(F, H, W, 3)`` frames side by side (every ``every``-th) as one PNG."""
    from PIL import Image

    picked = frames[::every]
    strip = torch.cat(list(picked), dim=1)
    path = Path(path)
    Image.fromarray(strip.numpy()).save(path)
    return path


def label_columns(frames: torch.Tensor, labels: list[str], height: int = 14) -> torch.Tensor:
    """Add a white header with one centred label per equal-width column to uint8 ``(F, H, W, 3)`` frames."""
    from PIL import Image, ImageDraw

    f, _, w, _ = frames.shape
    header = Image.new("RGB", (w, height), "white")
    draw = ImageDraw.Draw(header)
    col = w / max(len(labels), 1)
    for i, text in enumerate(labels):
        left, _, right, _ = draw.textbbox((0, 0), text)
        draw.text((i * col + (col - (right - left)) / 2, 1), text, fill="black")
    head = torch.frombuffer(bytearray(header.tobytes()), dtype=torch.uint8).view(1, height, w, 3).expand(f, -1, -1, -1)
    return torch.cat([head, frames], dim=1)
