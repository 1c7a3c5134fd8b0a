"""The procedural video generator: determinism, range, motion, prompts."""
import pytest
import torch

from liteattn.testbed.data import (COLORS, KINDS, MAX_SHAPES, TEXTURES, VOCAB_SIZE, decode_prompt, describe_prompt,
                                   encode_prompt, generate_videos)


def test_same_seed_same_videos_and_prompts():
    seed = int(torch.randint(0, 10_000, ()).item())
    a, pa = generate_videos(3, frames=5, size=24, seed=seed)
    b, pb = generate_videos(3, frames=5, size=24, seed=seed)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    c, _ = generate_videos(3, frames=5, size=24, seed=seed + 1)
    assert not torch.equal(a, c)


def test_shape_dtype_and_value_range():
    video, prompts = generate_videos(4, frames=6, size=32, seed=int(torch.randint(0, 10_000, ()).item()))
    assert video.shape == (4, 3, 6, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert prompts.shape == (4, MAX_SHAPES) and prompts.dtype == torch.long
    assert ((prompts >= 0) & (prompts < VOCAB_SIZE)).all()
    assert (prompts[:, 0] > 0).all(), "every video has at least one shape"
    # Empty slots only after filled ones.
    filled = prompts > 0
    assert (filled[:, 1:] <= filled[:, :-1]).all()


def test_shapes_move_between_frames():
    video, _ = generate_videos(6, frames=4, size=32, seed=int(torch.randint(0, 10_000, ()).item()))
    change = (video[:, :, 1:] - video[:, :, :-1]).abs().amax(dim=(1, 3, 4))  # (B, F-1)
    assert (change > 0.1).all()


def test_given_prompts_are_rendered_in_their_colour():
    prompts = torch.stack([encode_prompt("red square"), encode_prompt("blue circle")])
    video, out = generate_videos(2, frames=2, size=32, seed=int(torch.randint(0, 10_000, ()).item()),
                                 prompts=prompts)
    assert torch.equal(out, prompts)
    rgb = (video + 1) / 2  # (B, 3, F, H, W)
    red = (rgb[0, 0] > 0.8) & (rgb[0, 1] < 0.3) & (rgb[0, 2] < 0.3)
    blue = (rgb[1, 2] > 0.8) & (rgb[1, 0] < 0.35)
    assert red.sum() > 10 and blue.sum() > 10


def test_prompt_text_round_trip():
    text = "magenta striped cross, white checkered triangle, green circle"
    tokens = encode_prompt(text)
    assert describe_prompt(tokens) == text
    assert len(decode_prompt(tokens)) == 3
    every = {str(s) for s in decode_prompt(range(1, VOCAB_SIZE))}
    assert len(every) == len(KINDS) * len(COLORS) * len(TEXTURES)


@pytest.mark.parametrize("text", ["", "purple circle", "red wavy circle", "red circle, red circle, red circle, red circle"])
def test_bad_prompt_text(text):
    with pytest.raises(ValueError, match="prompt"):
        encode_prompt(text)


def test_bad_arguments():
    with pytest.raises(ValueError, match="frames"):
        generate_videos(1, frames=0)
    with pytest.raises(ValueError, match="prompts"):
        generate_videos(2, prompts=torch.ones(3, MAX_SHAPES, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        decode_prompt([VOCAB_SIZE])
