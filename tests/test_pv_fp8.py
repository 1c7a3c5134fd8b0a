"""fp8 P.V (``pv_dtype="fp8"``, with ``qk_dtype="int8"``): the reference's rules e-g, the V rounding pass against
them, the Hopper kernel against the reference (on an sm90 GPU), its offline sm90a build, and the arguments it
refuses. P.V in fp8 runs only in the Hopper kernel and the PyTorch reference; elsewhere the call is refused by
name."""
from __future__ import annotations

import pytest
import torch

from liteattn import LiteAttention, LiteAttentionConfig, SkipState, lite_attention
from liteattn.reference import _rounded_p, _rounded_v, lite_attention_reference

ON_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
E4M3 = torch.float8_e4m3fn


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum())


def test_the_reference_rounds_v_per_channel_and_p_through_float16():
    """Rule e: one scale per (batch, kv-head, channel), absmax / 448, values rounded to e4m3 (a zero channel keeps
    scale 1); rule f: P times 448, to float16, to e4m3; rule g: a kv-head holding a non-finite value is left
    unrounded."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 50, 16, generator=gen) * torch.logspace(-3, 2, 16)
    v[1, 2] = 0.0
    v[0, 1, 7, 4] = float("nan")
    got = _rounded_v(v)
    for b, h in ((0, 0), (1, 0), (1, 1)):
        scale = v[b, h].abs().amax(0) / 448
        want = (v[b, h] / scale).to(E4M3).double() * scale.double()
        torch.testing.assert_close(got[b, h].double(), want, rtol=1e-6, atol=0)
        assert got[b, h].abs().amax(0).sub(v[b, h].abs().amax(0)).abs().max() < 1e-6  # the absmax maps to 448
    assert torch.equal(got[1, 2], v[1, 2])  # zeros stay zeros (scale 1)
    assert torch.equal(got[0, 1].isnan(), v[0, 1].isnan())
    assert torch.equal(got[0, 1].nan_to_num(), v[0, 1].nan_to_num())  # unrounded: the kv-head holds a NaN
    p = torch.rand(1000, generator=gen)
    assert torch.equal(_rounded_p(p), (p * 448).half().to(E4M3).float() / 448)
    # the two roundings differ from one where fp32 -> fp16 lands on an e4m3 tie
    t = torch.tensor([(8.5 + 2 ** -12) / 448])  # fp16 drops the tiny part, and 8.5 is a tie of e4m3 (8 or 9)
    assert _rounded_p(t) * 448 == 8.0 and (t * 448).to(E4M3).float() == 9.0


def test_fp8_pv_changes_only_the_product(local_qkv, gen):
    """The rule leaves the running max, the sums, the skip decisions and the lse as int8 Q.K^T alone computes them;
    the output moves by P's and V's rounding, by about as much as e4m3's step (2^-4) allows."""
    q, k, v = local_qkv(1, 300, 4, 2, 64, generator=gen, strength=2.0)
    v = v + 0.5 * torch.randn(64, generator=gen)  # channels with a mean, as V of a DiT has
    full = SkipState.full(1, 4, 300, 300, 64, 64)
    want, want_lse, (want_c, want_i) = lite_attention_reference(q, k, v, full, -2.0, qk_dtype="int8")
    got, lse, (c, i) = lite_attention_reference(q, k, v, full, -2.0, qk_dtype="int8", pv_dtype="fp8")
    assert torch.equal(c, want_c) and torch.equal(i, want_i) and int(c.sum()) < int(full.kv_num_blocks.sum())
    assert torch.equal(lse, want_lse)
    assert 1e-4 < _rel_l1(got, want) < 6e-2


def test_bad_arguments_are_named():
    q = torch.zeros(1, 64, 2, 32)
    with pytest.raises(ValueError, match="pv_dtype: expected None or 'fp8'"):
        lite_attention(q, q, q, qk_dtype="int8", pv_dtype="int8")
    with pytest.raises(ValueError, match=r"pv_dtype: .*pass the string 'fp8'"):
        lite_attention(q, q, q, qk_dtype="int8", pv_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="pv_dtype='fp8': fp8 P.V comes with 8-bit Q.K\\^T; expected qk_dtype='int8'"):
        lite_attention(q, q, q, pv_dtype="fp8")
    with pytest.raises(ValueError, match="pv_dtype='fp8': fp8 P.V comes with 8-bit Q.K\\^T"):
        LiteAttention(pv_dtype="fp8")
    with pytest.raises(ValueError, match="pv_dtype='fp8': fp8 P.V comes with 8-bit Q.K\\^T"):
        LiteAttentionConfig(pv_dtype="fp8")
    with pytest.raises(ValueError, match="pv_dtype: expected None or 'fp8'"):
        LiteAttentionConfig(qk_dtype="int8", pv_dtype="e5m2")
    assert LiteAttentionConfig(qk_dtype="int8", pv_dtype="fp8").pv_dtype == "fp8"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    odd = torch.zeros(1, 64, 2, 96, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="pv_dtype='fp8': the Hopper kernel computes fp8 P.V at head_dim 64 or 128, "
                                         "got head_dim=96"):
        lite_attention(odd, odd, odd, backend="triton", qk_dtype="int8", pv_dtype="fp8")
    out, _ = lite_attention(q, q, q, backend="torch", qk_dtype="int8", pv_dtype="fp8")
    assert out.shape == q.shape and not out.isnan().any()


@pytest.mark.skipif(ON_SM90, reason="the Hopper kernel takes fp8 P.V here")
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_the_portable_kernel_refuses_it_by_name():
    """Where a call runs the portable kernel (another GPU, or Triton's interpreter), fp8 P.V is refused with the
    argument to change, not computed in 16 bits under its name."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(1, 64, 2, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="pv_dtype='fp8': P.V in fp8 runs in the Hopper kernel .* use pv_dtype=None "
                                         "or backend='torch'"):
        lite_attention(x, x, x, backend="triton", qk_dtype="int8", pv_dtype="fp8")


def test_the_stored_key_order_is_the_one_the_p_operand_takes():
    """quantize_v stores position ``16 h + 4 q + 2 u + e`` of each group of 32 keys from key ``16 h + 8 u + 2 q + e``;
    the kernel's P operand renames P's columns by a reshape to ``(32 b, 2 h, 2 u, 4 q, 2 e)`` and a swap of the
    ``u`` and ``q`` axes (sm90._p_operand): the two must be the same permutation, or P meets the wrong keys of V."""
    n = 128
    pos = torch.arange(n)
    stored = pos - pos % 32 + (pos % 32 // 16) * 16 + (pos % 4 // 2) * 8 + (pos % 16 // 4) * 2 + pos % 2
    operand = torch.arange(n).reshape(n // 32, 2, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n)
    assert torch.equal(stored, operand)
    # ... and the kernels' code says the same (their source: under the interpreter a jitted function has none)
    from pathlib import Path

    kernels = Path(__file__).resolve().parents[1] / "liteattn" / "kernels"
    quant, sm90 = ((kernels / name).read_text() for name in ("quant.py", "sm90.py"))
    assert "a - r + (r // 16) * 16 + ((r % 4) // 2) * 8 + ((r % 16) // 4) * 2 + r % 2" in quant
    assert "[ROWS, N // 32, 2, 2, 4, 2]" in sm90 and "gl.permute(p16, [0, 1, 2, 4, 3, 5])" in sm90


def test_an_unsupported_head_dim_falls_back_with_its_reason_in_the_integration():
    """The integration runs the model's own attention for a layer whose head_dim fp8 P.V cannot take on the kernels
    (counted under its own reason), and liteattn's for 64 and 128."""
    from liteattn.integrations.layer import input_fallback_reason

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dim, want in ((96, "head_dim for fp8 P.V"), (128, None), (64, None)):
        q = torch.zeros(1, 8, 2, dim, dtype=torch.bfloat16, device=device)
        assert input_fallback_reason("triton", q, "int8", "fp8") == want
        assert input_fallback_reason("triton", q, "int8") is None
    assert input_fallback_reason("torch", torch.zeros(1, 8, 2, 96), "int8", "fp8") is None


def test_the_kernel_records_refuse_fp8_pv_without_int8_scores():
    from liteattn.kernels.common import KernelCall
    from liteattn.kernels.dispatch import KernelSpec

    with pytest.raises(ValueError, match="pv8: expected a bool, True only for the sm90 kernel with qk8"):
        KernelSpec("sm90", 128, 128, "full", "index", pv8=True)
    with pytest.raises(ValueError, match="pv8: expected a bool, True only for the sm90 kernel with qk8"):
        KernelSpec("triton", 128, 128, "full", "index", qk8=True, pv8=True)
    x = torch.zeros(1, 1, 16, 64)
    n = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="pv8: P.V in fp8 is built on the int8 Q.K\\^T path; expected qk8=True"):
        KernelCall(x, x, x, n, n, n, n, n, n, 0.125, -1.0, 128, 128, "full", False, False, pv8=True)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_the_v_rounding_pass_follows_the_reference(kernel_device):
    """quantize_v: V transposed per kv-head (keys last, zero past S_k), keys of each group of 32 in the order the
    kernel's P operand takes them, one scale per channel, the bad flag per kv-head. On the CPU (Triton's
    interpreter, whose float8 conversion drops the carry into the next binade) the values are chosen exactly
    representable, so the layout, scales and flags are what is checked; on a GPU random values check the rounding
    too."""
    pytest.importorskip("triton")
    from liteattn.kernels.quant import quantize_v

    gen = torch.Generator().manual_seed(1)
    seq_k, block_n = 150, 64
    if kernel_device == "cpu":
        codes = torch.randint(-120, 121, (1, seq_k, 3, 64), generator=gen).to(torch.int8).view(E4M3).float()
        codes = codes.nan_to_num(0.0)  # the code 0x7f / 0xff is NaN
        codes[0, 0] = 448.0  # every channel's absmax 448: scale 1 ... times a power of two per channel
        v = codes * 2.0 ** torch.randint(-4, 4, (64,), generator=gen).float()
    else:
        v = torch.randn(1, seq_k, 3, 64, generator=gen) * torch.logspace(-2, 1, 64)
    v[0, 99, 2, 5] = float("inf")  # kv-head 2 computes in 16 bits
    v = v.bfloat16().transpose(1, 2)  # a BHSD view of BSHD storage, as the kernels get it
    got = quantize_v(v.to(kernel_device), block_n)
    vt, scale, bad = got.vt.cpu(), got.v_scale.cpu(), got.bad.cpu()
    assert vt.shape == (1, 3, 64, 3 * block_n) and vt.dtype == E4M3 and bad.tolist() == [0, 0, 1]
    pos = torch.arange(vt.shape[-1])
    key = pos - pos % 32 + (pos % 32 // 16) * 16 + (pos % 4 // 2) * 8 + (pos % 16 // 4) * 2 + pos % 2
    assert torch.equal(key.sort().values, pos)  # a permutation within each group of 32
    by_key = torch.empty(vt.shape)
    by_key[..., key] = vt.float()
    assert by_key[..., seq_k:].eq(0).all()
    good = v[0, :2].float()
    want_scale = good.abs().amax(1) / 448
    assert torch.equal(scale[0, :2], want_scale)  # IEEE division, as the reference's
    assert torch.equal(by_key[0, :2, :, :seq_k].transpose(-1, -2), (good / want_scale[:, None]).to(E4M3).float())
    deq = (by_key[..., :seq_k] * scale[..., None]).transpose(-1, -2)
    assert torch.equal(deq[0, :2], _rounded_v(v.float())[0, :2])
    finite = v[0, 2].float().isfinite()
    assert deq[0, 2][~finite].eq(0).all()


CASES = [
    pytest.param(4, 2, 1000, 1000, 128, (128, 128), [(0, 77)], id="d128-gqa-mustdo"),
    pytest.param(2, 2, 700, 650, 64, (128, 64), None, id="d64-ragged"),
]


@pytest.mark.skipif(not ON_SM90, reason="fp8 P.V runs in the Hopper (sm90) kernel")
@pytest.mark.parametrize("heads,kv_heads,seq_q,seq_k,head_dim,block,must_do", CASES)
def test_the_hopper_kernel_follows_the_reference(heads, kv_heads, seq_q, seq_k, head_dim, block, must_do, local_qkv,
                                                 gen, threshold_clear_of_scores):
    """The same decisions and lse as int8 Q.K^T, and an output nearer the fp8 reference than int8's is: the
    comparison tells the two products apart."""
    q, k, v = (x.bfloat16() for x in local_qkv(1, seq_q, heads, kv_heads, head_dim, seq_len_k=seq_k, generator=gen,
                                                strength=2.0))
    k = k + 1.5 * torch.randn(head_dim, generator=gen).bfloat16()
    threshold = threshold_clear_of_scores(q, k, v, block, must_do, qk_dtype="int8")
    full = SkipState.full(1, heads, seq_q, seq_k, *block)
    want, want_lse, (want_counts, want_indices) = lite_attention_reference(q, k, v, full, threshold, None, must_do,
                                                                           qk_dtype="int8", pv_dtype="fp8")
    want16pv, _, _ = lite_attention_reference(q, k, v, full, threshold, None, must_do, qk_dtype="int8")
    on = [x.cuda() for x in (q, k, v)]
    state0 = SkipState.full(1, heads, seq_q, seq_k, *block, device="cuda")
    out, lse, state = lite_attention(*on, state0, threshold=threshold, must_do=must_do, layout="bhsd",
                                     return_lse=True, backend="triton", qk_dtype="int8", pv_dtype="fp8")
    marked = SkipState(want_counts, want_indices, seq_q, seq_k, *block)
    assert int(want_counts.sum()) < int(full.kv_num_blocks.sum()), "inputs should let the rule mark tiles"
    assert torch.equal(state.to("cpu").to_dense(), marked.to_dense()), "the kernel marked other tiles"
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=0, atol=2e-3)
    apart = _rel_l1(want16pv, want)
    assert _rel_l1(out.cpu(), want) < 0.3 * apart, (_rel_l1(out.cpu(), want), apart)
    # Elementwise, a weight of P whose float32 value lies within the exp2's last bits of an e4m3 tie may round the
    # other way in the kernel (its exp2 is not the reference's exp): one step of 2^-4 of that weight. So a few
    # elements may differ by that much, not more than that in a thousand.
    far = (out.float().cpu() - want.float()).abs() > 4e-2
    assert far.float().mean() < 1e-3, far.float().mean()
    # the next call walks the carried lists with fp8 P.V too
    out2, _ = lite_attention(*on, state, threshold=float("-inf"), layout="bhsd", backend="triton", qk_dtype="int8",
                             pv_dtype="fp8")
    want2, _, _ = lite_attention_reference(q, k, v, marked, float("-inf"), None, must_do, qk_dtype="int8",
                                           pv_dtype="fp8")
    assert _rel_l1(out2.cpu(), want2) < 0.3 * apart


@pytest.mark.skipif(not ON_SM90, reason="fp8 P.V runs in the Hopper (sm90) kernel")
def test_a_non_finite_value_of_v_computes_its_kv_head_in_16_bits(local_qkv, gen):
    """Rule g on the GPU: the query tiles of a kv-head whose V holds a non-finite value are the 16-bit reference's
    (NaN where dense attention has NaN), every other head the fp8 reference's."""
    q, k, v = (x.bfloat16() for x in local_qkv(1, 300, 4, 2, 128, generator=gen))
    v[0, 1, 40, 7] = float("nan")  # kv-head 1: heads 2 and 3
    full = SkipState.full(1, 4, 300, 300, 128, 128)
    want8, _, _ = lite_attention_reference(q, k, v, full, -1.0, qk_dtype="int8", pv_dtype="fp8")
    want16, _, _ = lite_attention_reference(q, k, v, full, -1.0)
    out, _ = lite_attention(*(x.cuda() for x in (q, k, v)), threshold=-1.0, layout="bhsd", backend="triton",
                            qk_dtype="int8", pv_dtype="fp8")
    out = out.float().cpu()
    assert torch.equal(out[0, 2:].isnan(), want16[0, 2:].float().isnan()) and out[0, 2:].isnan().any()
    finite = want16[0, 2:].float().isfinite()
    torch.testing.assert_close(out[0, 2:][finite], want16[0, 2:].float()[finite], rtol=0, atol=2e-2)
    assert not out[0, :2].isnan().any()
    assert _rel_l1(out[0, :2], want8[0, :2]) < 1e-2


_V_KERNELS = {
    "_value_absmax": ({"V": "*bf16", "AMAX": "*fp32", "BAD": "*i32"},
                      {"BLOCK_S": 32, "BLOCK_D": 128, "KEYS_PER_CHUNK": 512}),
    "_value_scales": ({"AMAX": "*fp32", "BAD": "*i32", "V_SCALE": "*fp32", "V_BAD": "*i8"},
                      {"BLOCK_C": 8, "BLOCK_D": 128}),
    "_round_values": ({"V": "*bf16", "V_SCALE": "*fp32", "VT": "*fp8e4nv"}, {"BLOCK_N": 128, "BLOCK_D": 128}),
}


@pytest.mark.parametrize("name", sorted(_V_KERNELS))
def test_the_v_rounding_pass_builds_for_sm90_rounding_as_the_reference(name):
    """V's rounding kernels compile for a GPU, divide with IEEE rounding and convert to e4m3 to nearest (the
    reference's rules; Triton's interpreter cannot show either)."""
    pytest.importorskip("triton")
    from sm90_build import compile_rounding_sm90

    ptx = compile_rounding_sm90(name, *_V_KERNELS[name])["ptx"]
    assert "div.full" not in ptx and "div.approx" not in ptx
    if name != "_value_absmax":
        assert "div.rn.f32" in ptx
    if name == "_round_values":
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx


@pytest.mark.parametrize("head_dim,walk,write_state", [(128, "list", True), (64, "full", False)])
def test_the_fp8_product_builds_for_sm90_without_spills(head_dim, walk, write_state):
    """The fp8 P.V specialization compiles for sm90a (the interpreter accepts code the compiler refuses): an fp8
    wgmma (QGMMA) in its tile loops, no spills at the consumers' register budget, and P handed to the product
    without shuffles between threads (the layout change is checked trivial at compile time)."""
    pytest.importorskip("triton")
    from sm90_build import compile_sm90, sass, tile_loops

    built = compile_sm90(head_dim, 128, walk, write_state, qk8=True, pv8=True)
    assert "0 bytes spill stores" in built["log"] and "0 bytes spill loads" in built["log"]
    loops = tile_loops(sass(built["cubin"]))
    assert len(loops) == 2 and all(any("QGMMA" in line for line in body) for body in loops)
    # the row maxima's shuffles are int8 Q.K^T's: P reaches its product without any of its own
    int8 = tile_loops(sass(compile_sm90(head_dim, 128, walk, write_state, qk8=True)["cubin"]))
    shuffles = [sum("SHFL" in line for line in body) for body in loops]
    assert shuffles == [sum("SHFL" in line for line in body) for body in int8]
