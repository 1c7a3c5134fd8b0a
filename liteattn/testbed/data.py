"""Procedural training videos: textured shapes that move, rotate and bounce.

Why procedural: the testbed model has to be trained from nothing on a machine
without downloads, and it must learn attention that is *structured* (local in
space, following objects through time) for temporal sparsity to mean anything.
Rigid shapes with momentum give exactly that: a pixel's future is decided by a
few nearby pixels of the previous frames.

Every random number is drawn on the CPU from a seeded generator and only the
rendering runs on the target device, so a seed gives the same videos on any
device (up to float rounding).

A video's *prompt* is one token per shape slot: ``0`` for an empty slot, else
``1 + (kind * len(COLORS) + colour) * len(TEXTURES) + texture``. An all-zero
prompt never occurs in the data, so it doubles as the "no prompt" input of
classifier-free guidance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "COLORS", "KINDS", "TEXTURES", "VOCAB_SIZE", "MAX_SHAPES",
    "ShapeSpec", "decode_prompt", "encode_prompt", "describe_prompt", "generate_videos", "random_prompts",
]

KINDS = ("circle", "square", "triangle", "cross")
TEXTURES = ("solid", "striped", "checkered", "gradient")
COLORS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.9),
    "cyan": (0.15, 0.9, 0.9),
    "orange": (1.0, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95),
}
MAX_SHAPES = 3
VOCAB_SIZE = 1 + len(KINDS) * len(COLORS) * len(TEXTURES)

_COLOR_NAMES = tuple(COLORS)
_PALETTE = torch.tensor(list(COLORS.values()))


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a prompt, by index into KINDS / COLORS / TEXTURES."""

    kind: int
    color: int
    texture: int

    def token(self) -> int:
        return 1 + (self.kind * len(COLORS) + self.color) * len(TEXTURES) + self.texture

    def __str__(self) -> str:
        texture = "" if self.texture == 0 else TEXTURES[self.texture] + " "
        return f"{_COLOR_NAMES[self.color]} {texture}{KINDS[self.kind]}"


def decode_prompt(tokens) -> list[ShapeSpec]:
    """The shapes of one prompt (a sequence of tokens), empty slots dropped."""
    shapes = []
    for tok in (int(t) for t in tokens):
        if not 0 <= tok < VOCAB_SIZE:
            raise ValueError(f"tokens: expected values in [0, {VOCAB_SIZE}), got {tok}")
        if tok:
            tok -= 1
            shapes.append(ShapeSpec(tok // (len(COLORS) * len(TEXTURES)), (tok // len(TEXTURES)) % len(COLORS),
                                    tok % len(TEXTURES)))
    return shapes


def describe_prompt(tokens) -> str:
    """Human-readable text of one prompt, e.g. ``"red striped circle, blue square"``."""
    return ", ".join(str(s) for s in decode_prompt(tokens)) or "(no prompt)"


def encode_prompt(text: str) -> torch.Tensor:
    """Tokens ``(MAX_SHAPES,)`` of a text like ``"red striped circle, blue square"``.

    Each comma-separated item is ``COLOUR [TEXTURE] KIND``; texture defaults to solid.
    """
    items = [item.split() for item in text.split(",") if item.strip()]
    if not 1 <= len(items) <= MAX_SHAPES:
        raise ValueError(f"prompt: expected 1 to {MAX_SHAPES} comma-separated shapes, got {text!r}")
    tokens = torch.zeros(MAX_SHAPES, dtype=torch.long)
    for slot, words in enumerate(items):
        texture = words[1] if len(words) == 3 else "solid"
        if len(words) not in (2, 3) or words[0] not in COLORS or texture not in TEXTURES or words[-1] not in KINDS:
            raise ValueError(
                f"prompt: each shape must be 'COLOUR [TEXTURE] KIND' with COLOUR in {_COLOR_NAMES}, "
                f"TEXTURE in {TEXTURES}, KIND in {KINDS}; got {' '.join(words)!r}")
        tokens[slot] = ShapeSpec(KINDS.index(words[-1]), _COLOR_NAMES.index(words[0]), TEXTURES.index(texture)).token()
    return tokens


def random_prompts(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, MAX_SHAPES)`` tokens: 1 to MAX_SHAPES random shapes, empty slots last."""
    count = torch.randint(1, MAX_SHAPES + 1, (batch, 1), generator=generator)
    kind = torch.randint(0, len(KINDS), (batch, MAX_SHAPES), generator=generator)
    color = torch.randint(0, len(COLORS), (batch, MAX_SHAPES), generator=generator)
    texture = torch.randint(0, len(TEXTURES), (batch, MAX_SHAPES), generator=generator)
    tokens = 1 + (kind * len(COLORS) + color) * len(TEXTURES) + texture
    return torch.where(torch.arange(MAX_SHAPES) < count, tokens, 0)


# ---------------------------------------------------------------- simulation
def _simulate(radius, active, generator, frames: int, size: int):
    """Centres ``(B, F, N, 2)`` and angles ``(B, F, N)`` in pixels / radians.

    Shapes move in straight lines, reflect off the walls and collide
    elastically with each other (as discs of their outer radius, masses
    proportional to area).
    """
    b, n = radius.shape
    speed = (0.6 + 0.9 * torch.rand(b, n, generator=generator)) * size / 32
    heading = 2 * math.pi * torch.rand(b, n, generator=generator)
    vel = torch.stack([speed * heading.cos(), speed * heading.sin()], -1)
    spin = (torch.rand(b, n, generator=generator) - 0.5) * 0.5
    angle0 = 2 * math.pi * torch.rand(b, n, generator=generator)
    lo, hi = radius[..., None], size - radius[..., None]
    pos = lo + (hi - lo) * torch.rand(b, n, 2, generator=generator)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    mass = radius ** 2
    for _ in range(8):  # push overlapping shapes apart before the first frame
        pos = _separate(pos, radius, active, pairs, vel=None, mass=mass)[0]
        pos = torch.minimum(torch.maximum(pos, lo), hi)

    centres = []
    for _ in range(frames):
        centres.append(pos)
        pos = pos + vel
        low, high = pos < lo, pos > hi
        pos = torch.where(low, 2 * lo - pos, torch.where(high, 2 * hi - pos, pos))
        vel = torch.where(low, vel.abs(), torch.where(high, -vel.abs(), vel))
        pos, vel = _separate(pos, radius, active, pairs, vel=vel, mass=mass)
        pos = torch.minimum(torch.maximum(pos, lo), hi)
    t = torch.arange(frames, dtype=torch.float32)
    angles = angle0[:, None, :] + spin[:, None, :] * t[None, :, None]
    return torch.stack(centres, 1), angles


def _separate(pos, radius, active, pairs, vel, mass):
    """Resolve overlaps of each pair; with ``vel``, also bounce approaching pairs."""
    for i, j in pairs:
        delta = pos[:, j] - pos[:, i]
        dist = delta.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        normal = delta / dist
        overlap = (radius[:, i:i + 1] + radius[:, j:j + 1] - dist).clamp_min(0)
        touching = (overlap > 0) & active[:, i:i + 1] & active[:, j:j + 1]
        mi, mj = mass[:, i:i + 1], mass[:, j:j + 1]
        push = torch.where(touching, overlap, 0) * normal
        pos = pos.clone()
        pos[:, i] -= push * mj / (mi + mj)
        pos[:, j] += push * mi / (mi + mj)
        if vel is not None:
            closing = ((vel[:, i] - vel[:, j]) * normal).sum(-1, keepdim=True)
            hit = touching & (closing > 0)
            impulse = torch.where(hit, 2 * closing / (mi + mj), 0) * normal
            vel = vel.clone()
            vel[:, i] -= impulse * mj
            vel[:, j] += impulse * mi
    return pos, vel


# ---------------------------------------------------------------- rendering
def _signed_distance(kind, u, v, r):
    """Approximate signed distance (pixels, negative inside) of each shape kind."""
    circle = torch.sqrt(u * u + v * v) - r
    square = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    tri = None
    for k in range(3):  # equilateral triangle inscribed in the radius
        a = math.pi / 2 + k * 2 * math.pi / 3
        edge = u * math.cos(a) + v * math.sin(a) - 0.55 * r
        tri = edge if tri is None else torch.maximum(tri, edge)
    arm = 0.36 * r
    cross = torch.minimum(torch.maximum(u.abs() - r, v.abs() - arm), torch.maximum(u.abs() - arm, v.abs() - r))
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, torch.where(kind == 2, tri, cross)))


def _texture(texture, u, v, r):
    """Brightness factor in [0.35, 1] of each texture, in the shape's own frame."""
    period = 0.9 * r
    stripes = 0.5 + 0.5 * torch.tanh(3 * torch.sin(2 * math.pi * u / period))
    checker = 0.5 + 0.5 * torch.tanh(3 * torch.sin(math.pi * u / (0.6 * r)) * torch.sin(math.pi * v / (0.6 * r)))
    gradient = ((u / r + 1) / 2).clamp(0, 1)
    pattern = torch.where(texture == 1, stripes, torch.where(texture == 2, checker, gradient))
    pattern = torch.where(texture == 0, torch.ones_like(u), pattern)
    return 0.35 + 0.65 * pattern


def generate_videos(batch: int, frames: int = 16, size: int = 32, seed: int = 0,
                    device: torch.device | str = "cpu", prompts: torch.Tensor | None = None):
    """A seeded batch of videos and their prompts.

    Args:
        batch: number of videos.
        frames: frames per video.
        size: frame height and width in pixels.
        seed: all randomness (prompts, motion, background) derives from it.
        device: where the videos are rendered.
        prompts: optional ``(batch, MAX_SHAPES)`` tokens to render instead of random ones.

    Returns:
        ``(video, prompts)``: float32 ``(B, 3, F, H, W)`` in ``[-1, 1]`` on
        ``device`` and int64 ``(B, MAX_SHAPES)`` on the CPU.
    """
    for name, value, low in (("batch", batch, 1), ("frames", frames, 1), ("size", size, 8)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if prompts is None:
        prompts = random_prompts(batch, gen)
    elif prompts.shape != (batch, MAX_SHAPES):
        raise ValueError(f"prompts: expected shape ({batch}, {MAX_SHAPES}), got {tuple(prompts.shape)}")
    prompts = prompts.long().cpu()
    active = prompts > 0
    specs = (prompts - 1).clamp_min(0)
    kind = specs // (len(COLORS) * len(TEXTURES))
    color = (specs // len(TEXTURES)) % len(COLORS)
    texture = specs % len(TEXTURES)

    radius = size * (0.13 + 0.07 * torch.rand(batch, MAX_SHAPES, generator=gen))
    centres, angles = _simulate(radius, active, gen, frames, size)
    bg_top = 0.05 + 0.3 * torch.rand(batch, 3, generator=gen)
    bg_bottom = 0.05 + 0.3 * torch.rand(batch, 3, generator=gen)

    dev = torch.device(device)
    coords = torch.arange(size, dtype=torch.float32, device=dev) + 0.5
    ys, xs = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)  # [1, 1, H, W]
    ramp = coords.view(1, 1, size, 1) / size
    video = (bg_top.to(dev)[:, :, None, None] * (1 - ramp) + bg_bottom.to(dev)[:, :, None, None] * ramp)
    video = video[:, :, None].expand(batch, 3, frames, size, size).clone()  # [B, 3, F, H, W]
    for slot in range(MAX_SHAPES):  # painter's order: later slots on top
        cx = centres[:, :, slot, 0].to(dev)[..., None, None]  # [B, F, 1, 1]
        cy = centres[:, :, slot, 1].to(dev)[..., None, None]
        cos, sin = (f(angles[:, :, slot]).to(dev)[..., None, None] for f in (torch.cos, torch.sin))
        dx, dy = xs - cx, ys - cy
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        r = radius[:, slot].to(dev).view(-1, 1, 1, 1)
        k, t = (x[:, slot].to(dev).view(-1, 1, 1, 1) for x in (kind, texture))
        alpha = (0.5 - _signed_distance(k, u, v, r)).clamp(0, 1)  # ~1 px anti-aliased edge
        alpha = alpha * active[:, slot].to(dev).view(-1, 1, 1, 1)
        shade = _texture(t, u, v, r)  # [B, F, H, W]
        rgb = _PALETTE.to(dev)[color[:, slot].to(dev)]  # [B, 3]
        fill = rgb[:, :, None, None, None] * shade[:, None]
        video = video + alpha[:, None] * (fill - video)
    return video * 2 - 1, prompts
