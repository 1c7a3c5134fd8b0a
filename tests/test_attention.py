"""Public API: lite_attention and the stateful LiteAttention module.

Most tests use the PyTorch backend (what "auto" picks on a CPU); the kernel is
compared with it in test_kernel.py. The multi-step tests check the paper's
claims: the skip set only grows, and what it drops is negligible softmax mass.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from liteattn import LiteAttention, SkipState, lite_attention
from liteattn.kernels import default_block_sizes
from liteattn.state import num_tiles

NO_SKIP = float("-inf")


def _bshd(*xs):
    return tuple(x.transpose(1, 2) for x in xs)


def _subsequence_lists(visited, kept):
    """Whether each list of ``kept`` is the matching ``visited`` list with some tiles removed, order kept."""
    for old, new in zip(visited, kept):
        kept = set(new)
        if [j for j in old if j in kept] != new or len(kept) != len(new):
            return False
    return True


# ------------------------------------------------------------------ lite_attention
def test_functional_first_call_starts_full_and_writes_next_state(local_qkv, dense_attention, gen):
    q, k, v = local_qkv(1, 64, 2, 2, 32, generator=gen)
    out, state = lite_attention(*_bshd(q, k, v), threshold=-3.0, block_size=(16, 16))
    assert isinstance(state, SkipState) and state.calls == 1 and state.shape == (1, 2, 4, 4)
    assert 0 < state.sparsity() < 1  # marked some tiles, but never a query tile's first
    assert (state.kv_num_blocks >= 1).all()
    # The first call computes every tile, whatever it marks.
    torch.testing.assert_close(out.transpose(1, 2).double(), dense_attention(q, k, v)[0], rtol=1e-5, atol=1e-5)


def test_layouts_agree(local_qkv, gen):
    q, k, v = local_qkv(2, 50, 4, 2, 16, generator=gen)
    out_h, lse_h, st_h = lite_attention(q, k, v, threshold=-3.0, layout="bhsd", return_lse=True, block_size=(16, 16))
    out_s, lse_s, st_s = lite_attention(*_bshd(q, k, v), threshold=-3.0, return_lse=True, block_size=(16, 16))
    torch.testing.assert_close(out_s.transpose(1, 2), out_h)
    torch.testing.assert_close(lse_s, lse_h)
    assert torch.equal(st_s.to_dense(), st_h.to_dense())


def test_default_block_size_and_scale(gen, dense_attention):
    q, k, v = (torch.randn(1, 130, 1, 32, generator=gen) for _ in range(3))
    out, state = lite_attention(q, k, v, scale=0.05)
    block_m, block_n = default_block_sizes(32)
    assert (state.block_m, state.block_n) == (block_m, block_n)
    assert state.shape == (1, 1, num_tiles(130, block_m), num_tiles(130, block_n))
    want = dense_attention(*(x.transpose(1, 2) for x in (q, k, v)), 0.05)[0]
    torch.testing.assert_close(out.transpose(1, 2).double(), want, rtol=1e-5, atol=1e-5)


def test_minus_infinity_returns_the_same_state(local_qkv, gen):
    q, k, v = local_qkv(1, 40, 1, 1, 16, generator=gen)
    state = SkipState.full(1, 1, 40, 40, 16, 16)
    _, nxt = lite_attention(q, k, v, state, threshold=NO_SKIP, layout="bhsd")
    assert nxt is state and nxt.calls == 0


def test_state_block_size_is_used_when_none_given(local_qkv, gen):
    q, k, v = local_qkv(1, 40, 1, 1, 16, generator=gen)
    state = SkipState.full(1, 1, 40, 40, 32, 16)
    _, nxt = lite_attention(q, k, v, state, layout="bhsd")
    assert (nxt.block_m, nxt.block_n) == (32, 16) and nxt.calls == 1


def test_mismatched_state_is_rebuilt_with_a_warning(local_qkv, dense_attention, gen):
    q, k, v = local_qkv(1, 64, 2, 2, 32, generator=gen)
    _, state = lite_attention(q, k, v, threshold=-2.0, layout="bhsd", block_size=(16, 16))
    assert state.sparsity() > 0
    q2, k2, v2 = q[:, :, :48], k[:, :, :48], v[:, :, :48]
    with pytest.warns(UserWarning, match="skip state was built for"):
        out, fresh = lite_attention(q2, k2, v2, state, threshold=-2.0, layout="bhsd")
    assert fresh.shape == (1, 2, 3, 3) and fresh.calls == 1
    torch.testing.assert_close(out.double(), dense_attention(q2, k2, v2)[0], rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="tiles=\\(32, 16\\)"):  # another block size also rebuilds
        lite_attention(q, k, v, state, threshold=-2.0, layout="bhsd", block_size=(32, 16))


# ------------------------------------------------------------------ multi-step behaviour
@pytest.mark.parametrize("regime", ["drift", "independent"])
def test_skip_set_only_grows_and_keeps_order(regime, gen, local_qkv, random_tile_mask, shuffled_state, active_lists,
                                             visiting_lists):
    q, k, v = local_qkv(1, 96, 2, 1, 32, generator=gen)
    # Any stored order must be kept (full rows are walked in ascending order, so start with partial lists too).
    mask = random_tile_mask(1, 2, 96, 96, 16, 16, density=0.9, generator=gen)
    state = shuffled_state(SkipState.from_dense(mask, 96, 96, 16, 16), generator=gen)
    sparsities = []
    for step in range(6):
        if regime == "drift":
            q, k, v = (x + 0.1 * torch.randn(x.shape, generator=gen) for x in (q, k, v))
        else:
            q, k, v = local_qkv(1, 96, 2, 1, 32, strength=0.5 + step * 0.2, generator=gen)
        before = state.clone()
        _, state = lite_attention(q, k, v, state, threshold=-3.0, layout="bhsd")
        assert not (state.to_dense() & ~before.to_dense()).any(), f"step {step} revived a skipped tile"
        assert _subsequence_lists(visiting_lists(before), active_lists(state)), f"step {step} reordered a list"
        assert (state.kv_num_blocks >= 1).all()
        sparsities.append(state.sparsity())
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0.05, sparsities


def _tile_gap_log2(scores, block_m, block_n):
    """Per (query tile, key tile): max over the tile's rows of (tile's max score - row's max score), log2 units."""
    seq_q, seq_k = scores.shape[-2:]
    padded = torch.nn.functional.pad(scores, (0, (-seq_k) % block_n), value=-math.inf)
    per_row = padded.unflatten(-1, (-1, block_n)).amax(-1) - scores.amax(-1, keepdim=True)  # [B, H, S_q, KT]
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, (-seq_q) % block_m), value=-math.inf)
    return per_row.unflatten(-2, (-1, block_m)).amax(-2) / math.log(2.0)  # [B, H, QT, KT]


def _random_mask_like(active, gen):
    """Same number of active tiles per query tile as ``active``, at random places."""
    ranks = torch.rand(active.shape, generator=gen).argsort(-1).argsort(-1)
    return ranks < active.sum(-1, keepdim=True)


def test_denoising_loop_error_stays_bounded(gen, local_qkv, dense_attention):
    """Slowly drifting, sharpening inputs, as between denoising steps.

    Checked at every step, against float64 dense attention:

    - every tile marked in this call has, in every row, all scores more than
      |threshold| log2 units below that row's true max (the running max the
      rule uses is never above it), so each of its softmax weights is below
      2^threshold times the row's largest: the mark was justified;
    - the output error from the tiles skipped so far is far below the error of
      skipping as many tiles per query tile at random;
    - sparsity grows step after step as attention sharpens.
    """
    threshold, bm, bn = -6.0, 16, 16
    q, k, v = local_qkv(1, 160, 2, 2, 32, strength=1.2, dtype=torch.float64, generator=gen)
    attn = LiteAttention(threshold=threshold, layout="bhsd", block_size=(bm, bn))
    for step in range(8):
        if step:
            q, k = (x * 1.03 + 0.03 * torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in (q, k))
            v = v + 0.03 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        read = attn.state.clone() if attn.state is not None else SkipState.full(1, 2, 160, 160, bm, bn)
        out = attn(q, k, v)
        want, _, scores = dense_attention(q, k, v)
        marked = read.to_dense() & ~attn.state.to_dense()
        gaps = _tile_gap_log2(scores, bm, bn)[marked]
        assert (gaps < threshold).all(), f"step {step}: marked a tile {gaps.max():.3f} log2 below the row max"
        if read.sparsity() > 0:
            lite_err = (out - want).abs().sum() / want.abs().sum()
            assert lite_err < 0.05, f"step {step}: relative L1 error {lite_err:.3g}"
        if read.sparsity() >= 0.2:  # below that, random picks are mostly far tiles too and the comparison is weak
            random_err = sum((dense_attention(q, k, v, tile_mask=_random_mask_like(read.to_dense(), gen),
                                              block=(bm, bn))[0] - want).abs().sum() for _ in range(3))
            random_err = random_err / (3 * want.abs().sum())
            assert lite_err < 0.2 * random_err, f"step {step}: error {lite_err:.3g}, random skipping {random_err:.3g}"
    history = attn.history
    assert history == sorted(history) and history[0] == 0.0
    assert history[-1] > 0.25 and history[-1] > history[1] + 0.1, history


# ------------------------------------------------------------------ LiteAttention
def test_module_history_and_last_sparsity(local_qkv, gen):
    q, k, v = local_qkv(1, 64, 2, 1, 32, generator=gen)
    attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16))
    assert attn.last_sparsity is None and attn.history == [] and attn.step == 0
    read_sparsity = []
    for _ in range(3):
        read_sparsity.append(attn.state.sparsity() if attn.state is not None else 0.0)
        attn(q, k, v)
    assert attn.history == pytest.approx(read_sparsity)
    assert attn.last_sparsity == pytest.approx(read_sparsity[-1]) and read_sparsity[-1] > 0
    assert attn.step == 3 and attn.state.calls == 3


def test_module_reset(local_qkv, gen):
    q, k, v = local_qkv(1, 64, 2, 1, 32, generator=gen)
    attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16))
    attn(q, k, v)
    attn(q, k, v)
    attn.reset()
    assert attn.state is None and attn.step == 0 and attn.history == [] and attn.last_sparsity is None
    attn(q, k, v)
    attn.reset_skip_state()
    assert attn.state is None and attn.step == 0


def test_per_step_thresholds(local_qkv, gen):
    q, k, v = local_qkv(1, 64, 2, 1, 32, generator=gen)
    schedule = [NO_SKIP, -2.0, -6.0]
    attn = LiteAttention(threshold=schedule, layout="bhsd", block_size=(16, 16))
    state = None
    for step in range(5):
        expected = schedule[min(step, 2)]
        assert attn.threshold == expected
        out = attn(q, k, v)
        want, state = lite_attention(q, k, v, state, threshold=expected, layout="bhsd", block_size=(16, 16))
        torch.testing.assert_close(out, want)
        assert torch.equal(attn.state.to_dense(), state.to_dense())
    assert attn.history[:2] == [0.0, 0.0] and attn.history[2] > 0


def test_set_threshold(local_qkv):
    attn = LiteAttention(threshold=-10.0)
    attn.set_threshold(-4.0)
    assert attn.threshold == -4.0
    attn.threshold = [-1.0, -2.0]
    assert attn.threshold == -1.0
    with pytest.raises(ValueError, match="threshold"):
        attn.set_threshold(1.0)
    with pytest.raises(ValueError, match="threshold"):
        attn.set_threshold([])
    with pytest.raises(ValueError, match="threshold"):
        attn.set_threshold([-1.0, float("nan")])
    assert attn.threshold == -1.0  # a rejected value leaves the old one


def test_disabled_is_dense_and_keeps_state(local_qkv, dense_attention, gen):
    q, k, v = local_qkv(1, 64, 2, 1, 32, generator=gen)
    attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16))
    attn(q, k, v)
    kept = attn.state
    snapshot = kept.clone()
    assert snapshot.sparsity() > 0
    attn.enable_skip_optimization(False)
    assert attn.enabled is False
    out, lse = attn(q, k, v, return_lse=True)
    want_out, want_lse, _ = dense_attention(q, k, v)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    assert attn.state is kept and torch.equal(kept.kv_indices, snapshot.kv_indices)
    assert torch.equal(kept.kv_num_blocks, snapshot.kv_num_blocks)
    assert attn.history[-1] == 0.0 and attn.step == 2
    attn.enabled = True
    attn(q, k, v)
    assert attn.history[-1] == pytest.approx(snapshot.sparsity())  # resumed from the kept state


def test_disabled_from_the_start(local_qkv, dense_attention, gen):
    q, k, v = local_qkv(1, 48, 1, 1, 16, generator=gen)
    attn = LiteAttention(threshold=-1.0, enabled=False, layout="bhsd", block_size=(16, 16))
    for _ in range(2):
        torch.testing.assert_close(attn(q, k, v).double(), dense_attention(q, k, v)[0], rtol=1e-5, atol=1e-5)
    assert attn.state.sparsity() == 0.0 and attn.history == [0.0, 0.0]


def test_return_softmax_lse_alias(local_qkv, gen):
    q, k, v = local_qkv(1, 40, 2, 2, 16, generator=gen)
    out, lse = LiteAttention(layout="bhsd")(q, k, v, return_softmax_lse=True)
    out2, lse2 = LiteAttention(layout="bhsd")(q, k, v, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2) and lse.shape == (1, 2, 40)
    assert isinstance(LiteAttention(layout="bhsd")(q, k, v, return_lse=True, return_softmax_lse=False),
                      torch.Tensor)


def test_must_do_list_alias(local_qkv, gen):
    q, k, v = local_qkv(1, 96, 2, 1, 32, generator=gen)
    a = LiteAttention(threshold=-2.0, layout="bhsd", block_size=(16, 16))
    b = LiteAttention(threshold=-2.0, layout="bhsd", block_size=(16, 16))
    for _ in range(2):
        torch.testing.assert_close(a(q, k, v, must_do_list=[0, 10, 60, 70]), b(q, k, v, must_do=[(0, 10), (60, 70)]))
    assert torch.equal(a.state.to_dense(), b.state.to_dense())
    with pytest.raises(ValueError, match="must_do"):
        a(q, k, v, must_do=[(0, 10)], must_do_list=[0, 10])


@pytest.mark.parametrize("where", ["constructor", "call"])
def test_must_do_tiles_are_never_marked(where, gen, local_qkv):
    seq_len, bm, bn = 128, 16, 32
    ranges = [(0, 20), (70, 75)]  # query tiles 0, 1, 4 (of 8); key tiles 0, 2 (of 4)
    q, k, v = local_qkv(1, seq_len, 2, 1, 32, strength=1.5, generator=gen)
    attn = LiteAttention(threshold=-1.0, layout="bhsd", block_size=(bm, bn),
                         must_do=ranges if where == "constructor" else None)
    free = LiteAttention(threshold=-1.0, layout="bhsd", block_size=(bm, bn))  # same inputs, nothing protected
    for _ in range(4):
        q, k, v = (x + 0.1 * torch.randn(x.shape, generator=gen) for x in (q, k, v))
        attn(q, k, v, must_do=ranges if where == "call" else None)
        free(q, k, v)
    protected = torch.zeros(attn.state.shape, dtype=torch.bool)
    protected[:, :, [0, 1, 4]] = True
    protected[..., [0, 2]] = True
    assert attn.state.to_dense()[protected].all()
    assert not free.state.to_dense()[protected].all(), "inputs should make some protected tiles markable"
    assert not attn.state.to_dense()[~protected].all(), "unprotected tiles should still get marked"


def test_state_for_other_shapes_is_rebuilt(local_qkv, gen):
    q, k, v = local_qkv(1, 64, 2, 1, 32, generator=gen)
    attn = LiteAttention(threshold=-2.0, layout="bhsd", block_size=(16, 16))
    attn(q, k, v)
    attn(q, k, v)
    with pytest.warns(UserWarning, match="starting a fresh state"):
        attn(q[:, :1], k, v)  # one head fewer
    assert attn.state.shape[:2] == (1, 1) and attn.history[-1] == 0.0


def test_extra_repr_mentions_configuration():
    text = repr(LiteAttention(threshold=-7.0, must_do=[(0, 4)]))
    assert "threshold=-7.0" in text and "must_do=[(0, 4)]" in text


# ------------------------------------------------------------------ torch.compile
@pytest.fixture
def fresh_dynamo():
    """Dynamo caches compiled code per code object: without a reset, one test's graph would serve the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`:UserWarning")  # a cached helper must not be traced through its cache
def test_torch_compile_matches_eager(local_qkv, fresh_dynamo, gen):
    q, k, v = local_qkv(1, 64, 2, 1, 32, generator=gen)
    compiled_attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16))
    eager_attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16))
    fn = torch.compile(lambda q, k, v: compiled_attn(q, k, v) * 2.0, backend="eager")
    for step in range(3):
        qs = q * (1 + 0.01 * step)
        torch.testing.assert_close(fn(qs, k, v), eager_attn(qs, k, v) * 2.0)
    assert compiled_attn.history == eager_attn.history and compiled_attn.history[-1] > 0


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter noise
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`:UserWarning")
@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_triton_custom_op(fullgraph, local_qkv, kernel_device, fresh_dynamo, gen):
    pytest.importorskip("triton")
    q, k, v = (x.half().to(kernel_device) for x in local_qkv(1, 48, 2, 2, 32, generator=gen))
    compiled_attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16), backend="triton")
    eager_attn = LiteAttention(threshold=-3.0, layout="bhsd", block_size=(16, 16), backend="triton")
    fn = torch.compile(lambda q, k, v: compiled_attn(q, k, v), backend="aot_eager", fullgraph=fullgraph)
    for _ in range(3):
        torch.testing.assert_close(fn(q, k, v), eager_attn(q, k, v))
    assert compiled_attn.history == eager_attn.history and compiled_attn.history[-1] > 0


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter noise
def test_kernel_walk_and_eager_launch(local_qkv, kernel_device, gen, monkeypatch):
    """A fresh state is walked in full (every tile by position) only when nothing can be marked: with detection
    on, the list walk takes it (measured faster on Hopper). Eager calls launch without the custom op."""
    pytest.importorskip("triton")
    import liteattn.kernels.op as op

    launched = []
    real = op.lite_attention_fwd

    def spy(call):
        launched.append((call.walk, call.write_state))
        return real(call)

    def no_op(*args):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(op, "lite_attention_fwd", spy)
    monkeypatch.setattr(op, "lite_attention_op", no_op)
    q, k, v = (x.half().to(kernel_device) for x in local_qkv(1, 48, 2, 2, 32, generator=gen))
    fresh = SkipState.full(1, 2, 48, 48, 16, 16, kernel_device)
    kw = dict(layout="bhsd", backend="triton")
    out_detect, nxt = lite_attention(q, k, v, fresh, threshold=-3.0, **kw)
    out_none, same = lite_attention(q, k, v, fresh, threshold=-math.inf, **kw)
    out_off, _ = lite_attention(q, k, v, fresh, enabled=False, **kw)
    assert launched == [("list", True), ("full", False), ("full", False)]
    assert same is fresh and nxt is not fresh
    for out in (out_detect, out_none):  # nothing is skipped on the first step: all three are dense attention
        torch.testing.assert_close(out, out_off, rtol=0, atol=2e-3)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter noise
def test_kernel_writes_end_a_states_freshness(local_qkv, kernel_device, gen):
    """The second call after a fresh state writes its next list into that state's buffers (double buffering):
    the state must then stop counting as fresh, or a later call would walk every tile although its lists
    changed."""
    pytest.importorskip("triton")
    q, k, v = (x.half().to(kernel_device) for x in local_qkv(1, 64, 2, 2, 32, generator=gen))
    s0 = SkipState.full(1, 2, 64, 64, 16, 16, kernel_device)
    kw = dict(layout="bhsd", backend="triton", threshold=-3.0)
    _, s1 = lite_attention(q, k, v, s0, **kw)
    assert s0.is_fresh() and not s1.is_fresh()
    _, s2 = lite_attention(q, k, v, s1, **kw)
    assert s2.kv_num_blocks is s0.kv_num_blocks and s2.sparsity() > 0
    assert not s0.is_fresh() and not s0.clone().is_fresh()


def test_first_call_under_inference_mode(local_qkv, dense_attention, gen):
    """A state created in inference mode is fresh like any other (freshness is the state's own flag, not the
    tensors' version counters, which inference tensors lack): walked in full, dense attention's result."""
    q, k, v = local_qkv(1, 40, 2, 2, 16, generator=gen)
    with torch.inference_mode():
        out, state = lite_attention(q, k, v, layout="bhsd", threshold=-math.inf, block_size=(16, 16))
        again, _ = lite_attention(q, k, v, SkipState.full(1, 2, 40, 40, 16, 16), layout="bhsd", threshold=-3.0)
    assert state.is_fresh()
    want, _, _ = dense_attention(q, k, v)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.double(), want, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter noise
def test_kernel_output_does_not_silently_drop_gradients(local_qkv, kernel_device, gen):
    """The kernel has no backward: inputs that require grad go through the custom op, whose output says so
    when differentiated, instead of coming back detached from the graph."""
    pytest.importorskip("triton")
    q, k, v = (x.half().to(kernel_device).requires_grad_() for x in local_qkv(1, 32, 1, 1, 16, generator=gen))
    out, _ = lite_attention(q, k, v, layout="bhsd", backend="triton", block_size=(16, 16))
    assert out.requires_grad
    with pytest.raises(RuntimeError):
        out.float().sum().backward()


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter noise
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("modes", [("inference", "plain"), ("plain", "inference"), ("inference", "no_grad"),
                                   ("no_grad", "inference", "plain")])
def test_calls_mix_inference_mode_and_no_grad(modes, backend, local_qkv, kernel_device, gen):
    """A generation may start under torch.inference_mode() and go on outside it (or the other way round, or
    under no_grad): every step runs, and the results and skip sets equal those of the same steps in one mode.
    The first call's state was made of inference tensors, which torch forbids writing outside inference mode."""
    device = "cpu" if backend == "torch" else kernel_device
    dtype = torch.float32 if backend == "torch" else torch.float16
    q, k, v = (x.to(device, dtype) for x in local_qkv(1, 64, 2, 1, 16, generator=gen))
    contexts = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}
    mixed = LiteAttention(threshold=-2.0, layout="bhsd", block_size=(16, 16), backend=backend)
    plain = LiteAttention(threshold=-2.0, layout="bhsd", block_size=(16, 16), backend=backend)
    for step, mode in enumerate(modes * 2):
        with contexts[mode]():
            got = mixed(q, k, v)
        want = plain(q, k, v)
        assert torch.equal(got, want), (step, mode)
        assert torch.equal(mixed.state.to_dense(), plain.state.to_dense())
    assert plain.history[-1] > 0, "the steps must skip tiles, or the skip sets compared are trivial"
    assert mixed.history == plain.history


def test_functional_state_from_inference_mode_is_usable_outside(local_qkv, gen):
    q, k, v = local_qkv(1, 48, 2, 2, 16, generator=gen)
    with torch.inference_mode():
        _, state = lite_attention(q, k, v, layout="bhsd", threshold=-2.0, block_size=(16, 16))
    assert state.kv_indices.is_inference()
    out, nxt = lite_attention(q, k, v, state, layout="bhsd", threshold=-2.0)
    assert not nxt.kv_indices.is_inference() and nxt.calls == 2
    assert torch.equal(state.to_dense() >= nxt.to_dense(), torch.ones_like(nxt.to_dense()))  # only grows
