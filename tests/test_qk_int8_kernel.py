"""The kernels' 8-bit Q.K^T (``qk_dtype="int8"``) against the reference's: the same rounded scores (K smoothed, one
scale per tile), the same skip decisions carried to the next call, the log-sum-exp of the unsmoothed scores, and
non-finite tokens handled as the reference does. On a CPU the portable kernel runs in Triton's interpreter (tiny
shapes); on a GPU the same cases run compiled, plus one at a DiT's head_dim and tiles."""
from __future__ import annotations

import pytest
import torch

from liteattn import SkipState, lite_attention
from liteattn.reference import lite_attention_reference

pytest.importorskip("triton")
from liteattn.kernels.quant import quantize_qk  # noqa: E402
from sm90_build import compile_rounding_sm90  # noqa: E402

ON_GPU = torch.cuda.is_available()
CASES = [
    # dtype, heads, kv_heads, seq_q, seq_k, head_dim, block, must_do
    pytest.param(torch.float16, 2, 1, 75, 70, 32, (16, 16), None, id="fp16-ragged-mqa"),
    pytest.param(torch.bfloat16, 4, 2, 96, 96, 32, (16, 16), [(0, 10), (60, 63)], id="bf16-gqa-mustdo"),
    pytest.param(torch.bfloat16, 1, 1, 130, 128, 64, (32, 64), None, id="bf16-d64"),
]
if ON_GPU:
    CASES += [pytest.param(torch.bfloat16, 4, 2, 1000, 1000, 128, (128, 64), [(0, 77)], id="gpu-d128-gqa-mustdo")]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize("dtype,heads,kv_heads,seq_q,seq_k,head_dim,block,must_do", CASES)
def test_the_kernel_follows_the_reference(dtype, heads, kv_heads, seq_q, seq_k, head_dim, block, must_do,
                                          local_qkv, gen, kernel_device, threshold_clear_of_scores):
    q, k, v = (x.to(dtype) for x in local_qkv(1, seq_q, heads, kv_heads, head_dim, seq_len_k=seq_k, generator=gen,
                                              strength=2.0))
    k = k + 1.5 * torch.randn(head_dim, generator=gen).to(dtype)  # a shared component, which smoothing removes
    threshold = threshold_clear_of_scores(q, k, v, block, must_do, qk_dtype="int8")
    full = SkipState.full(1, heads, seq_q, seq_k, *block)
    want, want_lse, (want_counts, want_indices) = lite_attention_reference(q, k, v, full, threshold, None, must_do,
                                                                           qk_dtype="int8")
    on = [x.to(kernel_device) for x in (q, k, v)]
    out, lse, state = lite_attention(*on, SkipState.full(1, heads, seq_q, seq_k, *block, device=kernel_device),
                                     threshold=threshold, must_do=must_do, layout="bhsd", return_lse=True,
                                     backend="triton", qk_dtype="int8")
    marked = SkipState(want_counts, want_indices, seq_q, seq_k, *block)
    assert int(want_counts.sum()) < int(full.kv_num_blocks.sum()), "inputs should let the rule mark tiles"
    assert torch.equal(state.to("cpu").to_dense(), marked.to_dense()), "the kernel marked other tiles"
    assert not out.isnan().any() and not lse.isnan().any()
    tol = 4e-2 if dtype == torch.bfloat16 else 6e-3
    torch.testing.assert_close(out.float().cpu(), want.float(), rtol=0, atol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=0, atol=2e-3)
    # the next call walks the carried lists with 8-bit scores too
    out2, _ = lite_attention(*on, state, threshold=float("-inf"), layout="bhsd", backend="triton", qk_dtype="int8")
    want2, _, _ = lite_attention_reference(q, k, v, marked, float("-inf"), None, must_do, qk_dtype="int8")
    torch.testing.assert_close(out2.float().cpu(), want2.float(), rtol=0, atol=tol)
    # and 8-bit scores are not 16-bit ones: the comparison above could tell them apart
    exact, _, _ = lite_attention_reference(q, k, v, full, threshold, None, must_do)
    assert (exact.float() - want.float()).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("seq,head_dim,block", [(75, 32, 16)] + ([(300, 128, 128)] if ON_GPU else []),
                         ids=["small"] + (["gpu-d128"] if ON_GPU else []))
def test_non_finite_tokens_follow_the_reference(seq, head_dim, block, local_qkv, gen, kernel_device):
    """A query tile that meets a non-finite token (its own rows, or its kv-head's keys) computes in 16 bits: its rows
    and decisions are the reference's without 8-bit QK, which the reference's 8-bit rule makes equal for the
    non-finite rows; every other query tile is the 8-bit reference's. On a Hopper GPU the ``gpu-d128`` case runs the
    sm90 kernel, which leaves those query tiles to the portable kernel."""
    q, k, v = (x.bfloat16() for x in local_qkv(2, seq, 4, 2, head_dim, generator=gen))
    q[0, 1, 5, 3] = float("nan")  # a bad query row: its tile is NaN
    q[1, 0, seq - 35, 2] = float("-inf")
    k[1, 1, 20, 0] = float("inf")  # a bad key: every query tile of heads 2 and 3 of batch 1
    full = SkipState.full(2, 4, seq, seq, block, block)
    want8, lse8, (counts8, _) = lite_attention_reference(q, k, v, full, -1.0, qk_dtype="int8")
    want16, lse16, (counts16, _) = lite_attention_reference(q, k, v, full, -1.0)
    sixteen = quantize_qk(q.to(kernel_device), k.to(kernel_device), block, block).sixteen.bool().cpu()  # (B, H, QT)
    qt = -(-seq // block)
    assert sixteen[0, 1, 0] and sixteen[1, 0, (seq - 35) // block] and sixteen[1, 2:].all()
    assert sixteen.sum() == 2 + 2 * qt
    rows = sixteen.repeat_interleave(block, -1)[..., :seq]
    want = torch.where(rows[..., None], want16.float(), want8.float())
    want_lse = torch.where(rows, lse16, lse8)
    on = [x.to(kernel_device) for x in (q, k, v)]
    out, lse, state = lite_attention(*on, SkipState.full(2, 4, seq, seq, block, block, device=kernel_device),
                                     threshold=-1.0, layout="bhsd", return_lse=True, backend="triton",
                                     qk_dtype="int8")
    out, lse = out.float().cpu(), lse.cpu()
    assert want.isnan().any() and torch.equal(out.isnan(), want.isnan()) and torch.equal(want8.isnan(), want.isnan())
    assert torch.equal(lse.isnan(), want_lse.isnan()) and torch.equal(lse.isinf(), want_lse.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(out[finite], want[finite], rtol=0, atol=2e-2)
    torch.testing.assert_close(lse[want_lse.isfinite()], want_lse[want_lse.isfinite()], rtol=0, atol=2e-3)
    assert torch.equal(state.kv_num_blocks.cpu(), torch.where(sixteen, counts16, counts8))


def test_the_16_bit_pass_computes_only_the_flagged_query_tiles(local_qkv, gen, kernel_device):
    """The portable kernel's ``only_sixteen`` pass, which runs after the sm90 kernel passed over the query tiles
    flagged to compute in 16 bits, writes exactly those: their rows are the 16-bit reference's, every other row
    keeps what the sm90 kernel wrote there (here a poison value)."""
    from liteattn.kernels import portable
    from liteattn.kernels.common import FULL_WALK, KernelCall, prepare
    from liteattn.kernels.dispatch import resolve, target_of

    q, k, v = (x.bfloat16() for x in local_qkv(1, 64, 2, 1, 32, generator=gen))
    q[0, 1, 20, 0] = float("nan")  # query tile 1 of head 1 computes in 16 bits
    q, k, v = (x.to(kernel_device) for x in (q, k, v))
    full = SkipState.full(1, 2, 64, 64, 16, 16, device=kernel_device)
    call = KernelCall(q, k, v, full.kv_num_blocks, full.kv_indices, full.kv_num_blocks.clone(),
                      full.kv_indices.clone(), torch.zeros(4, dtype=torch.int8, device=kernel_device),
                      torch.zeros(4, dtype=torch.int8, device=kernel_device), 32 ** -0.5, -1.0, 16, 16, FULL_WALK,
                      False, True, qk8=True)
    spec = resolve(target_of(q.device), q.dtype, 32, 16, 16, FULL_WALK, False, True)
    buffers = prepare(call)
    buffers.out.fill_(7.0)
    buffers.lse.fill_(7.0)
    rounded = quantize_qk(q, k, 16, 16)
    assert rounded.sixteen.sum() == 1 and rounded.sixteen[0, 1, 1] == 1
    portable.launch(spec, call, buffers, None, rounded, only_sixteen=True)
    want, want_lse, _ = lite_attention_reference(q.cpu(), k.cpu(), v.cpu(), SkipState.full(1, 2, 64, 64, 16, 16),
                                                 -1.0)
    out, lse = buffers.out.float().cpu(), buffers.lse.cpu()
    flagged = torch.zeros(1, 2, 64, dtype=torch.bool)
    flagged[0, 1, 16:32] = True
    assert out[~flagged].eq(7.0).all() and lse[~flagged].eq(7.0).all()
    assert torch.equal(out[flagged].isnan(), want.float()[flagged].isnan())
    finite = want.float()[flagged].isfinite()
    torch.testing.assert_close(out[flagged][finite], want.float()[flagged][finite], rtol=0, atol=2e-2)


@pytest.mark.parametrize("seq_k", [70, 600, 4700])  # the mean pass: 1, 2 or 10 chunks of keys (over 8: two steps)
def test_the_rounding_pass_is_the_references(seq_k, kernel_device):
    """quantize_qk's values, scales, shifts and bad-tile flags are the reference's (GQA, ragged tiles, strided views,
    a non-finite query row and key): bit for bit, except that the key mean is summed in another order, so a
    smoothed key within an ulp of a rounding tie may land on the neighbouring integer."""
    from liteattn.reference import _RoundedQK, _tiles

    gen = torch.Generator().manual_seed(seq_k)
    q = torch.randn(1, 75, 6, 32, generator=gen).transpose(1, 2)  # a BSHD view, as the kernels get it
    k = (torch.randn(1, seq_k, 2, 32, generator=gen) + 3.0).transpose(1, 2)
    q[0, 4, 11, 5] = float("nan")
    k[0, 1, 33, 0] = float("-inf")
    q, k = q.bfloat16(), k.bfloat16()
    got = quantize_qk(q.to(kernel_device), k.to(kernel_device), 16, 32)
    got = type(got)(*(x.cpu() for x in (got.q8, got.k8, got.q_scale, got.k_scale, got.shift, got.sixteen)))
    want = _RoundedQK(q, k, 16, 32, 3, 1.0, "int8", torch.float32)
    assert got.q8.is_contiguous() and got.k8.is_contiguous() and got.k8.dtype == torch.int8
    assert torch.equal(_tiles(got.q8.double(), 16), want.q8) and torch.equal(got.q_scale, want.q_scale)
    k8 = _tiles(got.k8.double(), 32).repeat_interleave(3, 1)
    ties = (k8 - want.k8).abs()
    assert ties.max() <= 1 and (ties > 0).float().mean() < 1e-3
    torch.testing.assert_close(got.k_scale.repeat_interleave(3, 1), want.k_scale, rtol=1e-6, atol=0)
    # a 16-bit query tile: its own bad row (head 4, tile 0), or a bad key of its kv-head (kv-head 1: heads 3-5)
    assert got.sixteen[0, :3].eq(0).all() and got.sixteen[0, 3:].eq(1).all()
    # scale 1: the correction is the shift, but a 16-bit tile's scores are not smoothed
    torch.testing.assert_close(got.shift[0, :3], want.correction[0, :3], rtol=1e-5, atol=1e-5)
    assert got.shift[0, 3:].eq(0).all()
    assert got.q8[0, 4, 11].eq(0).all() and got.k8[0, 1, 33].eq(0).all()
    assert got.q8.abs().max() == 127


_ROUNDING_KERNELS = {
    "_key_sums": ({"K": "*bf16", "SUMS": "*fp32", "COUNTS": "*i32", "BAD": "*i32"},
                  {"BLOCK_S": 32, "BLOCK_D": 128, "KEYS_PER_CHUNK": 512}),
    "_key_means": ({"SUMS": "*fp32", "COUNTS": "*i32", "BAD": "*i32", "MU": "*fp32", "HEAD_BAD": "*i8"},
                   {"BLOCK_C": 8, "BLOCK_D": 128}),
    "_round_keys": ({"K": "*bf16", "MU": "*fp32", "K8": "*i8", "K_SCALE": "*fp32"},
                    {"BLOCK_N": 128, "BLOCK_D": 128, "ROWS": 16}),
    "_round_queries": ({"Q": "*bf16", "MU": "*fp32", "HEAD_BAD": "*i8", "Q8": "*i8", "Q_SCALE": "*fp32",
                        "SHIFT": "*fp32", "SIXTEEN": "*i8"}, {"BLOCK_M": 128, "BLOCK_D": 128, "ROWS": 16}),
}


@pytest.mark.parametrize("name", sorted(_ROUNDING_KERNELS))
def test_the_rounding_pass_builds_for_sm90_with_ieee_division(name):
    """The rounding kernels compile for a GPU (the interpreter accepts code that the compiler refuses), and divide
    with IEEE rounding (``div.rn``), as the reference's rounding does; an approximate divide would move values
    across rounding ties."""
    ptx = compile_rounding_sm90(name, *_ROUNDING_KERNELS[name])["ptx"]
    assert "div.full" not in ptx and "div.approx" not in ptx
    if name != "_key_sums":
        assert "div.rn.f32" in ptx


def test_bad_arguments_are_named():
    q = torch.zeros(1, 64, 2, 32)
    with pytest.raises(ValueError, match="qk_dtype: expected None, 'int8' or 'fp8'"):
        lite_attention(q, q, q, qk_dtype="int4")
    with pytest.raises(ValueError, match=r"qk_dtype: .*pass the string"):
        lite_attention(q, q, q, qk_dtype=torch.int8)
    on = q.bfloat16().to(_kernel_device())
    with pytest.raises(ValueError, match="qk_dtype='fp8': the kernels compute 8-bit Q.K\\^T in int8"):
        lite_attention(on, on, on, backend="triton", qk_dtype="fp8")
    odd = torch.zeros(1, 64, 2, 16, dtype=torch.bfloat16, device=_kernel_device())
    with pytest.raises(ValueError, match="multiples of 16 from 32, got head_dim=16"):
        lite_attention(odd, odd, odd, backend="triton", qk_dtype="int8")
    from liteattn import LiteAttentionConfig
    with pytest.raises(ValueError, match="qk_dtype: expected None with skip_rule='per_call'"):
        LiteAttentionConfig(qk_dtype="int8", skip_rule="per_call")
    with pytest.raises(ValueError, match="qk_dtype='fp8' runs in the PyTorch reference only: expected backend='torch'"):
        LiteAttentionConfig(qk_dtype="fp8")
    assert LiteAttentionConfig(qk_dtype="fp8", backend="torch").qk_dtype == "fp8"
    from liteattn.kernels.dispatch import KernelSpec
    with pytest.raises(ValueError, match="qk8"):
        KernelSpec("triton", 64, 64, "full", "index", per_call=True, qk8=True)
    # the PyTorch path takes both 8-bit formats (fp8 where this torch has e4m3)
    out, _ = lite_attention(q, q, q, backend="torch", qk_dtype="int8")
    assert out.shape == q.shape


def _kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
