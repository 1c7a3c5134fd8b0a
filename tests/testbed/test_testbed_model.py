"""The shipped testbed weights load and run."""
import json

import pytest
import torch

from liteattn.testbed.data import encode_prompt
from liteattn.testbed.model import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE, build_testbed, load_testbed, save_testbed


@pytest.fixture(scope="module")
def testbed():
    return load_testbed("cpu", torch.float32)


def test_shipped_files_are_small_enough():
    assert (WEIGHTS_DIR / WEIGHTS_FILE).stat().st_size <= 50 * 2 ** 20
    meta = json.loads((WEIGHTS_DIR / CONFIG_FILE).read_text())
    assert meta["transformer"]["attention_head_dim"] == 64
    assert meta["info"]["steps"] > 0


def test_forward_shape(testbed):
    frames = 2
    x = torch.randn(1, 3, frames, testbed.video["size"], testbed.video["size"])
    cond = testbed.encode(encode_prompt("red striped circle")[None])
    with torch.no_grad():
        out = testbed.transformer(x, torch.tensor([700.0]), cond, return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert testbed.tokens_per_video(frames) == frames * (testbed.video["size"] // 2) ** 2


def test_trained_weights_predict_velocity(testbed):
    """A trained model beats the trivial predictions (zero, or the noise alone) by a wide margin."""
    from liteattn.testbed.data import generate_videos

    x0, prompts = generate_videos(2, frames=2, size=testbed.video["size"], seed=int(torch.randint(0, 999, ())))
    noise = torch.randn_like(x0)
    t = 0.5
    with torch.no_grad():
        pred = testbed.transformer((1 - t) * x0 + t * noise, torch.full((2,), 1000 * t), testbed.encode(prompts),
                                   return_dict=False)[0]
    target = noise - x0
    err = (pred - target).pow(2).mean()
    assert err < 0.25 * target.pow(2).mean()
    assert err < 0.25 * (noise - target).pow(2).mean()


def test_save_load_round_trip(tmp_path):
    small = build_testbed({"num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64})
    save_testbed(small, tmp_path, info={"steps": 1})
    again = load_testbed("cpu", torch.float32, path=tmp_path)
    for (name, a), (_, b) in zip(small.transformer.state_dict().items(), again.transformer.state_dict().items()):
        torch.testing.assert_close(a.half().float(), b, msg=name)
    assert again.info["steps"] == 1


def test_bf16_keeps_small_modules_float32(testbed):
    other = load_testbed("cpu", torch.bfloat16)
    assert other.dtype == torch.bfloat16
    assert other.transformer.scale_shift_table.dtype == torch.float32
    assert other.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_testbed(path=tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_testbed(dtype=torch.int8)
    with pytest.raises(ValueError, match="tokens"):
        build_testbed({"num_layers": 1}).prompt_encoder(torch.zeros(2, 5, dtype=torch.long))


def test_training_continues_a_model_saved_with_fewer_slots(tmp_path):
    """v2 added a fourth prompt slot: loading with ``slots=`` keeps the trained slots and adds one near the last."""
    small = build_testbed({"num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64})
    small.prompt_encoder.slot.data = small.prompt_encoder.slot.data[:3].clone()
    save_testbed(small, tmp_path)
    with pytest.raises(ValueError, match="tokens"):  # the saved count is kept: a 4-token prompt is refused
        load_testbed("cpu", torch.float32, path=tmp_path).prompt_encoder(torch.zeros(1, 4).long())
    grown = load_testbed("cpu", torch.float32, path=tmp_path, slots=4)
    slot = grown.prompt_encoder.slot
    assert slot.shape[0] == 4
    torch.testing.assert_close(slot[:3], small.prompt_encoder.slot.detach().half().float())
    assert (slot[3] - slot[2]).abs().max() < 0.2


def test_training_buckets_are_parsed_and_checked():
    from liteattn.testbed.train import DEFAULT_BUCKETS, parse_buckets

    assert parse_buckets("32x64x4, 8x32x64") == [(32, 64, 4), (8, 32, 64)]
    assert all(f * (s // 2) ** 2 * b == 131072 for f, s, b in parse_buckets(DEFAULT_BUCKETS))
    for bad in ("32x64", "0x64x4", "8x33x4", "axbxc"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_buckets(bad)
