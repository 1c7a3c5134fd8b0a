"""The procedural video generator: determinism, range, motion, prompts."""
import pytest
import torch

from liteattn.testbed.data import (BACKGROUND_MAX, COLORS, KINDS, MAX_SHAPES, SHADE_MIN, TEXTURES, VOCAB_SIZE,
                                   decode_prompt, describe_prompt, encode_prompt, generate_videos)


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


@pytest.mark.parametrize("text", ["", "purple circle", "red wavy circle", "red circle, red circle, red circle, red circle, red circle"])
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


def test_background_and_shapes_are_separated_by_brightness():
    """The evaluator relies on it: background pixels stay below BACKGROUND_MAX, shape interiors above."""
    prompts = encode_prompt("green square")[None].expand(6, -1)
    video, _, scene = generate_videos(6, frames=3, size=48, seed=int(torch.randint(0, 10_000, ()).item()),
                                      prompts=prompts.clone(), return_scene=True)
    value = ((video + 1) / 2).amax(1)  # (B, F, H, W)
    ys, xs = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    centre = scene.centres[:, :, 0]  # (B, F, 2)
    dist = ((xs - centre[..., 0, None, None]) ** 2 + (ys - centre[..., 1, None, None]) ** 2).sqrt()
    r = scene.radius[:, 0].view(-1, 1, 1, 1)
    assert value[dist > 1.2 * r + 1].max() <= BACKGROUND_MAX
    assert value[dist < 0.5 * r].min() >= SHADE_MIN * COLORS["green"][1] - 1e-5


def test_camera_pans_the_background_and_layers_decide_occlusion():
    seed = int(torch.randint(0, 10_000, ()).item())
    video, prompts, scene = generate_videos(16, frames=4, size=32, seed=seed, return_scene=True)
    assert scene.centres.shape == (16, 4, MAX_SHAPES, 2) and scene.layer.shape == (16, MAX_SHAPES)
    assert set(scene.layer.unique().tolist()) <= {0, 1}
    assert torch.equal(scene.active, prompts > 0)
    speed = scene.camera.norm(dim=1)
    assert (speed == 0).any() or (speed > 0).all()
    assert (speed <= 0.5 + 1e-6).all()
    # Shapes of different layers may overlap; shapes of one layer are kept apart as discs (a push off a wall can
    # undo part of a separation: at most a fifth of the radii).
    for b in range(16):
        for i in range(MAX_SHAPES):
            for j in range(i + 1, MAX_SHAPES):
                if scene.active[b, i] and scene.active[b, j] and scene.layer[b, i] == scene.layer[b, j]:
                    gap = (scene.centres[b, :, i] - scene.centres[b, :, j]).norm(dim=-1)
                    assert (gap >= 0.8 * (scene.radius[b, i] + scene.radius[b, j])).all()


def test_background_moves_with_the_camera():
    for seed in range(40):  # find a panning and a still video among seeded draws
        _, _, scene = generate_videos(1, frames=2, size=32, seed=seed, prompts=encode_prompt("red circle")[None],
                                      return_scene=True)
        if scene.camera.norm() > 0.3:
            break
    video, _ = generate_videos(1, frames=2, size=32, seed=seed, prompts=encode_prompt("red circle")[None])
    far = video[0, :, 0].amax(0) < 2 * BACKGROUND_MAX - 1  # background in frame 0
    assert (video[0, :, 1] - video[0, :, 0]).abs()[:, far].max() > 1e-3
