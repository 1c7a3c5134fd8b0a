"""Tile masks ``(B, H, QT, KT)`` (True = computed) with a requested skipped fraction.

Why four patterns: the kernel's cost should fall linearly with the number of
skipped tiles whatever their layout. ``random`` scatters the computed tiles,
the same number in every query tile (worst case for locality), ``random-uneven``
scatters them over a whole head so that query tiles differ in length (the
programs of a head drift apart, and with them their reads of K/V), ``banded``
keeps a contiguous window (best case, and the shape real video attention
tends towards), ``per-head`` gives every head its own amount of work (load
imbalance between programs, as in real models where some heads are local and
others global).

Every query tile keeps at least one key tile: a query tile with nothing to
attend to has no defined output, and liteattn never produces one (the first
tile visited is never marked).
"""
from __future__ import annotations

import torch

__all__ = ["achieved_fraction", "banded_mask", "build_mask", "keep_count", "per_head_fractions", "per_head_mask",
           "random_mask", "random_uneven_mask"]


def _check(shape: tuple[int, int, int, int], fraction: float) -> None:
    if len(shape) != 4 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape: expected (B, H, QT, KT) with every entry >= 1, got {tuple(shape)}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: expected a skipped fraction in [0, 1), got {fraction}")


def keep_count(fraction: float, num_key_tiles: int) -> int:
    """Key tiles a query tile keeps to skip ``fraction`` of ``num_key_tiles``: nearest count, at least 1."""
    return min(num_key_tiles, max(1, round((1.0 - fraction) * num_key_tiles)))


def achieved_fraction(mask: torch.Tensor) -> float:
    """Fraction of tiles skipped (False) in a boolean tile mask."""
    return 1.0 - mask.float().mean().item()


def _smallest(noise: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` smallest entries of each row of ``noise`` (by index: exactly ``keep``, ties
    in the float noise included)."""
    idx = noise.topk(keep, dim=-1, largest=False).indices
    return torch.zeros_like(noise, dtype=torch.bool).scatter_(-1, idx, True)


def random_mask(shape, fraction: float, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Each (b, h, query tile) keeps the same number of key tiles, chosen uniformly at random."""
    _check(shape, fraction)
    b, h, qt, kt = shape
    noise = torch.rand(b, h, qt, kt, generator=generator, device=device)
    return _smallest(noise, keep_count(fraction, kt))  # a uniform random subset of that size


def random_uneven_mask(shape, fraction: float, *, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Each (b, h) keeps the same number of key tiles, chosen uniformly among all its tiles, so the count per query
    tile varies (binomial-like, e.g. 465 +- 15 of 929 at s = 0.5); a query tile that drew none keeps one more."""
    _check(shape, fraction)
    b, h, qt, kt = shape
    noise = torch.rand(b, h, qt, kt, generator=generator, device=device)
    mask = _smallest(noise.flatten(2), keep_count(fraction, qt * kt)).view(b, h, qt, kt)
    own = torch.zeros_like(mask).scatter_(-1, noise.argmin(dim=-1, keepdim=True), True)
    return mask | (own & ~mask.any(dim=-1, keepdim=True))


def _window(keep: torch.Tensor, qt: int, kt: int, device) -> torch.Tensor:
    """``(..., QT, KT)`` mask of ``keep[...]`` consecutive key tiles centred on each query tile's diagonal.

    The window is shifted inwards at the edges, so every query tile keeps
    exactly its count and the fraction is exact, not eroded by clipping.
    """
    centre = ((torch.arange(qt, device=device) + 0.5) * kt / qt).long()  # diagonal, also for QT != KT
    keep = keep[..., None]  # (..., 1) broadcast over query tiles
    start = (centre - (keep - 1) // 2).clamp(min=0)
    start = torch.minimum(start, kt - keep)
    cols = torch.arange(kt, device=device)
    return (cols >= start[..., None]) & (cols < (start + keep)[..., None])


def banded_mask(shape, fraction: float, *, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The same diagonal window of key tiles for every batch and head."""
    _check(shape, fraction)
    b, h, qt, kt = shape
    keep = torch.full((1,), keep_count(fraction, kt), device=device)
    return _window(keep, qt, kt, device).expand(b, h, qt, kt).clone()


def per_head_fractions(fraction: float, heads: int, *, generator: torch.Generator | None = None) -> list[float]:
    """``heads`` fractions spread evenly around ``fraction`` (mean exactly ``fraction``), in random head order.

    The spread is half the distance to the nearer end of ``[0, 1)``, so every
    head stays a valid fraction and the heads differ for any ``0 < fraction < 1``.
    """
    if heads < 1:
        raise ValueError(f"heads: expected >= 1, got {heads}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: expected a skipped fraction in [0, 1), got {fraction}")
    if heads == 1:
        return [fraction]
    spread = 0.5 * min(fraction, 1.0 - fraction)
    values = [fraction + spread * (2.0 * i / (heads - 1) - 1.0) for i in range(heads)]
    order = torch.randperm(heads, generator=generator).tolist()  # no head order bias in the kernel's grid
    return [values[i] for i in order]


def per_head_mask(shape, fraction: float, *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A diagonal window per head, each head with its own width (see :func:`per_head_fractions`)."""
    _check(shape, fraction)
    b, h, qt, kt = shape
    cpu_gen = None
    if generator is not None:  # randperm of the head order runs on the CPU; derive its seed from `generator`
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                                                  device=generator.device)))
    fractions = per_head_fractions(fraction, h, generator=cpu_gen)
    keep = torch.tensor([keep_count(f, kt) for f in fractions], device=device)  # (H,)
    return _window(keep, qt, kt, device).expand(b, h, qt, kt).clone()


_BUILDERS = {"random": random_mask, "random-uneven": random_uneven_mask, "banded": banded_mask,
             "per-head": per_head_mask}


def build_mask(pattern: str, shape, fraction: float, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``(B, H, QT, KT)`` tile mask of ``pattern`` (``random``, ``random-uneven``, ``banded`` or
    ``per-head``)."""
    if pattern not in _BUILDERS:
        raise ValueError(f"pattern: expected one of {list(_BUILDERS)}, got {pattern!r}")
    return _BUILDERS[pattern](shape, fraction, generator=generator, device=device)
