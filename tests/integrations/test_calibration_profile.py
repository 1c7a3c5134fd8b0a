"""``apply(..., profile=...)``: a calibration profile's per-layer, per-step-range thresholds reach every layer exactly,
a profile for another model or token count is refused with the difference named, ``profile=True`` still means
timing (with a warning), and the per-call skip-softmax rule carries nothing."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn.integrations as li  # noqa: E402
from liteattn.profile import Profile, model_binding  # noqa: E402
from liteattn.integrations.diffusers import PATCH_ATTR  # noqa: E402

SHARP = 12.0
LAYERS = ("blocks.0.attn1", "blocks.1.attn1")
TOKENS = 160  # the tiny Wan's 5 x 4 x 8 latent tokens


def _profile(model, thresholds, dense_steps=0, starts=None, tokens=TOKENS, rule="exact", tiles=(16, 16), **extra):
    return Profile(models={"transformer": model_binding(model, list(LAYERS))}, tiles=tiles, tokens=tokens,
                   token_rule=rule, steps=7, dense_steps=dense_steps, range_starts=starts or (dense_steps,),
                   thresholds=thresholds, **extra)


@pytest.fixture
def run(loops):
    """``run(model, **apply_options)``: ``(final latents, summary)`` of one 7-step generation, patch removed."""
    def generate(model, **options):
        handle = li.apply(model, **options)
        try:
            out, _ = loops.wan(model, seed=2, steps=7)
            return out, handle.summary()
        finally:
            handle.remove()

    return generate


def test_a_uniform_profile_runs_exactly_the_global_threshold(tiny, tiles, run):
    model = tiny.wan(sharpen=SHARP)
    want, want_summary = run(model, threshold=-3.0, dense_steps=2, block_size=tiles)
    profile = _profile(model, {layer: [-3.0] for layer in LAYERS}, dense_steps=2)
    got, summary = run(model, profile=profile, block_size=tiles)
    assert torch.equal(got, want)
    assert summary.per_step() == want_summary.per_step()
    assert want_summary.sparsity > 0  # something was skipped: the comparison means something


def test_step_ranges_switch_thresholds_where_they_start(tiny, tiles, run):
    model = tiny.wan(sharpen=SHARP)
    # ranges from step 1 (threshold -2) and from step 4 (-5) equal the per-step schedule with those values
    want, _ = run(model, threshold=[-2.0, -2.0, -2.0, -2.0, -5.0], dense_steps=1, block_size=tiles)
    profile = _profile(model, {layer: [-2.0, -5.0] for layer in LAYERS}, dense_steps=1, starts=(1, 4))
    got, _ = run(model, profile=profile, block_size=tiles)
    assert torch.equal(got, want)


def test_each_layer_gets_its_own_row(tiny, tiles, run):
    model = tiny.wan(sharpen=SHARP)
    profile = _profile(model, {LAYERS[0]: ["-inf"], LAYERS[1]: [-1.0]})
    _, summary = run(model, profile=profile, block_size=tiles)
    per_layer = summary.per_layer()
    assert per_layer[LAYERS[0]]["sparsity"] == 0.0
    assert per_layer[LAYERS[1]]["sparsity"] > 0.0
    assert "per layer from profile" in summary.table()


def test_a_profile_path_is_loaded_once_and_round_trips(tiny, tiles, tmp_path, run):
    model = tiny.wan(sharpen=SHARP)
    profile = _profile(model, {LAYERS[0]: [-2.5, "-inf"], LAYERS[1]: [-1.0, -4.0]}, dense_steps=1, starts=(1, 3),
                       name="tiny", budget={"metric": "psnr"}, measured={"calibration": {"sparsity": 0.25}})
    path = profile.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    assert loaded.thresholds[LAYERS[0]] == (-2.5, -math.inf)
    assert '"blocks.0.attn1": [-2.5, "-inf"]' in path.read_text()  # one row a line: the table reads as a table
    config = li.LiteAttentionConfig(profile=str(path), block_size=tiles)
    assert isinstance(config.profile, Profile) and config.first_skipping_step == 1
    assert config.layer_thresholds(LAYERS[1], TOKENS) == ((1, -1.0), (3, -4.0))
    a, _ = run(model, profile=path, block_size=tiles)
    b, _ = run(model, profile=profile, block_size=tiles)
    assert torch.equal(a, b)


@pytest.mark.parametrize("change,message", [
    ("head_dim", "configuration hashes"),
    ("exclude", "patched layers differ"),
    ("tiles", "tiles 16x16, applied with 32x32"),
    ("family", "calibrated for a WanTransformer3DModel, applied to a LTXVideoTransformer3DModel"),
])
def test_a_profile_for_another_model_is_refused_before_anything_changes(tiny, tiles, change, message):
    model = tiny.wan(sharpen=SHARP)
    profile = _profile(model, {layer: [-3.0] for layer in LAYERS})
    target, options = model, dict(block_size=tiles)
    if change == "head_dim":
        target = tiny.wan(sharpen=SHARP, head_dim=16)
    elif change == "exclude":
        options["exclude"] = (r"^blocks\.1\.",)
    elif change == "tiles":
        options["block_size"] = (32, 32)
    else:
        target = tiny.ltx()
    with pytest.raises(ValueError, match=message):
        li.apply(target, profile=profile, **options)
    assert getattr(target, PATCH_ATTR, None) is None


def test_token_rules(tiny, tiles, run):
    model = tiny.wan(sharpen=SHARP)
    with pytest.raises(ValueError, match="calibrated for 80 tokens and its token rule is 'exact'; this attention call "
                                         "has 160"):
        run(model, profile=_profile(model, {layer: [-3.0] for layer in LAYERS}, tokens=80), block_size=tiles)
    want, _ = run(model, threshold=-3.0, block_size=tiles)
    same, _ = run(model, profile=_profile(model, {layer: [-3.0] for layer in LAYERS}, tokens=80, rule="same"),
                   block_size=tiles)
    assert torch.equal(same, want)
    # twice the tokens: one log2 unit lower, the same skipped mass per row
    shifted_want, _ = run(model, threshold=-4.0, block_size=tiles)
    shifted, _ = run(model, profile=_profile(model, {layer: [-3.0] for layer in LAYERS}, tokens=80,
                                              rule="log2_shift"), block_size=tiles)
    assert torch.equal(shifted, shifted_want)


def test_a_profile_sets_thresholds_and_dense_steps_alone(tiny):
    model = tiny.wan()
    profile = _profile(model, {layer: [-3.0] for layer in LAYERS})
    for extra in ({"threshold": -2.0}, {"dense_steps": 2}):
        with pytest.raises(ValueError, match="^profile: a calibration profile sets every layer's thresholds"):
            li.LiteAttentionConfig(profile=profile, **extra)
    with pytest.raises(ValueError, match="^skip_rule: the profile was calibrated for skip_rule='carry'"):
        li.LiteAttentionConfig(profile=profile, skip_rule="per_call")
    for bad, message in ((3, "^profile: expected the path of a calibration profile"),
                         ("no/such/profile.json", "^profile: expected the path of a calibration profile file")):
        with pytest.raises(ValueError, match=message):
            li.LiteAttentionConfig(profile=bad)


def test_profile_true_still_means_timing_with_a_warning(tiny, tiles, run):
    with pytest.warns(DeprecationWarning, match="timing=True") as caught:
        config = li.LiteAttentionConfig(profile=True)
    assert config.timing is True and config.profile is None
    assert caught[0].filename == __file__  # the warning points at the caller, not at liteattn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert li.LiteAttentionConfig(timing=True).timing
    model = tiny.wan(sharpen=SHARP)
    with pytest.warns(DeprecationWarning, match="timing"):
        _, summary = run(model, threshold=-3.0, block_size=tiles, profile=True)
    assert summary.attention_ms is not None
    with pytest.warns(DeprecationWarning):
        _, quiet = run(model, threshold=-3.0, block_size=tiles, profile=False)
    assert quiet.attention_ms is None


def test_per_call_rule_skips_in_the_call_and_carries_nothing(tiny, tiles, loops, run):
    model = tiny.wan(sharpen=SHARP)
    dense, _ = run(model, threshold=-math.inf, block_size=tiles)
    carried, carried_summary = run(model, threshold=-3.0, block_size=tiles)
    handle = li.apply(model, threshold=-3.0, block_size=tiles, skip_rule="per_call")
    try:
        per_call, _ = loops.wan(model, seed=2, steps=7)
        summary = handle.summary()
        assert handle.attention(LAYERS[0], "cond").state is None  # nothing carried between calls
    finally:
        handle.remove()
    steps = summary.per_step()
    assert steps[0]["sparsity"] > 0  # decided in the call itself: the first call already skips
    assert carried_summary.per_step()[0]["sparsity"] == 0  # where the carried rule only marks
    assert not torch.equal(per_call, carried) and not torch.equal(per_call, dense)
    with pytest.raises(ValueError, match="^cuda_graph: expected False with skip_rule='per_call'"):
        li.LiteAttentionConfig(skip_rule="per_call", cuda_graph=True)
    with pytest.raises(ValueError, match="^skip_rule: expected one of"):
        li.LiteAttentionConfig(skip_rule="sometimes")


def test_handle_exposes_what_a_profile_binds(tiny, tiles):
    model = tiny.wan()
    handle = li.apply(model, threshold=-3.0, block_size=tiles)
    try:
        assert handle.patched() == {"transformer": (model, list(LAYERS))}
        runtimes = handle.layer_runtimes()
        assert list(runtimes) == list(LAYERS) and runtimes[LAYERS[0]].steer is None
    finally:
        handle.remove()
