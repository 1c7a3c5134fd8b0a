"""Procedural training videos: textured shapes that move, spin, bounce and pass over each other on a panning background.

Why procedural: the testbed model has to be trained from nothing on a machine
without downloads, and it must learn attention with the structure of a real
video model: *local* (a pixel's future is decided by a few nearby pixels of
the previous frames: rigid shapes with momentum) and *long-range* (an object
keeps its identity across a long clip and reappears from behind another one;
the whole background moves together when the camera pans, so a background
token depends on tokens far away in space and time).

What a scene holds (every random number is drawn on the CPU from a seeded
generator and only the rendering runs on the target device, so a seed gives the
same videos on any device, up to float rounding):

- 1 to :data:`MAX_SHAPES` shapes (circle, square, triangle, cross) in one of 8
  colours and 4 textures, each on one of two depth layers. Shapes of one layer
  collide elastically (as discs, mass proportional to area); shapes of the two
  layers pass over each other, the upper one occluding the lower.
- a dark, nearly grey background: a vertical gradient plus two faint plane
  waves that scroll at one constant velocity per video (the camera pan; some
  videos have a still camera).

The brightness ranges are disjoint by construction, which is what lets
:mod:`.evaluator` judge a generated video from these rules alone: background
pixels never exceed :data:`BACKGROUND_MAX`, and a shape's brightest channel
never falls below ``SHADE_MIN * min(max(colour))``.

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
    "BACKGROUND_MAX", "COLORS", "KINDS", "MAX_SHAPES", "SHADE_MIN", "TEXTURES", "VOCAB_SIZE",
    "Scene", "ShapeSpec", "decode_prompt", "prompt_fields", "encode_prompt", "describe_prompt", "generate_videos", "random_prompts",
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
MAX_SHAPES = 4
VOCAB_SIZE = 1 + len(KINDS) * len(COLORS) * len(TEXTURES)
# A texture scales a shape's colour by a factor in [SHADE_MIN, 1].
SHADE_MIN = 0.55
# Background: grey level, per-channel tint and wave amplitude; every background pixel stays below BACKGROUND_MAX.
_GREY = (0.06, 0.24)
_TINT = 0.04
_WAVE_AMPLITUDE = (0.015, 0.03)  # per wave; two waves
BACKGROUND_MAX = _GREY[1] + _TINT + 2 * _WAVE_AMPLITUDE[1]
# Radii and speeds are fractions of the frame size, so every size shows the same scenes.
_RADIUS = (0.12, 0.18)
_SPEED = (0.6 / 32, 1.5 / 32)  # frame sizes per frame
_CAMERA_SPEED = 0.5 / 32  # at most, frame sizes per frame
_STILL_CAMERA = 0.25  # share of videos with a still camera

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


@dataclass(frozen=True)
class Scene:
    """The ground truth behind a batch of videos (all on the CPU).

    ``centres`` ``(B, F, N, 2)`` (x, y) and ``angles`` ``(B, F, N)`` in pixels / radians,
    ``radius`` and ``layer`` ``(B, N)``, ``active`` ``(B, N)`` (the slot holds a shape),
    ``camera`` ``(B, 2)`` the background's velocity in pixels per frame.
    """

    centres: torch.Tensor
    angles: torch.Tensor
    radius: torch.Tensor
    layer: torch.Tensor
    active: torch.Tensor
    camera: torch.Tensor


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
    if not isinstance(text, str):
        raise ValueError(f"prompt: expected a text like 'red striped circle, blue square', got {text!r}")
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


def prompt_fields(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(active, kind, colour, texture)`` index tensors of ``(B, MAX_SHAPES)`` prompt tokens."""
    specs = (prompts - 1).clamp_min(0)
    return (prompts > 0, specs // (len(COLORS) * len(TEXTURES)), (specs // len(TEXTURES)) % len(COLORS),
            specs % len(TEXTURES))


# ---------------------------------------------------------------- simulation
def _simulate(radius, active, layer, generator, frames: int, size: int):
    """Centres ``(B, F, N, 2)`` and angles ``(B, F, N)`` in pixels / radians.

    Shapes move in straight lines, reflect off the walls and collide
    elastically with the shapes of their own layer (as discs of their outer
    radius, masses proportional to area).
    """
    b, n = radius.shape
    speed = (_SPEED[0] + (_SPEED[1] - _SPEED[0]) * torch.rand(b, n, generator=generator)) * size
    heading = 2 * math.pi * torch.rand(b, n, generator=generator)
    vel = torch.stack([speed * heading.cos(), speed * heading.sin()], -1)
    spin = (torch.rand(b, n, generator=generator) - 0.5) * 0.5
    angle0 = 2 * math.pi * torch.rand(b, n, generator=generator)
    lo, hi = radius[..., None], size - radius[..., None]
    pos = lo + (hi - lo) * torch.rand(b, n, 2, generator=generator)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    mass = radius ** 2
    collide = active[:, :, None] & active[:, None, :] & (layer[:, :, None] == layer[:, None, :])  # (B, N, N)
    for _ in range(8):  # push overlapping shapes of one layer apart before the first frame
        pos = _separate(pos, radius, collide, pairs, vel=None, mass=mass)[0]
        pos = torch.minimum(torch.maximum(pos, lo), hi)

    centres = []
    for _ in range(frames):
        centres.append(pos)
        pos = pos + vel
        low, high = pos < lo, pos > hi
        pos = torch.where(low, 2 * lo - pos, torch.where(high, 2 * hi - pos, pos))
        vel = torch.where(low, vel.abs(), torch.where(high, -vel.abs(), vel))
        pos, vel = _separate(pos, radius, collide, pairs, vel=vel, mass=mass)
        pos = torch.minimum(torch.maximum(pos, lo), hi)
    t = torch.arange(frames, dtype=torch.float32)
    angles = angle0[:, None, :] + spin[:, None, :] * t[None, :, None]
    return torch.stack(centres, 1), angles


def _separate(pos, radius, collide, pairs, vel, mass):
    """Resolve overlaps of each colliding pair; with ``vel``, also bounce approaching pairs."""
    for i, j in pairs:
        delta = pos[:, j] - pos[:, i]
        dist = delta.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        normal = delta / dist
        overlap = (radius[:, i:i + 1] + radius[:, j:j + 1] - dist).clamp_min(0)
        touching = (overlap > 0) & collide[:, i, j, None]
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
    """Brightness factor in [SHADE_MIN, 1] of each texture, in the shape's own frame."""
    period = 0.9 * r
    stripes = 0.5 + 0.5 * torch.tanh(3 * torch.sin(2 * math.pi * u / period))
    checker = 0.5 + 0.5 * torch.tanh(3 * torch.sin(math.pi * u / (0.6 * r)) * torch.sin(math.pi * v / (0.6 * r)))
    gradient = ((u / r + 1) / 2).clamp(0, 1)
    pattern = torch.where(texture == 1, stripes, torch.where(texture == 2, checker, gradient))
    pattern = torch.where(texture == 0, torch.ones_like(u), pattern)
    return SHADE_MIN + (1 - SHADE_MIN) * pattern


def _background(gen, batch: int, frames: int, size: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, F, H, W)`` backgrounds and the camera velocity ``(B, 2)`` in pixels per frame."""
    grey = _GREY[0] + (_GREY[1] - _GREY[0]) * torch.rand(batch, 2, 1, generator=gen)  # top, bottom
    tint = _TINT * (2 * torch.rand(batch, 2, 3, generator=gen) - 1)
    top, bottom = (grey + tint).clamp_min(0.0).unbind(1)  # (B, 3) each
    still = torch.rand(batch, generator=gen) < _STILL_CAMERA
    cam_speed = torch.where(still, 0.0, _CAMERA_SPEED * size * torch.rand(batch, generator=gen))
    cam_heading = 2 * math.pi * torch.rand(batch, generator=gen)
    camera = torch.stack([cam_speed * cam_heading.cos(), cam_speed * cam_heading.sin()], -1)
    theta = 2 * math.pi * torch.rand(batch, 1, generator=gen) + torch.tensor([0.0, math.pi / 2])
    theta = theta + (torch.rand(batch, 2, generator=gen) - 0.5) * (math.pi / 3) * torch.tensor([0.0, 1.0])
    wavelength = size * (0.35 + 0.35 * torch.rand(batch, 2, generator=gen))
    amplitude = _WAVE_AMPLITUDE[0] + (_WAVE_AMPLITUDE[1] - _WAVE_AMPLITUDE[0]) * torch.rand(batch, 2, generator=gen)
    phase = 2 * math.pi * torch.rand(batch, 2, generator=gen)

    coords = torch.arange(size, dtype=torch.float32, device=dev) + 0.5
    ys, xs = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)  # (1, 1, H, W)
    ramp = coords.view(1, 1, 1, size, 1) / size
    video = top.to(dev)[:, :, None, None, None] * (1 - ramp) + bottom.to(dev)[:, :, None, None, None] * ramp
    t = torch.arange(frames, dtype=torch.float32)
    wave = 0
    for w in range(2):
        kx = (2 * math.pi / wavelength[:, w] * theta[:, w].cos()).to(dev).view(-1, 1, 1, 1)
        ky = (2 * math.pi / wavelength[:, w] * theta[:, w].sin()).to(dev).view(-1, 1, 1, 1)
        shift_x = (camera[:, None, 0] * t).to(dev)[..., None, None]  # (B, F, 1, 1): the pattern moves with the camera
        shift_y = (camera[:, None, 1] * t).to(dev)[..., None, None]
        arg = kx * (xs - shift_x) + ky * (ys - shift_y) + phase[:, w].to(dev).view(-1, 1, 1, 1)
        wave = wave + amplitude[:, w].to(dev).view(-1, 1, 1, 1) * torch.sin(arg)  # (B, F, H, W)
    return video + wave[:, None], camera


def generate_videos(batch: int, frames: int = 16, size: int = 32, seed: int = 0,
                    device: torch.device | str = "cpu", prompts: torch.Tensor | None = None,
                    return_scene: bool = False):
    """A seeded batch of videos and their prompts.

    Args:
        batch: number of videos.
        frames: frames per video.
        size: frame height and width in pixels.
        seed: all randomness (prompts, motion, layers, background, camera) derives from it.
        device: where the videos are rendered.
        prompts: optional ``(batch, MAX_SHAPES)`` tokens to render instead of random ones.
        return_scene: also return the :class:`Scene` (ground-truth tracks) behind the videos.

    Returns:
        ``(video, prompts)`` or ``(video, prompts, scene)``: float32 ``(B, 3, F, H, W)`` in ``[-1, 1]`` on
        ``device`` and int64 ``(B, MAX_SHAPES)`` on the CPU.
    """
    for name, value, low in (("batch", batch, 1), ("frames", frames, 1), ("size", size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if prompts is None:
        prompts = random_prompts(batch, gen)
    elif prompts.shape != (batch, MAX_SHAPES):
        raise ValueError(f"prompts: expected shape ({batch}, {MAX_SHAPES}), got {tuple(prompts.shape)}")
    prompts = prompts.long().cpu()
    if ((prompts < 0) | (prompts >= VOCAB_SIZE)).any():
        raise ValueError(f"prompts: expected tokens in [0, {VOCAB_SIZE}), got {prompts.tolist()}")
    active, kind, color, texture = prompt_fields(prompts)

    radius = size * (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * torch.rand(batch, MAX_SHAPES, generator=gen))
    layer = torch.randint(0, 2, (batch, MAX_SHAPES), generator=gen)
    centres, angles = _simulate(radius, active, layer, gen, frames, size)
    dev = torch.device(device)
    video, camera = _background(gen, batch, frames, size, dev)

    coords = torch.arange(size, dtype=torch.float32, device=dev) + 0.5
    ys, xs = coords.view(1, 1, -1, 1), coords.view(1, 1, 1, -1)  # (1, 1, H, W)
    # Painter's order: the lower layer first, then the upper one; within a layer, later slots on top.
    for depth in (0, 1):
        for slot in range(MAX_SHAPES):
            cx = centres[:, :, slot, 0].to(dev)[..., None, None]  # (B, F, 1, 1)
            cy = centres[:, :, slot, 1].to(dev)[..., None, None]
            cos, sin = (f(angles[:, :, slot]).to(dev)[..., None, None] for f in (torch.cos, torch.sin))
            dx, dy = xs - cx, ys - cy
            u, v = cos * dx + sin * dy, -sin * dx + cos * dy
            r = radius[:, slot].to(dev).view(-1, 1, 1, 1)
            k, t = (x[:, slot].to(dev).view(-1, 1, 1, 1) for x in (kind, texture))
            alpha = (0.5 - _signed_distance(k, u, v, r)).clamp(0, 1)  # ~1 px anti-aliased edge
            visible = active[:, slot] & (layer[:, slot] == depth)
            alpha = alpha * visible.to(dev).view(-1, 1, 1, 1)
            shade = _texture(t, u, v, r)  # (B, F, H, W)
            rgb = _PALETTE.to(dev)[color[:, slot].to(dev)]  # (B, 3)
            fill = rgb[:, :, None, None, None] * shade[:, None]
            video = video + alpha[:, None] * (fill - video)
    video = video.clamp(0, 1) * 2 - 1
    if return_scene:
        return video, prompts, Scene(centres, angles, radius, layer, active, camera)
    return video, prompts
