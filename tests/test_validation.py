"""Bad input gives a ValueError naming the argument, before anything is computed."""
from __future__ import annotations

import pytest
import torch

from liteattn import LiteAttention, SkipState, lite_attention


@pytest.fixture
def qkv(gen):
    """Valid (B, S, H, D) inputs: 1 batch, 40 tokens, 4 query heads, 2 key/value heads, head_dim 32."""
    q = torch.randn(1, 40, 4, 32, generator=gen)
    k = torch.randn(1, 40, 2, 32, generator=gen)
    v = torch.randn(1, 40, 2, 32, generator=gen)
    return q, k, v


def test_valid_inputs_pass(qkv):
    out, state = lite_attention(*qkv, block_size=(16, 16))
    assert out.shape == qkv[0].shape and state.calls == 1


@pytest.mark.parametrize("which,shape,match", [
    ("q", (1, 40, 4), "q: expected a 4-D tensor"),
    ("k", (1, 40, 2, 32, 1), "k: expected a 4-D tensor"),
    ("v", (40, 2, 32), "v: expected a 4-D tensor"),
])
def test_wrong_rank(qkv, which, shape, match):
    args = dict(zip("qkv", qkv))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        lite_attention(args["q"], args["k"], args["v"])


def test_rank_message_names_the_layout(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"\(B, H, S, D\) for layout='bhsd'"):
        lite_attention(q[0], k, v, layout="bhsd")


@pytest.mark.parametrize("change,match", [
    (dict(k=(2, 40, 2, 32), v=(2, 40, 2, 32)), "k: batch size 2 does not match q's 1"),
    (dict(k=(1, 40, 2, 16), v=(1, 40, 2, 16)), "k: head_dim 16 does not match q's 32"),
    (dict(v=(1, 41, 2, 32)), "k, v: expected equal shapes"),
    (dict(v=(1, 40, 1, 32)), "k, v: expected equal shapes"),
    (dict(k=(1, 40, 3, 32), v=(1, 40, 3, 32)), "k: 3 key/value heads must divide q's 4 heads"),
    (dict(q=(1, 0, 4, 32)), "empty dimension"),
    (dict(k=(1, 0, 2, 32), v=(1, 0, 2, 32)), "empty dimension"),
])
def test_mismatched_shapes(qkv, change, match):
    args = dict(zip("qkv", qkv))
    for name, shape in change.items():
        args[name] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        lite_attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gqa_check_reads_heads_from_the_layout(gen, layout):
    """4 query heads over 3 key heads is rejected in either layout (heads sit on another axis)."""
    q = torch.randn(1, 4, 40, 32, generator=gen)
    k = torch.randn(1, 3, 40, 32, generator=gen)
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    with pytest.raises(ValueError, match="key/value heads must divide"):
        lite_attention(q, k, k.clone(), layout=layout)


def test_not_a_tensor(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q: expected a torch.Tensor, got list"):
        lite_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="v: expected a torch.Tensor, got ndarray"):
        lite_attention(q, k, v.numpy())


def test_dtypes(qkv, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may use the Triton backend: reach the dtype check
    q, k, v = qkv
    with pytest.raises(ValueError, match="q, k, v: expected one dtype"):
        lite_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="q.dtype"):
        lite_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="q.dtype.*bf16/fp16"):
        lite_attention(q, k, v, backend="triton", block_size=(16, 16))  # fp32 is not a kernel dtype


def test_unsupported_head_dim_for_the_kernel(gen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may use the Triton backend: reach the head_dim check
    q, k, v = (torch.randn(1, 40, 2, 40, generator=gen).half() for _ in range(3))
    with pytest.raises(ValueError, match="head_dim: the kernel supports multiples of 16.*got 40"):
        lite_attention(q, k, v, backend="triton", block_size=(16, 16))
    out, _ = lite_attention(q.float(), k.float(), v.float(), backend="torch", block_size=(16, 16))
    assert out.shape == q.shape  # the reference takes any head_dim


def test_tensors_on_different_devices(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q, k, v: expected one device.*k on meta"):
        lite_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="q, k, v: expected one device.*q on meta"):
        lite_attention(q.to("meta"), k, v)


@pytest.mark.parametrize("threshold", [0.0, 0, 1.0, 3, float("nan"), float("inf"), "low", None, [-1.0]])
def test_bad_threshold(qkv, threshold):
    with pytest.raises(ValueError, match="threshold"):
        lite_attention(*qkv, threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        LiteAttention(threshold=threshold if not isinstance(threshold, list) else [threshold])


def test_bad_threshold_schedule():
    with pytest.raises(ValueError, match="threshold"):
        LiteAttention(threshold=[])
    with pytest.raises(ValueError, match="threshold"):
        LiteAttention(threshold=[-1.0, 0.5])


@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf"), float("nan")])
def test_bad_scale(qkv, scale):
    with pytest.raises(ValueError, match="scale"):
        lite_attention(*qkv, scale=scale)


@pytest.mark.parametrize("scale", ["abc", [0.1]])
def test_non_numeric_scale(qkv, scale):
    with pytest.raises(ValueError, match="scale"):
        lite_attention(*qkv, scale=scale)


@pytest.mark.parametrize("must_do,match", [
    ([(0, 41)], r"must_do: range \(0, 41\)"),
    ([(-1, 10)], r"must_do: range \(-1, 10\)"),
    ([(10, 10)], r"must_do: range \(10, 10\)"),
    ([(12, 5)], r"must_do: range \(12, 5\)"),
    ([(0, 10), (5, 20)], "must_do: ranges .* overlap"),
    ([(30, 40), (0, 31)], "must_do: ranges .* overlap"),  # unsorted input is sorted first
    ([(0, 10, 20)], "must_do: expected \\(start, end\\) pairs"),
    ([5], "must_do: expected \\(start, end\\) pairs"),
    ((0, 10), "must_do: expected \\(start, end\\) pairs"),  # a bare pair instead of a list of pairs
    ([("a", "b")], "must_do: expected \\(start, end\\) pairs"),
])
def test_bad_must_do(qkv, must_do, match):
    with pytest.raises(ValueError, match=match):
        lite_attention(*qkv, must_do=must_do)


def test_adjacent_must_do_ranges_are_fine(qkv):
    out, _ = lite_attention(*qkv, must_do=[(0, 10), (10, 20)], block_size=(16, 16))
    assert not out.isnan().any()


def test_non_iterable_must_do(qkv):
    with pytest.raises(ValueError, match="must_do"):
        lite_attention(*qkv, must_do=5)


@pytest.mark.parametrize("flat,match", [
    ([0, 10, 20], "must_do_list: expected an even-length"),
    ([10, 10], "must_do_list: expected strictly ascending"),
    ([0, 10, 5, 20], "must_do_list: expected strictly ascending"),
    ([20, 5, 10, 0], "or strictly descending"),
    ([0, 100], r"must_do: range \(0, 100\)"),
    ([100, 0], r"must_do: range \(0, 100\)"),
    ([0.5, 10], "must_do_list: expected a flat list of int"),
    ("0, 10", "must_do_list: expected a flat list"),
])
def test_bad_must_do_list(qkv, flat, match):
    attn = LiteAttention(block_size=(16, 16))
    with pytest.raises(ValueError, match=match):
        attn(*qkv, must_do_list=flat)
    assert attn.step == 0 and attn.state is None  # a rejected call changes nothing


@pytest.mark.parametrize("layout", ["BSHD", "bsh", "", None])
def test_bad_layout(qkv, layout):
    with pytest.raises(ValueError, match="layout"):
        lite_attention(*qkv, layout=layout)
    with pytest.raises(ValueError, match="layout"):
        LiteAttention(layout=layout)


@pytest.mark.parametrize("block_size,match", [
    ((16,), "block_size: expected \\(block_m, block_n\\)"),
    ((16, 16, 16), "block_size: expected \\(block_m, block_n\\)"),
    (16, "block_size: expected \\(block_m, block_n\\)"),
    (("a", 16), "block_size: expected"),
    ((24, 16), "block_m must be a power of two in \\[16, 256\\], got 24"),
    ((16, 8), "block_n must be a power of two in \\[16, 256\\], got 8"),
    ((512, 16), "block_m must be a power of two"),
    ((0, 16), "block_m must be a power of two"),
    ((-16, 16), "block_m must be a power of two"),
])
def test_bad_block_size(qkv, block_size, match):
    with pytest.raises(ValueError, match=match):
        lite_attention(*qkv, block_size=block_size)
    with pytest.raises(ValueError, match=match):
        LiteAttention(block_size=block_size)


def test_fractional_block_size(qkv):
    with pytest.raises(ValueError, match="block_size"):
        lite_attention(*qkv, block_size=(16.5, 16))


@pytest.mark.parametrize("backend", ["cuda", "TRITON", "", None])
def test_bad_backend(qkv, backend):
    with pytest.raises(ValueError, match="backend"):
        lite_attention(*qkv, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        LiteAttention(backend=backend)(*qkv)


def test_triton_on_cpu_needs_the_interpreter(qkv, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (x.half() for x in qkv)
    with pytest.raises(ValueError, match="backend='triton' with CPU tensors needs TRITON_INTERPRET=1"):
        lite_attention(q, k, v, backend="triton")


def test_bad_state(qkv):
    with pytest.raises(ValueError, match="state: expected a liteattn.SkipState or None, got Tensor"):
        lite_attention(*qkv, torch.zeros(1, 4, 3, dtype=torch.int32))


def test_must_do_and_must_do_list_together(qkv):
    with pytest.raises(ValueError, match="must_do and must_do_list"):
        LiteAttention()(*qkv, must_do=[(0, 4)], must_do_list=[0, 4])


def test_zero_head_dim(qkv):
    """head_dim 0 would divide by zero in the default scale."""
    q, k, v = (x[..., :0] for x in qkv)
    with pytest.raises(ValueError, match="head_dim|empty"):
        lite_attention(q, k, v)


def test_state_is_untouched_by_a_rejected_call(qkv):
    state = SkipState.full(1, 4, 40, 40, 16, 16)
    before = state.clone()
    with pytest.raises(ValueError):
        lite_attention(*qkv, state, threshold=1.0)
    assert torch.equal(state.kv_num_blocks, before.kv_num_blocks) and state._spare is None


@pytest.mark.parametrize("flat,ranges", [
    ([2, 12, 40, 45, 60, 80], [(2, 12), (40, 45), (60, 80)]),  # the CUDA LiteAttention's v0.2 README
    ([80, 60, 45, 40, 12, 2], [(2, 12), (40, 45), (60, 80)]),  # its earlier README: descending, same tokens
    ([10, 0], [(0, 10)]),
    ([], []),
])
def test_must_do_list_reads_both_upstream_formats(flat, ranges):
    from liteattn._validation import flat_to_ranges

    assert flat_to_ranges(flat) == ranges
    assert LiteAttention(must_do_list=flat).must_do == ranges  # also a constructor argument


def test_must_do_list_and_must_do_together_are_refused():
    with pytest.raises(ValueError, match="must_do and must_do_list: pass one of them"):
        LiteAttention(must_do=[(0, 10)], must_do_list=[0, 10])


def test_meta_tensors_are_refused(qkv):
    q, k, v = (x.to("meta") for x in qkv)
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match="'meta' device hold no values"):
            lite_attention(q, k, v, backend=backend)
    with pytest.raises(ValueError, match="'meta' device hold no values"):
        LiteAttention()(q, k, v)
