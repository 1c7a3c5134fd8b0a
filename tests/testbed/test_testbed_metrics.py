"""PSNR and SSIM of videos in [-1, 1]."""
import math

import pytest
import torch

from liteattn.testbed.metrics import psnr, ssim


def _video(*shape):
    return torch.rand(*shape) * 2 - 1


def test_psnr_of_a_known_error():
    a = _video(1, 3, 2, 16, 16)
    b = a + 0.1  # MSE 0.01 on a range of 2: 10 log10(4 / 0.01)
    assert psnr(b, a) == pytest.approx(10 * math.log10(400), rel=1e-6)
    assert psnr(a, a) == math.inf


def test_ssim_identical_noisy_and_unrelated():
    a = _video(2, 3, 3, 24, 24)
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0.5 < ssim(noisy, a) < 0.999
    assert ssim(_video(2, 3, 3, 24, 24), a) < 0.2
    assert ssim(noisy, a) == pytest.approx(ssim(a, noisy))


def test_bad_inputs():
    with pytest.raises(ValueError, match="x, ref"):
        psnr(_video(1, 3, 2, 16, 16), _video(1, 3, 2, 16, 17))
    with pytest.raises(ValueError, match="window"):
        ssim(_video(1, 3, 1, 8, 8), _video(1, 3, 1, 8, 8))
