"""The evaluator judges a video from the generator's rules: the generator's own videos score high, and each kind
of damage lowers the dimension that should notice it."""
import pytest
import torch
import torch.nn.functional as F

from liteattn.testbed.data import encode_prompt, generate_videos
from liteattn.testbed.evaluator import DIMENSIONS, score_video, score_videos, summarize


def _blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    taps = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c, f, h, w = video.shape
    x = video.permute(1, 0, 2, 3).reshape(-1, 1, h, w)
    x = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="replicate"), g.view(1, 1, 1, -1))
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return x.view(f, c, h, w).permute(1, 0, 2, 3)


@pytest.fixture(scope="module")
def real():
    seed = int(torch.randint(0, 10_000, ()).item())
    return generate_videos(8, frames=12, size=32, seed=seed)


def _mean_scores(videos, prompts, damage=lambda v: v):
    scores = [score_video(damage(v), p) for v, p in zip(videos, prompts)]
    return {d: sum(getattr(s, d) for s in scores) / len(scores) for d in DIMENSIONS}


def test_generator_videos_score_high(real):
    scores = _mean_scores(*real)
    assert scores["prompt_adherence"] > 0.75
    assert scores["subject_consistency"] > 0.8
    assert scores["motion_smoothness"] > 0.75
    assert scores["background_stability"] > 0.9


def test_damage_lowers_the_dimension_that_should_notice(real):
    videos, prompts = real
    base = _mean_scores(videos, prompts)
    gen = torch.Generator().manual_seed(0)
    blurred = _mean_scores(videos, prompts, lambda v: _blur(v, 1.2))
    recoloured = _mean_scores(videos, prompts, lambda v: v[[1, 2, 0]])
    frozen = _mean_scores(videos, prompts, lambda v: v[:, :1].expand_as(v).clone())
    shuffled = _mean_scores(videos, prompts, lambda v: v[:, torch.randperm(v.shape[1], generator=gen)])
    noisy = _mean_scores(videos, prompts, lambda v: (v + 0.15 * torch.randn(v.shape, generator=gen)).clamp(-1, 1))
    assert blurred["prompt_adherence"] < base["prompt_adherence"] - 0.12  # textures and corners are gone
    assert recoloured["prompt_adherence"] < 0.4  # the prompted colours are not there
    assert frozen["motion_smoothness"] < 0.1  # nothing moves
    assert shuffled["motion_smoothness"] < 0.3  # paths jump
    assert noisy["background_stability"] < 0.3
    for damaged in (blurred, recoloured, frozen, shuffled, noisy):
        assert sum(damaged.values()) < sum(base.values()) - 0.2


def test_missing_and_extra_shapes_lower_adherence():
    seed = int(torch.randint(0, 10_000, ()).item())
    video, _ = generate_videos(1, frames=8, size=32, seed=seed, prompts=encode_prompt("red square, blue circle")[None])
    right = score_video(video[0], encode_prompt("red square, blue circle"))
    missing = score_video(video[0], encode_prompt("red square, blue circle, green triangle"))
    extra = score_video(video[0], encode_prompt("red square"))
    assert right.details["prompt_adherence"]["count"] > 0.7
    assert missing.prompt_adherence < right.prompt_adherence - 0.2
    assert extra.details["prompt_adherence"]["count"] < 0.3


def test_score_videos_and_summary():
    videos, prompts = generate_videos(2, frames=6, size=32, seed=3)
    scores = score_videos(videos, prompts)
    assert len(scores) == 2 and all(0 <= s.overall <= 1 for s in scores)
    assert set(scores[0].as_dict()) >= set(DIMENSIONS) | {"overall", "details"}
    stats = summarize([0.5, 0.7, 0.9, 0.6])
    assert stats["low"] <= stats["mean"] <= stats["high"] and stats["n"] == 4
    assert summarize([0.5, 0.7, 0.9, 0.6]) == stats  # seeded: deterministic


def test_bad_input():
    with pytest.raises(ValueError, match="video"):
        score_video(torch.zeros(4, 2, 32, 32), encode_prompt("red square"))
    with pytest.raises(ValueError, match="video"):
        score_video(torch.zeros(3, 2, 32, 16), encode_prompt("red square"))
    with pytest.raises(ValueError, match="prompt"):
        score_video(torch.zeros(3, 2, 32, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="videos, prompts"):
        score_videos(torch.zeros(2, 3, 2, 32, 32), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="values"):
        summarize([])
