"""The Euler/CFG sampler: schedule, contexts of the transformer calls, determinism."""
import pytest
import torch

from liteattn.testbed.data import encode_prompt
from liteattn.testbed.model import build_testbed
from liteattn.testbed.sampler import sample_video, timesteps


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_testbed({"num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64}).to(dtype=torch.float32)


def test_timesteps_go_from_one_to_zero():
    for shift in (1.0, 3.0):
        t = timesteps(7, shift)
        assert t.shape == (8,) and t[0] == 1 and t[-1] == 0
        assert (t[1:] < t[:-1]).all()
    assert (timesteps(7, 3.0)[1:-1] > timesteps(7, 1.0)[1:-1]).all()
    with pytest.raises(ValueError, match="steps"):
        timesteps(0)


def _record_calls(testbed, monkeypatch):
    calls = []
    transformer = testbed.transformer
    original_forward, original_context = transformer.forward, transformer.cache_context
    current = []

    def cache_context(name, **where):
        current.append((name, where.get("step_index")))
        return original_context(name, **where)

    def forward(x, timestep, cond, **kwargs):
        calls.append((current[-1] if current else None, float(timestep[0])))
        return original_forward(x, timestep, cond, **kwargs)

    monkeypatch.setattr(transformer, "cache_context", cache_context)
    monkeypatch.setattr(transformer, "forward", forward)
    return calls


def test_cfg_calls_cond_then_uncond_with_falling_timesteps(tiny, monkeypatch):
    calls = _record_calls(tiny, monkeypatch)
    out = sample_video(tiny, encode_prompt("red circle")[None], frames=1, size=16, steps=3, guidance=3.0,
                       seed=int(torch.randint(0, 999, ())), show_progress=False)
    assert out.shape == (1, 3, 1, 16, 16) and out.abs().max() <= 1
    assert [c for c, _ in calls] == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1), ("cond", 2), ("uncond", 2)]
    ts = [t for _, t in calls[::2]]
    assert ts[0] == pytest.approx(1000.0) and ts == sorted(ts, reverse=True) and ts[-1] > 0


def test_no_guidance_runs_only_the_conditional_branch(tiny, monkeypatch):
    calls = _record_calls(tiny, monkeypatch)
    sample_video(tiny, encode_prompt("red circle")[None], frames=1, size=16, steps=2, guidance=1.0,
                 show_progress=False)
    assert [c for c, _ in calls] == [("cond", 0), ("cond", 1)]


def test_seeded_and_deterministic(tiny):
    prompt = encode_prompt("blue striped square")[None]
    seed = int(torch.randint(0, 999, ()))
    a = sample_video(tiny, prompt, frames=1, size=16, steps=2, seed=seed, show_progress=False)
    b = sample_video(tiny, prompt, frames=1, size=16, steps=2, seed=seed, show_progress=False)
    c = sample_video(tiny, prompt, frames=1, size=16, steps=2, seed=seed + 1, show_progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_seed_per_prompt_makes_each_video_independent_of_the_batch(tiny):
    prompts = torch.stack([encode_prompt("blue striped square"), encode_prompt("red circle, green cross")])
    seed = int(torch.randint(0, 999, ()))
    both = sample_video(tiny, prompts, frames=1, size=16, steps=2, seed=[seed, seed + 7], show_progress=False)
    alone = sample_video(tiny, prompts[1:], frames=1, size=16, steps=2, seed=[seed + 7], show_progress=False)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seed"):
        sample_video(tiny, prompts, frames=1, size=16, steps=2, seed=[seed], show_progress=False)
