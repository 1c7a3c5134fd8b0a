"""Which kernel and which settings a call gets (:mod:`liteattn.kernels.dispatch`), the spec's checks, and the typed
call. The rules are checked for every target without the GPUs: a target is a value, and the spec a pure function
of it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from liteattn import SkipState, lite_attention  # noqa: E402
from liteattn.kernels import common, dispatch  # noqa: E402
from liteattn.kernels.common import KernelCall  # noqa: E402
from liteattn.kernels.dispatch import KernelSpec  # noqa: E402

HOPPER = ("cuda", (9, 0))


def _sm90_available() -> bool:
    return dispatch.sm90_module() is not None


@pytest.mark.parametrize("walk", ["full", "list"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_runs_the_sm90_kernel_with_its_measured_settings(head_dim, walk):
    if not _sm90_available():
        pytest.skip("this Triton cannot build the Gluon kernel")
    spec = dispatch.resolve(HOPPER, torch.bfloat16, head_dim, 128, 128, walk)
    full = walk == "full"
    assert spec.backend == "sm90" and spec.tma and not spec.upcast
    assert spec.pingpong is (head_dim > 64)  # turns pay above head_dim 64 only
    assert spec.tree_max is (head_dim == 64 and full)  # a tree of maxima: the full walk at head_dim 64 only
    assert spec.lane_sums is (not full)  # lane sums: list walks only
    assert spec.stages == (4 if head_dim == 64 else 2) and spec.regs == (40, 232) and spec.max_regs == 168
    assert spec.work_order == ("index" if full else "longest-first-past-half-l2") and spec.max_programs is None
    assert dispatch.resolve(HOPPER, torch.float16, head_dim, 128, 64, walk).stages == 4  # 64-wide key tiles


@pytest.mark.parametrize("target,dtype,head_dim,tiles", [
    (("cuda", (9, 0)), torch.bfloat16, 96, (128, 64)),  # a head_dim the Gluon kernel does not take
    (("cuda", (9, 0)), torch.bfloat16, 128, (64, 128)),  # 64-row query tiles
    (("cuda", (9, 0)), torch.float32, 128, (128, 128)),
    (("cuda", (8, 0)), torch.bfloat16, 128, (128, 128)),  # an A100
    (("cuda", (10, 0)), torch.bfloat16, 128, (128, 128)),  # Blackwell: TMA, the portable kernel
    (("hip", None), torch.bfloat16, 128, (128, 128)),
    (("interpreter", None), torch.bfloat16, 64, (16, 32)),
])
def test_everything_else_runs_the_portable_kernel(target, dtype, head_dim, tiles):
    for walk in ("full", "list"):
        spec = dispatch.resolve(target, dtype, head_dim, *tiles, walk)
        assert spec.backend == "triton" and (spec.block_m, spec.block_n) == tiles and spec.walk == walk
        assert spec.tma is (target[0] == "cuda" and target[1][0] >= 9)
        assert spec.upcast is (target[0] == "interpreter" and dtype == torch.bfloat16)
        # The hardware launches a grid in order: the longest lists first, the short ones fill the tail.
        assert spec.work_order == ("index" if walk == "full" else "longest-first")
        assert (spec.stages, spec.regs, spec.pingpong, spec.tree_max, spec.lane_sums) == (None, None, False, False,
                                                                                          False)


def test_a_hopper_spec_falls_back_to_the_portable_kernel_with_tma():
    if not _sm90_available():
        pytest.skip("this Triton cannot build the Gluon kernel")
    for walk in ("full", "list"):
        spec = dispatch.resolve(HOPPER, torch.bfloat16, 128, 128, 128, walk)
        fallback = dispatch.portable_spec(spec)
        assert fallback == KernelSpec("triton", 128, 128, walk, "index" if walk == "full" else "longest-first",
                                      tma=True)
        assert dispatch.portable_spec(fallback) is fallback


def test_the_target_of_a_device():
    """The interpreter wherever Triton interprets (this suite on a machine without a GPU), else the device."""
    expected = ("interpreter", None) if common.interpreting() else ("cpu", None)
    assert dispatch.target_of(torch.device("cpu")) == expected


@pytest.mark.parametrize("seq_k,head_dim,dtype,sorted_", [
    (32760, 128, torch.bfloat16, False),  # Wan 1.3B: 17 MB per head
    (75600, 128, torch.bfloat16, True),  # Wan 14B: 39 MB
    (118800, 128, torch.bfloat16, True),  # HunyuanVideo: 61 MB
    (102400, 64, torch.bfloat16, False),  # exactly half a 50 MiB L2
    (102401, 64, torch.bfloat16, True),
    (51200, 128, torch.float32, True),  # bytes, not elements: 4-byte K/V take twice the L2
])
def test_sm90_claims_longest_lists_first_where_a_heads_kv_exceeds_half_the_l2(seq_k, head_dim, dtype, sorted_,
                                                                              monkeypatch):
    """The sm90 spec's work order, applied per call: a head's query tiles longest list first when its K and V
    take more than half the L2 (here an H100's 50 MiB); the other orders whatever the sizes."""
    monkeypatch.setattr(dispatch, "l2_bytes", lambda device: 50 * 2**20)
    k = torch.empty(1, 2, seq_k, head_dim, dtype=dtype, device="meta")
    call = dataclasses.replace(_call(), k=k)
    spec = KernelSpec("triton", 16, 16, "list", "longest-first-past-half-l2")
    assert dispatch.longest_first(spec, call) is sorted_
    assert dispatch.longest_first(dataclasses.replace(spec, work_order="longest-first"), call) is True
    assert dispatch.longest_first(dataclasses.replace(spec, work_order="index"), call) is False


def _call(walk="list", write_state=True, tiles=(16, 16)) -> KernelCall:
    q = torch.randn(1, 2, 40, 16).half()
    counts = torch.full((1, 2, 3), 3, dtype=torch.int32)
    indices = torch.arange(3, dtype=torch.int16).expand(1, 2, 3, 3).contiguous()
    prot = torch.zeros(3, dtype=torch.int8)
    return KernelCall(q, q, q, counts, indices, counts.clone(), indices.clone(), prot, prot, 0.25, -3.0, *tiles, walk,
                      write_state, True)


def test_a_call_names_its_walk():
    with pytest.raises(ValueError, match=r"walk: expected one of \('full', 'list'\), got 'dense'"):
        _call(walk="dense", write_state=False)
    with pytest.raises(ValueError, match="walk: the full walk writes no next state"):
        _call(walk="full", write_state=True)


@pytest.mark.parametrize("field,value,message", [
    ("backend", "sm80", r"backend: expected one of \('triton', 'sm90'\)"),
    ("walk", "dense", "walk: expected one of"),
    ("work_order", "random", "work_order: expected one of"),
    ("block_m", 8, "block_m: expected an int >= 16"),
    ("pingpong", True, "pingpong: only the sm90 backend reads it"),
    ("stages", 3, "stages: only the sm90 backend reads it"),
    ("max_programs", 5, "max_programs: only the sm90 backend reads it"),
])
def test_a_triton_spec_rejects_what_it_cannot_use(field, value, message):
    spec = KernelSpec("triton", 16, 16, "list", "longest-first")
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(spec, **{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("stages", 1, "stages: expected an int >= 2"),
    ("regs", (40, 230), r"regs: expected \(producer, consumer\) registers, multiples of 8"),
    ("regs", 232, "regs: expected"),
    ("max_regs", 300, r"max_regs: expected registers per thread in \[24, 255\]"),
    ("max_programs", 0, "max_programs: expected None"),
    ("tma", False, "tma, upcast: the sm90 kernel copies tiles by TMA"),
    ("block_n", 256, "block_m, block_n: the sm90 kernel takes 128 x 64 or 128 x 128 tiles"),
])
def test_an_sm90_spec_rejects_settings_the_kernel_cannot_run(field, value, message):
    spec = KernelSpec("sm90", 128, 128, "list", "index", tma=True, stages=2, regs=(40, 232), max_regs=168)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(spec, **{field: value})


def test_a_spec_is_immutable():
    spec = KernelSpec("triton", 16, 16, "list", "longest-first")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.walk = "full"


def test_a_spec_passed_with_a_call_must_fit_it():
    call = _call()
    with pytest.raises(ValueError, match=r"spec: built for tiles \(32, 16\), the list walk and per_call=False, but "
                                         r"the call has tiles \(16, 16\)"):
        dispatch.lite_attention_fwd(call, spec=KernelSpec("triton", 32, 16, "list", "longest-first"))
    with pytest.raises(ValueError, match="spec: built for tiles .*, the full walk"):
        dispatch.lite_attention_fwd(call, spec=KernelSpec("triton", 16, 16, "full", "index"))
    with pytest.raises(ValueError, match="spec: built for tiles .*, the full walk and per_call=True"):
        dispatch.lite_attention_fwd(call, spec=KernelSpec("triton", 16, 16, "full", "index", per_call=True))
    with pytest.raises(ValueError, match="spec: expected a KernelSpec or None, got dict"):
        dispatch.lite_attention_fwd(call, spec={"backend": "triton"})


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter noise
def test_a_given_spec_is_the_one_that_runs(gen, local_qkv, kernel_device, monkeypatch):
    """A spec passed to the launcher is what runs: here the portable kernel in index order instead of its
    longest-first default (same result), seen by the launch. On a GPU whose default is another kernel, the portable
    kernel's spec is passed in both runs."""
    import liteattn.kernels.portable as portable

    seen = []
    launch = portable.launch
    monkeypatch.setattr(portable, "launch", lambda spec, call, buffers, order, *rest: seen.append((spec, order))
                        or launch(spec, call, buffers, order, *rest))
    q, k, v = (x.half().to(kernel_device) for x in local_qkv(1, 64, 2, 2, 16, generator=gen))
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool, device=kernel_device)
    mask[0, 1, 2, 1:] = False
    state = SkipState.from_dense(mask, 64, 64, 16, 16)
    counts, indices = state.next_buffers()
    prot = torch.zeros(4, dtype=torch.int8, device=kernel_device)
    call = KernelCall(q, k, v, state.kv_num_blocks, state.kv_indices, counts, indices, prot, prot, 0.25, -3.0, 16, 16,
                      "list", True, True)
    longest = KernelSpec("triton", 16, 16, "list", "longest-first")
    resolved = dispatch.spec_for(call)
    if kernel_device == "cpu":
        assert resolved == longest  # the interpreter's default: this test's first run is the default call
    out, lse = dispatch.lite_attention_fwd(call, spec=None if resolved == longest else longest)
    indexed = dataclasses.replace(longest, work_order="index")
    out2, lse2 = dispatch.lite_attention_fwd(call, spec=indexed)
    assert [s for s, _ in seen] == [longest, indexed]
    assert seen[0][1] is not None and seen[1][1] is None  # longest first, then index order
    assert torch.equal(seen[0][1][0, 1].cpu(), torch.tensor([0, 1, 3, 2], dtype=torch.int32))  # stable, longest first
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    want, _ = lite_attention(q.cpu(), k.cpu(), v.cpu(), SkipState.from_dense(mask.cpu(), 64, 64, 16, 16),
                             threshold=-3.0, layout="bhsd", backend="torch")
    torch.testing.assert_close(out.float().cpu(), want.float(), rtol=0, atol=6e-3)


def test_the_walk_follows_the_states_freshness(gen, local_qkv, kernel_device, monkeypatch):
    """The walk is the call's, decided from what the state knows: a fresh state with nothing to mark is walked in
    full, the same lists in a state built from tensors are walked as lists."""
    import liteattn.kernels.op as op

    walks = []
    launch = op.lite_attention_fwd
    monkeypatch.setattr(op, "lite_attention_fwd", lambda call: walks.append(call.walk) or launch(call))
    q, k, v = (x.half().to(kernel_device) for x in local_qkv(1, 32, 1, 1, 16, generator=gen))
    fresh = SkipState.full(1, 1, 32, 32, 16, 16, device=kernel_device)
    built = SkipState(fresh.kv_num_blocks.clone(), fresh.kv_indices.clone(), 32, 32, 16, 16)
    for state in (fresh, built, fresh.clone(), fresh.to(kernel_device)):
        lite_attention(q, k, v, state, threshold=float("-inf"), layout="bhsd", backend="triton")
    assert walks == ["full", "list", "full", "full"]


def test_tensors_tma_cannot_address_are_copied():
    """TMA needs a unit head_dim stride, 16-byte aligned non-zero strides and a 16-byte aligned base; a tensor
    without them reaches the kernels as a contiguous copy."""
    x = torch.randn(2, 3, 64, 64).bfloat16()
    for ok in (x, x.transpose(1, 2), x[..., :32]):
        assert common.tma_ready(ok) and common.kernel_ready(ok) is ok
    for bad in (x[..., 2:34],  # base 4 bytes off
                torch.randn(2, 3, 64, 60).bfloat16(),  # 120-byte rows
                torch.randn(1, 3, 64, 64).bfloat16().expand(2, 3, 64, 64)):  # a broadcast batch
        assert not common.tma_ready(bad)
        assert common.kernel_ready(bad).is_contiguous() and torch.equal(common.kernel_ready(bad), bad)
