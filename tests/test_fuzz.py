"""A property-based fuzz of the public API: random shapes, dtypes, memory layouts, must-do ranges (also in the
CUDA LiteAttention's flat forms), skip states (fresh, from masks in shuffled order, built for other shapes, hand
-built wrong), non-finite entries, and at most one bad argument per case. Each case either raises a ValueError
naming the bad argument, or equals the reference (liteattn.reference) over the same tiles: exactly on the PyTorch
path, within the kernel's rounding on the Triton path (Triton's interpreter here).

Small on purpose (a few dozen cases, tiny shapes) so that CI stays fast; a failure prints its case.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st

from liteattn import LiteAttention, SkipState, lite_attention
from liteattn.kernels import default_block_sizes
from liteattn.reference import lite_attention_reference
from liteattn.state import num_tiles

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NumPy in the interpreter, on inf - inf
]

# The argument a case breaks (None: a valid case), and the start of the ValueError it must raise.
BREAKS = {
    None: None, "layout": "layout:", "threshold": "threshold:", "scale": "scale:", "must_do": "must_do:",
    "must_do_list": "must_do_list:", "block_size": "block_size:", "dtype": "q.dtype:", "kv_heads": "k:",
    "batch": "k:", "rank": "q:", "not_a_tensor": "q:", "meta": "q, k, v:", "state_type": "state:",
    "state_index": "SkipState: kv_indices", "state_repeat": "SkipState: kv_indices", "state_count":
        "SkipState: kv_num_blocks", "head_dim": "head_dim:",
}
VALID_ODDS = 2  # a case is valid with odds 2 : 1, else it breaks one argument


@st.composite
def cases(draw, backend):
    kinds = [b for b in BREAKS if b is not None and (b != "head_dim" or backend == "triton")]
    broken = None if draw(st.integers(0, VALID_ODDS)) else draw(st.sampled_from(kinds))
    kernel = backend == "triton"
    case = dict(backend=backend, broken=broken, seed=draw(st.integers(0, 2**31 - 1)))
    case["batch"] = draw(st.integers(1, 2))
    case["kv_heads"] = draw(st.sampled_from([1, 2]))
    case["heads"] = case["kv_heads"] * draw(st.sampled_from([1, 2]))
    limit = 40 if kernel else 70
    case["seq_q"], case["seq_k"] = draw(st.integers(1, limit)), draw(st.integers(1, limit))
    case["head_dim"] = draw(st.sampled_from([16, 32] if kernel else [8, 16, 24, 32]))
    case["dtype"] = draw(st.sampled_from([torch.float16, torch.bfloat16] if kernel else
                                         [torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    case["layout"] = draw(st.sampled_from(["bshd", "bhsd"]))
    case["physical"] = draw(st.permutations([0, 1, 2, 3]))  # the memory order of q, k, v's dimensions
    case["block"] = draw(st.sampled_from([None, (16, 16), (16, 32), (32, 16)]))
    case["threshold"] = draw(st.sampled_from([-math.inf]) | st.floats(-8.0, -0.25))
    case["scale"] = draw(st.sampled_from([None, None, 0.3]))
    case["must_do"] = draw(st.sampled_from(["none", "ranges", "flat", "descending"]))
    case["state"] = draw(st.sampled_from(["none", "fresh", "mask", "shuffled", "other_shape"]))
    # LiteAttention over two steps, else the functional form; the CUDA LiteAttention's flat must_do_list only
    # exists on the module. The Triton path takes one functional step (its next state may differ from the
    # reference's on tiles scored within rounding of the threshold, and a second step would compound that).
    case["module"] = (not kernel and draw(st.booleans())) or broken == "must_do_list"
    case["nonfinite"] = draw(st.lists(st.tuples(st.sampled_from("qkv"), st.floats(0, 1), st.floats(0, 1),
                                                st.sampled_from([math.nan, math.inf, -math.inf])), max_size=2))
    return case


def _tensor(shape_bhsd, physical, dtype, gen):
    """A (B, H, S, D) tensor whose memory holds its dimensions in the order ``physical``."""
    stored = torch.randn([shape_bhsd[i] for i in physical], generator=gen)
    inverse = [physical.index(i) for i in range(4)]
    return stored.permute(inverse).to(dtype)


def _build(case):
    """The call's arguments (q, k, v in BHSD and in the call's layout, the kwargs, the state), with the case's
    bad argument if any."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hk, sq, sk, d = (case[n] for n in ("batch", "heads", "kv_heads", "seq_q", "seq_k", "head_dim"))
    dtype = case["dtype"]
    broken = case["broken"]
    if broken == "head_dim":
        d = 20  # not a multiple of 16: the kernel refuses it
    q = _tensor((b, h, sq, d), case["physical"], torch.float32, gen) * 2
    k = _tensor((b, hk, sk, d), case["physical"], torch.float32, gen) * 2
    v = _tensor((b, hk, sk, d), case["physical"], torch.float32, gen)
    for name, fq, fs, value in case["nonfinite"]:
        x = dict(q=q, k=k, v=v)[name]
        x[int(fq * x.shape[0]) % x.shape[0], 0, int(fs * x.shape[2]) % x.shape[2], int(fs * 7) % d] = value
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if broken == "kv_heads":
        k = v = torch.randn(b, h + 1, sk, d, generator=gen).to(dtype)  # h + 1 key heads cannot divide h
    if broken == "batch":
        k = v = torch.cat([k, k], dim=0)
    if broken == "dtype":
        q, k, v = (x.float() if case["backend"] == "triton" else x.to(torch.int32) for x in (q, k, v))
    layout = case["layout"]
    args = [x.transpose(1, 2) if layout == "bshd" else x for x in (q, k, v)]
    if broken == "rank":
        args[0] = args[0][0]
    if broken == "not_a_tensor":
        args[0] = args[0].tolist()
    if broken == "meta":
        args = [x.to("meta") for x in args]
    block = case["block"]
    kw = dict(threshold=case["threshold"], scale=case["scale"], layout=layout, block_size=block,
              backend=case["backend"])
    bm, bn = block or default_block_sizes(d)
    ranges = None
    if case["must_do"] != "none" and sk >= 4:
        ranges = [(0, 3), (sk // 2, sk // 2 + 1)] if sk // 2 > 3 else [(0, 3)]  # apart: a flat list ascends
    flat = [x for r in ranges for x in r] if ranges else None
    if flat and case["must_do"] == "descending":
        flat = flat[::-1]
    if broken == "layout":
        kw["layout"] = "bsdh"
    elif broken == "threshold":
        kw["threshold"] = [0.5, 0.0, math.nan][case["seed"] % 3]
    elif broken == "scale":
        kw["scale"] = [-1.0, 0.0, math.inf][case["seed"] % 3]
    elif broken == "must_do":
        ranges = [[(5, 3)], [(-1, 2)], [(0, sk + 1)], [(1,)]][case["seed"] % 4]
        flat = None
    elif broken == "must_do_list":
        flat = [[0, 4, 2], [0, 4, 2, 6], [3, 1, 2, 8]][case["seed"] % 3]
    elif broken == "block_size":
        kw["block_size"] = [(24, 16), (16,), (512, 16)][case["seed"] % 3]
    state = None
    if case["state"] != "none" or broken and broken.startswith("state"):
        state = _state(case, b, h, sq, sk, bm, bn, gen)
    return (q, k, v), args, kw, ranges, flat, state


def _state(case, b, h, sq, sk, bm, bn, gen):
    broken = case["broken"]
    if broken == "state_type":
        return "fresh"
    qt, kt = num_tiles(sq, bm), num_tiles(sk, bn)
    if broken in ("state_index", "state_repeat", "state_count"):
        counts = torch.full((b, h, qt), kt, dtype=torch.int32)
        indices = torch.arange(kt, dtype=torch.int16).expand(b, h, qt, kt).clone()
        if broken == "state_index":
            indices[0, 0, 0, kt - 1] = kt + 98
        elif broken == "state_repeat" and kt >= 2:
            counts[0, 0, 0] = 2
            indices[0, 0, 0, :2] = 0
        elif broken == "state_repeat":  # one key tile cannot be listed twice within a count <= KT
            indices[0, 0, 0, 0] = 5
        else:
            counts[0, 0, 0] = [-1, kt + 1][case["seed"] % 2]
        return SkipState(counts, indices, sq, sk, bm, bn)  # raises: the bad state is refused when built
    if case["state"] == "fresh":
        return SkipState.full(b, h, sq, sk, bm, bn)
    if case["state"] == "other_shape":
        return SkipState.full(b, h, sq + 16, sk, bm, bn)
    mask = torch.rand(b, h, qt, kt, generator=gen) < 0.6
    mask[..., 0] |= ~mask.any(-1)
    state = SkipState.from_dense(mask, sq, sk, bm, bn)
    if case["state"] == "shuffled":  # the same tiles in another visiting order
        keys = torch.where(torch.arange(kt) < state.kv_num_blocks[..., None], torch.rand(b, h, qt, kt,
                                                                                          generator=gen), 2.0)
        order = keys.argsort(-1)
        state = SkipState(state.kv_num_blocks.clone(), state.kv_indices.gather(-1, order).contiguous(), sq, sk,
                          bm, bn)
    return state


def _call(case, args, kw, ranges, flat, state):
    """The API call(s) of the case: outputs and the next state. The module takes the ranges in the case's form
    (pairs, or the flat list ascending or descending); the functional form takes pairs."""
    if case["module"]:
        as_flat = flat is not None and (case["must_do"] in ("flat", "descending") or case["broken"] == "must_do_list")
        attn = LiteAttention(kw["threshold"], must_do=None if as_flat else ranges, must_do_list=flat if as_flat else None,
                             layout=kw["layout"], block_size=kw["block_size"], backend=kw["backend"])
        attn.state = state
        first = attn(*args, scale=kw["scale"])
        second = attn(*args, scale=kw["scale"])
        return [first, second], attn.state
    out, nxt = lite_attention(*args, state, must_do=ranges, **kw)
    return [out], nxt


def _reference(case, qkv, ranges, state, steps):
    """The reference over the same tiles: the outputs (BHSD), the final state, and the first step's input state
    and per-visit scores."""
    q, k, v = qkv
    b, h, sq, d = q.shape
    bm, bn = case["block"] or default_block_sizes(d)
    if state is None:
        state = SkipState.full(b, h, sq, k.shape[2], bm, bn)
    first = state
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, write, scores = [], case["threshold"] > -math.inf, None
    for _ in range(steps):
        out, _, (counts, indices), step_scores = lite_attention_reference(
            q, k, v, state, case["threshold"], case["scale"], ranges, compute_dtype=compute, write_state=write,
            return_scores=True)
        outs.append(out)
        scores = step_scores if scores is None else scores
        state = SkipState(counts, indices, sq, k.shape[2], bm, bn)
    return outs, state, first, scores


def _lists(state):
    rows = state.kv_indices.flatten(0, 2).tolist()
    return [row[:n] for row, n in zip(rows, state.kv_num_blocks.flatten().tolist())]


def _tile_scores(state, scores):
    """Per-visit scores (B, H, QT, KT) of the reference -> per key tile, NaN for tiles not visited."""
    kt = state.shape[-1]
    full = (state.kv_num_blocks == kt)[..., None]
    visiting = torch.where(full, torch.arange(kt).expand(state.shape), state.kv_indices.long())
    valid = torch.arange(kt) < state.kv_num_blocks[..., None]
    out = torch.full(state.shape[:-1] + (kt + 1,), math.nan, dtype=scores.dtype)
    out.scatter_(-1, torch.where(valid, visiting, kt), scores)
    return out[..., :kt]


def _check(case):
    broken = case["broken"]
    expected = BREAKS[broken]
    event(f"bad {broken}" if broken else "valid")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            qkv, args, kw, ranges, flat, state = _build(case)
            before = state.clone() if isinstance(state, SkipState) else state  # the calls reuse its buffers
            outs, nxt = _call(case, args, kw, ranges, flat, state)
        except ValueError as err:
            assert expected is not None, f"a valid case raised: {err}"
            assert str(err).startswith(expected), f"expected a ValueError naming {expected!r}, got: {err}"
            return
    assert expected is None, f"a case with a bad {broken} did not raise"
    if case["state"] == "other_shape":
        assert any("starting a fresh state" in str(w.message) for w in seen)
    ref_outs, ref_state, first, scores = _reference(case, qkv, ranges,
                                                    None if case["state"] == "other_shape" else before, len(outs))
    for out, ref in zip(outs, ref_outs):
        out = out.transpose(1, 2) if case["layout"] == "bshd" else out
        assert out.dtype == qkv[0].dtype and out.shape == ref.shape
        if case["backend"] == "torch":
            torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        else:
            assert torch.equal(out.isfinite(), ref.isfinite())
            finite = ref.isfinite()
            tol = 6e-3 if out.dtype == torch.float16 else 4e-2
            torch.testing.assert_close(out.float()[finite], ref.float()[finite], rtol=0, atol=tol)
    if case["backend"] == "torch":
        assert _lists(nxt) == _lists(ref_state)
    else:  # rounding may flip a tile scored within a hair of the threshold, and only such a tile
        disagree = nxt.to_dense() != ref_state.to_dense()
        near = (_tile_scores(first, scores) - case["threshold"]).abs() < 1e-2
        assert not (disagree & ~near).any(), "the kernel and the reference disagree away from the threshold"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases("torch"))
def test_pytorch_path_raises_value_error_or_equals_the_reference(case):
    _check(case)


# The interpreter is slow: fewer cases and no shrinking (the failing case is printed as found).
@settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases("triton"))
def test_triton_kernel_raises_value_error_or_equals_the_reference(case, kernel_device):
    if kernel_device != "cpu":
        pytest.skip("the Triton fuzz builds its inputs on the CPU (the interpreter); kernels on a GPU are "
                    "tested in test_kernel.py")
    _check(case)
