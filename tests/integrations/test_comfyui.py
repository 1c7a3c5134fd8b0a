"""The ComfyUI node's logic without ComfyUI: steps from sigmas, CFG chunks, blocks, generations, the override.

ComfyUI hands its attention override plain tensors and a ``transformer_options``
dict; these tests build both the way ComfyUI v0.3.64 does for Wan (q/k/v as
``(B, S, H*D)``, ``heads=`` as a keyword, ``cond_or_uncond``, ``uuids``,
``sigmas``, ``sample_sigmas``) and check what the override computes against
:class:`liteattn.LiteAttention` called directly. ``comfy_attention`` stands in
for ComfyUI's own attention function (same signature, plain SDPA).
"""
from __future__ import annotations

import copy
import math
import uuid
import warnings

import pytest
import torch
import torch.nn.functional as F

from liteattn import LiteAttention
from liteattn.integrations import LiteAttentionConfig
from liteattn.integrations.comfyui import (
    BLOCK_KEY, NEVER_SKIP, BlockIndexPatch, Chunk, GenerationTracker, LiteAttentionOverride, block_of,
    check_calibration_profile, pv_dtype_from_input, qk_dtype_from_input, split_chunks, step_from_sigmas, threshold_from_input,
)

S, H, D = 64, 2, 16
TILES = (16, 16)
THRESHOLD = -3.0
SCHEDULE = torch.linspace(1.0, 0.0, 7)  # 6 steps


class CountingAttention:
    """ComfyUI's attention function as the override sees it: ``func(q, k, v, heads, mask=None, ...)``."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                 **kwargs):
        self.calls += 1
        b, _, inner = q.shape
        q, k, v = (x.view(b, -1, heads, inner // heads).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, -1, inner)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """BHSD -> ComfyUI's (B, S, H*D)."""
    return x.transpose(1, 2).flatten(-2)


def _steps(local_qkv, gen, branches: int, steps: int = 6):
    """Per step, per branch, q/k/v in ComfyUI's layout: a fixed local pattern drifting a little each step."""
    base = [local_qkv(1, S, H, H, D, generator=gen, strength=1.5) for _ in range(branches)]
    out = []
    for _ in range(steps):
        out.append([tuple(_flat(x + 0.05 * torch.randn(x.shape, generator=gen)) for x in qkv) for qkv in base])
    return out


def _options(step: int, block: int = 0, cond_or_uncond=(0,), uuids=None, sigmas=None, **extra) -> dict:
    """A block's transformer_options as ComfyUI's sampler and BlockIndexPatch leave them (a fresh dict per block)."""
    sigmas = SCHEDULE[step:step + 1].clone() if sigmas is None else sigmas
    options = {"sigmas": sigmas, "sample_sigmas": SCHEDULE, "cond_or_uncond": list(cond_or_uncond), BLOCK_KEY: block}
    if uuids is not None:
        options["uuids"] = list(uuids)
    options.update(extra)
    return options


def _call(override, func, q, k, v, options):
    """As ComfyUI's wrap_attn calls it for Wan's self-attention."""
    return override(func, q, k, v, heads=H, transformer_options=options)


def _config(**kw) -> LiteAttentionConfig:
    return LiteAttentionConfig(**dict(dict(threshold=THRESHOLD, block_size=TILES, backend="torch"), **kw))


# ---------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("value, expected", [(-10, -10.0), (-0.5, -0.5), (NEVER_SKIP, -math.inf), (-250.0, -math.inf),
                                             (-math.inf, -math.inf)])
def test_threshold_from_input(value, expected):
    assert threshold_from_input(value) == expected


@pytest.mark.parametrize("value", [0, 0.0, 1.5, math.nan, math.inf, "-10", None, True])
def test_threshold_from_input_refuses(value):
    with pytest.raises(ValueError, match="^threshold: expected a negative number"):
        threshold_from_input(value)


@pytest.mark.parametrize("value, expected", [("16-bit", None), ("int8", "int8")])
def test_qk_dtype_from_input(value, expected):
    assert qk_dtype_from_input(value) == expected


@pytest.mark.parametrize("value", ["fp8", "INT8", "", None, 8])
def test_qk_dtype_from_input_refuses(value):
    with pytest.raises(ValueError, match=r"^qk_dtype: expected one of \['16-bit', 'int8'\], got "):
        qk_dtype_from_input(value)


@pytest.mark.parametrize("value, expected", [("16-bit", None), ("fp8", "fp8")])
def test_pv_dtype_from_input(value, expected):
    assert pv_dtype_from_input(value) == expected


@pytest.mark.parametrize("value", ["int8", "FP8", "", None, 8])
def test_pv_dtype_from_input_refuses(value):
    with pytest.raises(ValueError, match=r"^pv_dtype: expected one of \['16-bit', 'fp8'\], got "):
        pv_dtype_from_input(value)


def test_calibration_profile(tmp_path):
    check_calibration_profile("")
    check_calibration_profile("   ")
    check_calibration_profile(None)
    with pytest.raises(ValueError, match="^calibration_profile: expected the path of an existing file"):
        check_calibration_profile(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="^calibration_profile: expected the path of an existing file"):
        check_calibration_profile(str(tmp_path))  # a folder
    with pytest.raises(ValueError, match="^calibration_profile: expected the path of a profile file"):
        check_calibration_profile(3)
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    with pytest.raises(ValueError, match="^calibration_profile: expected a liteattn calibration profile"):
        check_calibration_profile(str(profile))
    from liteattn.calibration import TESTBED_PROFILE

    with pytest.raises(NotImplementedError, match="^calibration_profile: 'testbed' was calibrated on diffusers' "
                                                  r"\w+, whose layers this node cannot match"):
        check_calibration_profile(str(TESTBED_PROFILE))


# ---------------------------------------------------------------------------- steps, chunks, blocks
def test_step_from_sigmas():
    schedule = [14.6, 8.0, 4.0, 1.5, 0.5, 0.0]
    assert [step_from_sigmas(s, schedule) for s in schedule[:-1]] == [0, 1, 2, 3, 4]
    assert step_from_sigmas(8.0 * (1 + 5e-5), schedule) == 1  # float32 rounding of the same level
    assert step_from_sigmas(6.0, schedule) == 1  # a solver's evaluation inside step 1 (Heun, DPM++ 2S)
    assert step_from_sigmas(0.2, schedule) == 4
    assert step_from_sigmas(20.0, schedule) == 0  # above the schedule
    assert step_from_sigmas(torch.tensor(4.0), torch.tensor(schedule)) == 2


def test_step_restarts_in_a_sliced_schedule():
    """KSamplerAdvanced runs a slice of the schedule: Wan 2.2's low-noise expert counts from its own start."""
    schedule = torch.linspace(1.0, 0.0, 21)
    high, low = schedule[:11], schedule[10:]
    assert [step_from_sigmas(s, high) for s in high[:-1]] == list(range(10))
    assert [step_from_sigmas(s, low) for s in low[:-1]] == list(range(10))


@pytest.mark.parametrize("sigma, schedule, match", [(1.0, [], "^sample_sigmas: expected a non-empty"),
                                                    (math.nan, [1.0, 0.0], "^sigma: expected a noise level")])
def test_step_from_sigmas_refuses(sigma, schedule, match):
    with pytest.raises(ValueError, match=match):
        step_from_sigmas(sigma, schedule)


def test_block_of():
    assert block_of({BLOCK_KEY: 3, "block_index": 7}) == 3  # set by this package's patch inside the block
    assert block_of({"block_index": 7}) == 7  # newer ComfyUI
    assert block_of({}) is None
    assert block_of({"block_index": True}) is None


def test_split_chunks_batched_cfg():
    u_neg, u_pos = uuid.uuid4(), uuid.uuid4()
    chunks = split_chunks(4, [1, 0], [u_neg, u_pos])  # ComfyUI batches uncond first; 2 rows per entry
    assert chunks == [Chunk("uncond", 0, 2, u_neg), Chunk("cond", 2, 4, u_pos)]
    assert chunks[1].key == ("cond", u_pos, None)
    assert split_chunks(1, [0]) == [Chunk("cond", 0, 1)]
    assert split_chunks(2, None) == [Chunk("default", 0, 2)]  # outside a sampler
    assert split_chunks(3, [0, 1, 2], ["a", "b"]) == [Chunk("cond", 0, 1), Chunk("uncond", 1, 2),
                                                      Chunk("branch2", 2, 3)]  # uuids that do not fit: none
    assert split_chunks(1, [0], window=[4, 5, 6])[0].window == (4, 5, 6)


@pytest.mark.parametrize("batch, cond_or_uncond, match", [(3, [1, 0], "^cond_or_uncond: expected a divisor"),
                                                          (0, [0], "^batch: expected a positive int"),
                                                          (2.0, [0], "^batch: expected a positive int")])
def test_split_chunks_refuses(batch, cond_or_uncond, match):
    with pytest.raises(ValueError, match=match):
        split_chunks(batch, cond_or_uncond)


def test_generation_tracker():
    tracker = GenerationTracker()
    assert tracker.observe(0)  # the first call
    # Split CFG and a second-order solver: the step repeats and moves forward.
    assert not any(tracker.observe(s) for s in (0, 1, 1, 2, 3, 3))
    assert tracker.observe(0)  # the sigmas restarted
    assert not tracker.observe(1)
    tracker.start()
    assert tracker.observe(1)  # ComfyUI started a sampling run
    assert tracker.generation == 3


def test_block_index_patch():
    options = {"cond_or_uncond": [0]}
    seen = []

    def original_block(args):
        seen.append(args["transformer_options"])
        return {"img": args["img"] + 1}

    out = BlockIndexPatch(4)({"img": 1, "transformer_options": options}, {"original_block": original_block})
    assert out == {"img": 2}
    assert seen[-1] == {"cond_or_uncond": [0], BLOCK_KEY: 4}
    assert options == {"cond_or_uncond": [0]}  # the forward's dict is never changed

    def previous(args, extra):  # a replace patch installed before: still runs, with the block's copy
        return extra["original_block"](dict(args, img=args["img"] * 10))

    assert BlockIndexPatch(2, previous)({"img": 1, "transformer_options": options},
                                        {"original_block": original_block}) == {"img": 11}
    assert seen[-1][BLOCK_KEY] == 2
    assert BlockIndexPatch(0)({"img": 1}, {"original_block": lambda a: a}) == {"img": 1}  # no options: unchanged


@pytest.mark.parametrize("index, previous, match", [(-1, None, "^index: expected a block index"),
                                                    (True, None, "^index: expected a block index"),
                                                    (0, "patch", "^previous: expected a replace patch")])
def test_block_index_patch_refuses(index, previous, match):
    with pytest.raises(ValueError, match=match):
        BlockIndexPatch(index, previous)


# ---------------------------------------------------------------------------- the override
def _reference(steps, dense_steps=0, threshold=THRESHOLD):
    """Per branch, LiteAttention called directly on each sparse step: outputs (B, S, H*D) and sparsities."""
    outs, sparsity = [], []
    for b in range(len(steps[0])):
        attention = LiteAttention(threshold, block_size=TILES, backend="torch")
        branch_outs = []
        for step, qkvs in enumerate(steps):
            if step >= dense_steps:
                branch_outs.append(attention(*(x.unflatten(-1, (H, -1)) for x in qkvs[b])).flatten(-2))
            else:
                branch_outs.append(None)
        outs.append(branch_outs)
        sparsity.append(attention.history)
    return outs, sparsity


def _sparsity(override, context: str, block: int = 0) -> list[float]:
    return [c.sparsity for c in override.summary().calls if c.context == context and c.layer == f"blocks.{block}"]


def test_batched_and_split_cfg_match_liteattention(local_qkv, gen):
    """One state per (block, branch): batched [uncond, cond] calls and split calls compute the same thing."""
    steps = _steps(local_qkv, gen, branches=2)  # [cond, uncond] per step
    expected_out, expected_sparsity = _reference(steps)
    func = CountingAttention()
    batched, split = LiteAttentionOverride(_config()), LiteAttentionOverride(_config())
    u_pos, u_neg = uuid.uuid4(), uuid.uuid4()
    for step, ((qc, kc, vc), (qu, ku, vu)) in enumerate(steps):
        out = _call(batched, func, torch.cat([qu, qc]), torch.cat([ku, kc]), torch.cat([vu, vc]),
                    _options(step, cond_or_uncond=[1, 0], uuids=[u_neg, u_pos]))
        torch.testing.assert_close(out[1:], expected_out[0][step], rtol=0, atol=0)
        torch.testing.assert_close(out[:1], expected_out[1][step], rtol=0, atol=0)
        sigmas = SCHEDULE[step:step + 1].clone()  # split calls of one step share the sigma tensor, as in ComfyUI
        out_c = _call(split, func, qc, kc, vc, _options(step, cond_or_uncond=[0], uuids=[u_pos], sigmas=sigmas))
        out_u = _call(split, func, qu, ku, vu, _options(step, cond_or_uncond=[1], uuids=[u_neg], sigmas=sigmas))
        torch.testing.assert_close(torch.cat([out_u, out_c]), out, rtol=0, atol=0)
    assert func.calls == 0
    for override in (batched, split):
        assert _sparsity(override, "cond") == expected_sparsity[0]
        assert _sparsity(override, "uncond") == expected_sparsity[1]
    assert expected_sparsity[0][-1] > 0.1 and expected_sparsity[1][-1] > 0.1  # the test skips something
    assert expected_sparsity[0] != expected_sparsity[1]  # and the two branches differ


@pytest.mark.parametrize("pv_dtype", [None, "fp8"])
def test_int8_scores_are_liteattentions(local_qkv, gen, pv_dtype):
    """With ``qk_dtype="int8"`` (and ``pv_dtype="fp8"``) each state's calls are LiteAttention's with 8-bit scores
    (and P.V), bit for bit, and the summary says which precisions ran."""
    steps = _steps(local_qkv, gen, branches=1)
    override, func = LiteAttentionOverride(_config(qk_dtype="int8", pv_dtype=pv_dtype)), CountingAttention()
    attention = LiteAttention(THRESHOLD, block_size=TILES, backend="torch", qk_dtype="int8", pv_dtype=pv_dtype)
    sixteen = LiteAttention(THRESHOLD, block_size=TILES, backend="torch")
    for step, qkvs in enumerate(steps):
        out = _call(override, func, *qkvs[0], _options(step))
        want = attention(*(x.unflatten(-1, (H, -1)) for x in qkvs[0])).flatten(-2)
        other = sixteen(*(x.unflatten(-1, (H, -1)) for x in qkvs[0])).flatten(-2)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        assert not torch.equal(out, other)  # the scores did change precision
    assert func.calls == 0
    assert _sparsity(override, "cond") == attention.history and attention.history[-1] > 0.1
    mode = "scores int8" + ("" if pv_dtype is None else ", P.V fp8")
    assert f"backend torch, {mode}, 1 blocks seen" in str(override.summary())


def test_cfg_batching_may_change_between_steps(local_qkv, gen):
    """ComfyUI batches CFG when memory allows, step by step: the states follow the entries, not the rows."""
    steps = _steps(local_qkv, gen, branches=2)
    _, expected_sparsity = _reference(steps)
    override, func = LiteAttentionOverride(_config()), CountingAttention()
    u_pos, u_neg = uuid.uuid4(), uuid.uuid4()
    for step, ((qc, kc, vc), (qu, ku, vu)) in enumerate(steps):
        if step % 2:
            _call(override, func, torch.cat([qu, qc]), torch.cat([ku, kc]), torch.cat([vu, vc]),
                  _options(step, cond_or_uncond=[1, 0], uuids=[u_neg, u_pos]))
        else:
            _call(override, func, qu, ku, vu, _options(step, cond_or_uncond=[1], uuids=[u_neg]))
            _call(override, func, qc, kc, vc, _options(step, cond_or_uncond=[0], uuids=[u_pos]))
    assert _sparsity(override, "cond") == expected_sparsity[0]
    assert _sparsity(override, "uncond") == expected_sparsity[1]


def test_blocks_keep_separate_states(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=2)
    override, func = LiteAttentionOverride(_config()), CountingAttention()
    for step, (first, second) in enumerate(steps):  # block 0 sees the first inputs, block 1 the second
        _call(override, func, *first, _options(step, block=0))
        _call(override, func, *second, _options(step, block=1))
    _, expected = _reference(steps)
    assert _sparsity(override, "cond", block=0) == expected[0]
    assert _sparsity(override, "cond", block=1) == expected[1]
    assert set(override.summary().per_layer()) == {"blocks.0", "blocks.1"}


def test_dense_steps_run_comfyui_attention(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=1)
    override, func = LiteAttentionOverride(_config(dense_steps=2)), CountingAttention()
    outs = [_call(override, func, *qkvs[0], _options(step)) for step, qkvs in enumerate(steps)]
    assert func.calls == 2
    torch.testing.assert_close(outs[0], CountingAttention()(*steps[0][0], H))
    expected_out, expected_sparsity = _reference(steps, dense_steps=2)
    for step in range(2, len(steps)):
        torch.testing.assert_close(outs[step], expected_out[0][step], rtol=0, atol=0)
    calls = override.summary().calls
    assert [c.mode for c in calls] == ["dense_step"] * 2 + ["sparse"] * 4
    assert [c.sparsity for c in calls] == [0.0, 0.0] + expected_sparsity[0]
    assert calls[2].sparsity == 0.0  # skipping starts from a fresh state at the first sparse step


def test_never_skip_is_comfyui_attention(local_qkv, gen):
    """A configuration that never marks is dense attention: ComfyUI's own, bit for bit, as without the node."""
    steps = _steps(local_qkv, gen, branches=1)
    override, func = LiteAttentionOverride(_config(threshold=threshold_from_input(NEVER_SKIP))), CountingAttention()
    for step, qkvs in enumerate(steps):
        out = _call(override, func, *qkvs[0], _options(step))
        torch.testing.assert_close(out, CountingAttention()(*qkvs[0], H), rtol=0, atol=0)
    assert func.calls == len(steps)
    assert {c.mode for c in override.summary().calls} == {"dense_step"}


def test_a_threshold_that_marks_nothing_is_dense_attention_through_liteattn(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=1)
    override, func = LiteAttentionOverride(_config(threshold=NEVER_SKIP + 1)), CountingAttention()
    for step, qkvs in enumerate(steps):
        out = _call(override, func, *qkvs[0], _options(step))
        torch.testing.assert_close(out, CountingAttention()(*qkvs[0], H), rtol=1e-5, atol=1e-5)
    assert func.calls == 0 and override.summary().sparsity == 0.0
    assert {c.mode for c in override.summary().calls} == {"sparse"}


def test_per_step_threshold_schedule(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=1)
    schedule = [-math.inf, -math.inf, THRESHOLD]  # marks nothing for two steps, then -3 to the end
    override = LiteAttentionOverride(_config(threshold=schedule))
    for step, qkvs in enumerate(steps):
        _call(override, CountingAttention(), *qkvs[0], _options(step))
    attention = LiteAttention(schedule, block_size=TILES, backend="torch")
    for qkvs in steps:
        attention(*(x.unflatten(-1, (H, -1)) for x in qkvs[0]))
    assert _sparsity(override, "cond") == attention.history


def test_new_generation_starts_fresh(local_qkv, gen):
    """A second run with the same seed gives the same result: nothing carries over between generations."""
    steps = _steps(local_qkv, gen, branches=1)

    def run(override, restart):
        restart(override)
        key = uuid.uuid4()  # ComfyUI draws new uuids for every sampling run
        outs = [_call(override, CountingAttention(), *qkvs[0], _options(step, uuids=[key]))
                for step, qkvs in enumerate(steps)]
        return outs, _sparsity(override, "cond")

    override = LiteAttentionOverride(_config())
    first = run(override, lambda o: None)
    for restart in (LiteAttentionOverride.new_generation, lambda o: None):  # the node's callback; sigmas alone
        again = run(override, restart)
        assert again[1] == first[1]
        for a, b in zip(again[0], first[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert override.generations.generation == 3
    assert len(override.summary().calls) == len(steps)  # the summary is the latest generation's


def test_same_uuid_with_restarting_sigmas_starts_fresh(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=1)
    override = LiteAttentionOverride(_config())
    for step, qkvs in list(enumerate(steps)) + list(enumerate(steps)):
        _call(override, CountingAttention(), *qkvs[0], _options(step, uuids=["same"]))
    _, expected = _reference(steps)
    assert _sparsity(override, "cond") == expected[0]


def test_calls_it_cannot_honour_go_to_comfyui(local_qkv, gen):
    (q, k, v), = _steps(local_qkv, gen, branches=1, steps=1)[0]
    override, func = LiteAttentionOverride(_config()), CountingAttention()
    expected = func(q, k, v, H)
    text = k[:, :7]
    cases = [
        ((q, text, text.clone()), dict(transformer_options=_options(0)), None),  # cross-attention: not counted
        ((q, k, v), dict(transformer_options={k_: v_ for k_, v_ in _options(0).items() if k_ != BLOCK_KEY}),
         "outside_block"),
        ((q, k, v), dict(transformer_options=_options(0), mask=torch.ones(S, S, dtype=torch.bool)), "mask"),
        ((q, k, v), dict(transformer_options=_options(0), skip_output_reshape=True), "layout"),
        ((q, k, v), dict(transformer_options=_options(0, sigmas=None) | {"sample_sigmas": None}), "no_sample_sigmas"),
        ((q, k, v), dict(transformer_options=_options(0, cond_or_uncond=[1, 0])), "batch_split"),
        ((q, k, v), dict(transformer_options=_options(0), heads=3), "heads"),
        ((q.long(), k.long(), v.long()), dict(transformer_options=_options(0)), "dtype"),
    ]
    for args, kwargs, reason in cases:
        kwargs.setdefault("heads", H)
        calls = func.calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = override(func, *args, **kwargs)
            except RuntimeError:  # SDPA on integers: the point is that ComfyUI's function got the call
                out = None
        assert func.calls == calls + 1, reason
        if reason in (None, "outside_block", "no_sample_sigmas"):
            assert out.shape == expected.shape
        if reason is not None:
            assert override.fallbacks[reason] == 1
    assert sum(override.fallbacks.values()) == len(cases) - 1
    assert override.summary().calls == []


def test_positional_mask_is_honoured(local_qkv, gen):
    (q, k, v), = _steps(local_qkv, gen, branches=1, steps=1)[0]
    override, func = LiteAttentionOverride(_config()), CountingAttention()
    mask = torch.zeros(S, S)
    with pytest.warns(UserWarning, match=r"ran dense \(mask\)"):
        override(func, q, k, v, H, mask, transformer_options=_options(0))  # optimized_attention_masked's call
    assert func.calls == 1 and override.fallbacks["mask"] == 1


def test_a_second_call_shaped_like_self_attention_in_one_block_is_not_it(local_qkv, gen):
    """Cross-attention over as many text tokens as video tokens must not take over the block's skip state."""
    (q, k, v), = _steps(local_qkv, gen, branches=1, steps=1)[0]
    override, func = LiteAttentionOverride(_config()), CountingAttention()
    options = _options(0)
    _call(override, func, q, k, v, options)
    assert func.calls == 0
    out = _call(override, func, q, k.flip(1), v.flip(1), options)  # same dict: the same block's forward
    assert func.calls == 1
    torch.testing.assert_close(out, CountingAttention()(q, k.flip(1), v.flip(1), H))
    assert len(override.summary().calls) == 1 and not override.fallbacks


def test_previous_override_is_chained(local_qkv, gen):
    """Composes with another patch: whatever liteattn does not compute goes to the override set before it."""
    (q, k, v), = _steps(local_qkv, gen, branches=1, steps=1)[0]
    seen = []

    def previous(func, *args, **kwargs):
        seen.append((args, kwargs))
        return func(*args, **kwargs) * 2

    override, func = LiteAttentionOverride(_config(dense_steps=1), previous), CountingAttention()
    text = k[:, :5]
    out = _call(override, func, q, text, text, _options(0))  # cross-attention
    assert len(seen) == 1 and seen[0][0][1] is text and seen[0][1]["heads"] == H
    torch.testing.assert_close(out, 2 * CountingAttention()(q, text, text, H))
    _call(override, func, q, k, v, _options(0))  # a dense step
    assert len(seen) == 2
    _call(override, func, q, k, v, _options(1))  # sparse: liteattn, not the previous override
    assert len(seen) == 2 and func.calls == 2


def test_context_windows_keep_separate_states(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=2)

    class Window:
        def __init__(self, frames):
            self.index_list = frames

    override = LiteAttentionOverride(_config())
    for step, (first, second) in enumerate(steps):
        sigmas = SCHEDULE[step:step + 1].clone()
        _call(override, CountingAttention(), *first, _options(step, sigmas=sigmas, context_window=Window([0, 1, 2])))
        _call(override, CountingAttention(), *second, _options(step, sigmas=sigmas, context_window=Window([2, 3, 4])))
    _, expected = _reference(steps)
    assert _sparsity(override, "cond@0-2") == expected[0]
    assert _sparsity(override, "cond@2-4") == expected[1]


def test_release_keeps_the_summary(local_qkv, gen):
    steps = _steps(local_qkv, gen, branches=1)
    override = LiteAttentionOverride(_config(timing=True))
    for step, qkvs in enumerate(steps):
        _call(override, CountingAttention(), *qkvs[0], _options(step))
    before = override.summary()
    override.release()
    assert all(slot.attention.state is None for slot in override._slots.values())
    after = override.summary()
    assert [c.sparsity for c in after.calls] == [c.sparsity for c in before.calls]
    assert all(c.attention_ms is not None and c.attention_ms >= 0 for c in after.calls)
    line = override.summary_line()
    assert line.startswith("liteattn: skipped ") and "per step (%): 0 " in line
    assert "liteattn (ComfyUI): threshold -3, dense_steps 0, tiles 16x16, backend torch, 1 blocks seen" in str(after)


def test_override_is_shared_by_model_clones():
    """ComfyUI deep-copies model_options on every clone; its callbacks must still reach the override that runs."""
    override = LiteAttentionOverride(_config())
    options = {"transformer_options": {"optimized_attention_override": override}}
    assert copy.deepcopy(options)["transformer_options"]["optimized_attention_override"] is override


def test_override_refuses_bad_arguments():
    with pytest.raises(ValueError, match="^config: expected a LiteAttentionConfig"):
        LiteAttentionOverride({"threshold": -3})
    with pytest.raises(ValueError, match="^previous: expected an attention override"):
        LiteAttentionOverride(_config(), previous="sage")
    assert LiteAttentionOverride().config == LiteAttentionConfig()
    assert LiteAttentionOverride().summary_line().startswith("liteattn: no self-attention call")
