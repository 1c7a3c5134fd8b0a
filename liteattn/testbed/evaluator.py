"""Score one generated testbed video on its own, from the rules of the generator that made the training data.

Why not only PSNR against the dense video: "no loss of quality" means the
liteattn video is as *good* as the dense one, not that it is pixel-identical.
Two videos can differ and both be right, and a video close to the dense one
inherits the dense one's faults. VBench answers this for real models with
pretrained networks; the testbed's world is simple enough to answer it from the
generator's ground truth (:mod:`.data`):

- background pixels are darker than every shape pixel (:data:`~.data.BACKGROUND_MAX`
  against :data:`~.data.SHADE_MIN` times a palette colour), so shapes can be
  segmented by brightness, and a shape's colour is the palette colour whose
  chromaticity (colour over its brightest channel) is nearest, whatever the
  texture's shade;
- shapes are rigid (kind, size and colour fixed), move in straight lines at
  0.6-1.5 frame sizes per 32 frames between bounces, and the background is a
  smooth gradient with faint waves that scroll at one constant velocity.

Four scores in [0, 1], one per VBench-style dimension, each the mean of
sub-scores that :func:`score_video` also returns (motion: their product):

- ``prompt_adherence``: every prompted shape is there in its colour (presence),
  of its kind (shape), with its texture (texture), and no shape more or fewer
  (count);
- ``subject_consistency``: each shape keeps its kind, size and colour across frames;
- ``motion_smoothness``: each shape's path has no jumps (smoothness: accelerations
  small except at a few bounces), times how far the shapes move as the
  generator's do (dynamics: a still video is smooth but not right);
- ``background_stability``: the background neither flickers between frames nor
  carries noise.

The classifiers' reference values (shape and texture prototypes, tolerances)
were measured on the generator's own videos at 32 and 64 pixels; the tests
check that real videos score high and blurred, recoloured, frozen or shuffled
ones score low.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import _RADIUS, _SPEED, BACKGROUND_MAX, COLORS, SHADE_MIN, TEXTURES, decode_prompt

__all__ = ["DIMENSIONS", "VideoScores", "score_video", "score_videos", "summarize"]

DIMENSIONS = ("prompt_adherence", "subject_consistency", "motion_smoothness", "background_stability")

_PALETTE = torch.tensor(list(COLORS.values()))
_CHROMA = _PALETTE / _PALETTE.amax(1, keepdim=True)  # (8, 3): colour over its brightest channel
# Halfway between the brightest background and the darkest shape pixel.
_FG_LEVEL = 0.5 * (BACKGROUND_MAX + SHADE_MIN * float(_PALETTE.amax(1).min()))
_CHROMA_MAX_DIST = 0.45  # farther from every palette chromaticity: no colour (e.g. a blend at an edge)
# Shape prototypes (solidity, hull roundness) per kind, and how far a feature may stray; see _shape_features.
_SHAPE_FEATURES = torch.tensor([[0.94, 0.89], [0.91, 0.72], [0.88, 0.56], [0.77, 0.78]])
_SHAPE_SCALE = torch.tensor([0.05, 0.08])
# Texture decision: see _texture_features.
_SOLID_SPREAD, _GRADIENT_R2, _STRIPE_COHERENCE = 0.035, 0.8, 0.45
# Tolerances, in frame sizes (a 64-pixel frame doubles every pixel figure of a 32-pixel one).
_ACCEL_TOLERANCE = (0.15, 0.55 / 32)  # pixels + frame sizes: |c(t+1) - 2 c(t) + c(t-1)| of a steady path stays below
_MIN_SPEED = _SPEED[0]
_FLICKER_FREE, _FLICKER_SCALE = 0.01, 0.01  # background RMS change per frame (scrolling waves stay below)
_NOISE_FREE, _NOISE_SCALE = 0.02, 0.02  # background RMS high-pass residual


@dataclass(frozen=True)
class VideoScores:
    """The four dimension scores of one video and the sub-scores they average."""

    prompt_adherence: float
    subject_consistency: float
    motion_smoothness: float
    background_stability: float
    details: dict

    @property
    def overall(self) -> float:
        """The mean of the four dimensions."""
        return sum(getattr(self, d) for d in DIMENSIONS) / len(DIMENSIONS)

    def as_dict(self) -> dict:
        return {**{d: getattr(self, d) for d in DIMENSIONS}, "overall": self.overall, "details": self.details}


@dataclass
class _Blob:
    """One connected region of shape pixels of one colour in one frame."""

    frame: int
    color: int
    area: int
    centre: torch.Tensor  # (2,) x, y in pixels
    kind: int
    texture: int
    chroma: torch.Tensor  # (3,)


# ---------------------------------------------------------------- segmentation
def _labels(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a bool ``(N, H, W)`` stack (0 = not in the mask)."""
    n, h, w = mask.shape
    ids = torch.arange(1, n * h * w + 1, dtype=torch.float32).view(n, h, w)
    labels = torch.where(mask, ids, torch.zeros(()))
    fmask = mask.float()
    while True:  # each pass spreads the largest id one pixel; stops when nothing changes
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * fmask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _erode(mask: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-mask.float()[None], 3, stride=1, padding=1)[0] > 0.5


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull (counter-clockwise) of 2-D points: Andrew's monotone chain."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return lower[:-1] + upper[:-1]


def _shape_features(region: torch.Tensor) -> torch.Tensor:
    """(solidity, hull in/out ratio) of a bool region.

    Solidity (area over the convex hull's) singles out the cross, the one
    non-convex kind. The in/out ratio (the nearest hull edge's distance from the
    centroid over the farthest hull vertex's) falls from circle (1) to cross's
    octagonal hull (0.9) to square (0.71) to triangle (0.5). The hull is taken
    over pixel centres and grown by half a pixel, so that it covers the pixels.
    """
    interior = _erode(region) & region
    ys, xs = torch.nonzero(region & ~interior, as_tuple=True)
    hull = _hull(list(zip(xs.tolist(), ys.tolist())))
    if len(hull) < 3:
        return torch.tensor([1.0, 1.0])
    cy, cx = (v.float().mean().item() for v in torch.nonzero(region, as_tuple=True))
    area = perimeter = 0.0
    inner, outer = math.inf, 0.0
    for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1]):
        area += x0 * y1 - x1 * y0
        length = math.hypot(x1 - x0, y1 - y0)
        perimeter += length
        inner = min(inner, abs((x1 - x0) * (y0 - cy) - (y1 - y0) * (x0 - cx)) / max(length, 1e-9))
        outer = max(outer, math.hypot(x0 - cx, y0 - cy))
    area = abs(area) / 2 + perimeter / 2 + math.pi / 4
    return torch.tensor([float(region.sum()) / area, (inner + 0.5) / (outer + 0.5)])


def _classify_kind(features: torch.Tensor) -> int:
    return int(((features - _SHAPE_FEATURES) / _SHAPE_SCALE).norm(dim=1).argmin())


def _texture_features(shade: torch.Tensor, inner: torch.Tensor) -> tuple[float, float, float]:
    """(spread, linear fit R^2, coherence) of the shade (brightness over the colour's peak) inside ``inner``.

    Solid: no spread; gradient: a plane fits; stripes: the shade changes along one direction only
    (coherence of the structure tensor near 1); a checker changes along two (near 0).
    """
    values = shade[inner]
    if values.numel() < 6:
        return 0.0, 0.0, 0.0
    spread = float(values.std())
    ys, xs = torch.nonzero(inner, as_tuple=True)
    design = torch.stack([xs.float() - xs.float().mean(), ys.float() - ys.float().mean(), torch.ones(len(xs))], 1)
    coef = torch.linalg.lstsq(design, values[:, None]).solution
    r2 = 1 - float(((values - (design @ coef)[:, 0]).var()) / values.var().clamp_min(1e-8))
    both_x = inner[:, 1:] & inner[:, :-1]
    both_y = inner[1:, :] & inner[:-1, :]
    gx = (shade[:, 1:] - shade[:, :-1])[both_x]
    gy = (shade[1:, :] - shade[:-1, :])[both_y]
    jxx, jyy = float((gx * gx).mean()) if gx.numel() else 0.0, float((gy * gy).mean()) if gy.numel() else 0.0
    # Mixed term from the pixels where both differences exist.
    both = both_x[:-1, :] & both_y[:, :-1]
    gxy = ((shade[:-1, 1:] - shade[:-1, :-1]) * (shade[1:, :-1] - shade[:-1, :-1]))[both]
    jxy = float(gxy.mean()) if gxy.numel() else 0.0
    trace = jxx + jyy
    coherence = math.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / trace if trace > 1e-8 else 0.0
    return spread, r2, coherence


def _classify_texture(features: tuple[float, float, float]) -> int:
    spread, r2, coherence = features
    if spread < _SOLID_SPREAD:
        return TEXTURES.index("solid")
    if r2 > _GRADIENT_R2:
        return TEXTURES.index("gradient")
    return TEXTURES.index("striped") if coherence > _STRIPE_COHERENCE else TEXTURES.index("checkered")


def _blobs(rgb: torch.Tensor, min_area: int) -> tuple[list[_Blob], torch.Tensor]:
    """Shape regions of every frame of ``rgb`` ``(3, F, H, W)`` in [0, 1], and the shape mask ``(F, H, W)``."""
    value = rgb.amax(0)  # (F, H, W)
    fg = value > _FG_LEVEL
    chroma = rgb / value.clamp_min(1e-6)
    dist = (chroma.permute(1, 2, 3, 0)[..., None, :] - _CHROMA).norm(dim=-1)  # (F, H, W, 8)
    best, color = dist.min(-1)
    known = fg & (best < _CHROMA_MAX_DIST)
    frames, height, width = value.shape
    stack = torch.stack([known & (color == c) for c in range(len(COLORS))], 1)  # (F, 8, H, W)
    flat = _labels(stack.flatten(0, 1)).flatten()
    where = torch.nonzero(flat).squeeze(1)
    order = torch.argsort(flat[where], stable=True)
    where = where[order]
    ids, counts = torch.unique_consecutive(flat[where], return_counts=True)
    blobs = []
    for pixels in where.split(counts.tolist()):
        if len(pixels) < min_area:
            continue
        x, y = pixels % width, (pixels // width) % height
        c, f = int((pixels[0] // (width * height)) % len(COLORS)), int(pixels[0] // (width * height * len(COLORS)))
        x0, x1, y0, y1 = int(x.min()), int(x.max()) + 1, int(y.min()), int(y.max()) + 1
        region = torch.zeros(y1 - y0 + 2, x1 - x0 + 2, dtype=torch.bool)  # a 1-pixel margin for the erosion
        region[y - y0 + 1, x - x0 + 1] = True
        shade = torch.zeros(region.shape)
        shade[1:-1, 1:-1] = value[f, y0:y1, x0:x1] / float(_PALETTE[c].max())
        centre = torch.stack([x.float().mean(), y.float().mean()]) + 0.5
        texture = _classify_texture(_texture_features(shade, _erode(region) & region))
        blobs.append(_Blob(f, c, len(pixels), centre, _classify_kind(_shape_features(region)), texture,
                           chroma[:, f, y, x].mean(1)))
    return blobs, fg


# ---------------------------------------------------------------- tracking
def _tracks(blobs: list[_Blob], prompt_colors: list[int], frames: int) -> list[list[_Blob | None]]:
    """One track per prompted shape: its region in each frame, or None where it is not found.

    Shapes are matched by colour; two prompted shapes of one colour are told
    apart by the largest regions of that colour, linked across frames by the
    shortest total jump.
    """
    tracks: list[list[_Blob | None]] = [[None] * frames for _ in prompt_colors]
    for color in set(prompt_colors):
        slots = [i for i, c in enumerate(prompt_colors) if c == color]
        last: dict[int, torch.Tensor] = {}
        for f in range(frames):
            found = sorted((b for b in blobs if b.frame == f and b.color == color), key=lambda b: -b.area)[:len(slots)]
            if not found:
                continue
            best, best_cost = None, math.inf
            for chosen in itertools.permutations(slots, len(found)):
                cost = sum(float((b.centre - last[s]).norm()) if s in last else 0.0 for b, s in zip(found, chosen))
                if cost < best_cost:
                    best, best_cost = chosen, cost
            for b, s in zip(found, best):
                tracks[s][f] = b
                last[s] = b.centre
    return tracks


def _clean(track: list[_Blob | None]) -> list[_Blob]:
    """The frames where the shape is seen whole: its area within 15 % of its usual whole area (the 80th
    percentile: an occluded frame shows less, two merged shapes more)."""
    seen = [b for b in track if b is not None]
    if not seen:
        return []
    whole = float(torch.quantile(torch.tensor([b.area for b in seen], dtype=torch.float32), 0.8))
    return [b for b in seen if abs(b.area - whole) <= 0.15 * whole]


def _mean(values, default: float = 0.0) -> float:
    values = list(values)
    return sum(values) / len(values) if values else default


# ---------------------------------------------------------------- the four dimensions
def _adherence(tracks, specs, blobs, frames: int) -> dict:
    presence = _mean(sum(b is not None for b in t) / frames for t in tracks)
    shape = _mean(_mean((b.kind == s.kind for b in _clean(t)), 0.0) for t, s in zip(tracks, specs))
    texture = _mean(_mean((b.texture == s.texture for b in _clean(t)), 0.0) for t, s in zip(tracks, specs))
    wanted = torch.bincount(torch.tensor([s.color for s in specs]), minlength=len(COLORS))
    right = 0
    for f in range(frames):
        seen = torch.bincount(torch.tensor([b.color for b in blobs if b.frame == f], dtype=torch.long),
                              minlength=len(COLORS))
        right += bool(torch.equal(seen, wanted))
    return {"presence": presence, "shape": shape, "texture": texture, "count": right / frames}


def _consistency(tracks) -> dict:
    kind, size, colour = [], [], []
    for track in tracks:
        clean = _clean(track)
        seen = [b for b in track if b is not None]
        if len(seen) < 2:
            kind.append(0.0)
            size.append(0.0)
            colour.append(0.0)
            continue
        kinds = torch.tensor([b.kind for b in clean]) if clean else torch.tensor([seen[0].kind])
        kind.append(float((kinds == kinds.mode().values).float().mean()))
        areas = torch.tensor([b.area for b in seen], dtype=torch.float32)
        spread = float((areas - areas.median()).abs().median() / areas.median())
        size.append(math.exp(-spread / 0.15))
        chroma = torch.stack([b.chroma for b in seen])
        colour.append(math.exp(-float(chroma.std(0).mean()) / 0.05))
    return {"kind": _mean(kind), "size": _mean(size), "colour": _mean(colour)}


def _motion(tracks, size: int) -> dict:
    smooth, dynamic = [], []
    tolerance, min_speed = _ACCEL_TOLERANCE[0] + _ACCEL_TOLERANCE[1] * size, _MIN_SPEED * size
    for track in tracks:
        clean = {b.frame: b for b in _clean(track)}
        accel = [float((clean[f + 1].centre - 2 * clean[f].centre + clean[f - 1].centre).norm())
                 for f in clean if f - 1 in clean and f + 1 in clean]
        speed = [float((clean[f + 1].centre - clean[f].centre).norm()) for f in clean if f + 1 in clean]
        if len(accel) < 2:
            smooth.append(0.0)
            dynamic.append(0.0)
            continue
        smooth.append(sum(a <= tolerance for a in accel) / len(accel))
        dynamic.append(min(1.0, float(torch.tensor(speed).median()) / (0.5 * min_speed)))
    return {"smoothness": _mean(smooth), "dynamics": _mean(dynamic)}


def _background(rgb: torch.Tensor, fg: torch.Tensor, size: int) -> dict:
    near = F.max_pool2d(fg.float()[:, None], 5, stride=1, padding=2)[:, 0] > 0  # shapes and 2 px around them
    both = ~near[1:] & ~near[:-1]
    if rgb.shape[1] > 1 and both.any():
        change = (rgb[:, 1:] - rgb[:, :-1]).pow(2).mean(0)  # (F-1, H, W)
        flicker = float(change[both].mean().sqrt())
    else:
        flicker = 0.0
    sigma = max(0.5, size / 32)
    taps = torch.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1, dtype=torch.float32)
    g = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    frames = rgb.permute(1, 0, 2, 3).reshape(-1, 1, *rgb.shape[2:])
    pad = len(taps) // 2
    blurred = F.conv2d(F.pad(frames, (pad, pad, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, pad, pad), mode="replicate"), g.view(1, 1, -1, 1))
    residual = (frames - blurred).view(rgb.shape[1], 3, *rgb.shape[2:]).pow(2).mean(1)  # (F, H, W)
    noise = float(residual[~near].mean().sqrt()) if (~near).any() else 0.0
    return {"flicker": math.exp(-max(0.0, flicker - _FLICKER_FREE) / _FLICKER_SCALE),
            "noise": math.exp(-max(0.0, noise - _NOISE_FREE) / _NOISE_SCALE),
            "flicker_rms": flicker, "noise_rms": noise}


# ---------------------------------------------------------------- public API
def score_video(video: torch.Tensor, prompt) -> VideoScores:
    """Scores of one video ``(3, F, H, W)`` in [-1, 1] generated for ``prompt`` (its ``(MAX_SHAPES,)`` tokens).

    Frames must be square and at least 16 pixels; the video is scored on the CPU in float32.
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: expected a (3, F, H, W) tensor in [-1, 1], got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    frames, height, width = video.shape[1:]
    if height != width or height < 16:
        raise ValueError(f"video: expected square frames of at least 16 pixels, got {height}x{width}")
    specs = decode_prompt(prompt)
    if not specs:
        raise ValueError("prompt: expected at least one shape token, got an empty prompt")
    rgb = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    size = height
    min_area = max(4, int(0.25 * 1.57 * (_RADIUS[0] * size) ** 2))  # a quarter of the smallest triangle
    blobs, fg = _blobs(rgb, min_area)
    tracks = _tracks(blobs, [s.color for s in specs], frames)
    parts = {
        "prompt_adherence": _adherence(tracks, specs, blobs, frames),
        "subject_consistency": _consistency(tracks),
        "motion_smoothness": _motion(tracks, size),
        "background_stability": _background(rgb, fg, size),
    }
    scores = {}
    for dim, sub in parts.items():
        keys = [k for k in sub if not k.endswith("_rms")]
        scores[dim] = _mean(sub[k] for k in keys)
    # A still video is perfectly smooth: motion counts only as far as the shapes move.
    scores["motion_smoothness"] = parts["motion_smoothness"]["smoothness"] * parts["motion_smoothness"]["dynamics"]
    return VideoScores(**scores, details=parts)


def score_videos(videos: torch.Tensor, prompts: torch.Tensor) -> list[VideoScores]:
    """:func:`score_video` for each of ``videos`` ``(B, 3, F, H, W)`` and ``prompts`` ``(B, MAX_SHAPES)``."""
    if videos.dim() != 5 or prompts.dim() != 2 or videos.shape[0] != prompts.shape[0]:
        raise ValueError(f"videos, prompts: expected (B, 3, F, H, W) and (B, MAX_SHAPES) with one B, got "
                         f"{tuple(videos.shape)} and {tuple(prompts.shape)}")
    return [score_video(v, p) for v, p in zip(videos, prompts)]


def summarize(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean and bootstrap confidence interval (percentile, seeded) of a list of per-video scores."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if x.numel() == 0:
        raise ValueError("values: expected at least one score")
    if x.numel() == 1:
        return {"mean": float(x[0]), "low": float(x[0]), "high": float(x[0]), "n": 1}
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(0, len(x), (resamples, len(x)), generator=gen)].mean(1)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return {"mean": float(x.mean()), "low": low, "high": high, "n": int(x.numel())}
