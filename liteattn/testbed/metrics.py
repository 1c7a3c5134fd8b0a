"""Video quality against a reference: PSNR and SSIM, in plain torch.

Why these two: they need no pretrained network (LPIPS does, and its weights
cannot be downloaded offline), and they answer the question the demo asks,
"how far is the sparse result from the dense one", at the pixel level (PSNR)
and at the level of local structure (SSIM).
"""
from __future__ import annotations

import math

import torch

__all__ = ["psnr", "ssim"]


def _check(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape or x.dim() != 5:
        raise ValueError(f"x, ref: expected two (B, C, F, H, W) videos of one shape, got {tuple(x.shape)} "
                         f"and {tuple(ref.shape)}")


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of videos in [-1, 1] (peak-to-peak range 2); inf when identical."""
    _check(x, ref)
    mse = (x.double() - ref.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return (g / g.sum())


def ssim(x: torch.Tensor, ref: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) over frames and channels of videos in [-1, 1].

    Gaussian window (11 taps, sigma 1.5) applied separably, valid region only,
    constants ``K1 = 0.01``, ``K2 = 0.03`` of the data range 2.
    """
    _check(x, ref)
    b, c, f, h, w = x.shape
    if min(h, w) < window:
        raise ValueError(f"x: frames of {h}x{w} are smaller than the {window}-pixel SSIM window")
    to_frames = lambda v: v.double().permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)  # noqa: E731
    a, r = to_frames(x), to_frames(ref)
    g = _gaussian_window(window, sigma, x.device)
    kh, kw = g.view(1, 1, window, 1), g.view(1, 1, 1, window)
    blur = lambda v: torch.nn.functional.conv2d(torch.nn.functional.conv2d(v, kh), kw)  # noqa: E731
    mu_a, mu_r = blur(a), blur(r)
    var_a = blur(a * a) - mu_a ** 2
    var_r = blur(r * r) - mu_r ** 2
    cov = blur(a * r) - mu_a * mu_r
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    score = ((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_r ** 2 + c1) * (var_a + var_r + c2))
    return score.mean().item()
