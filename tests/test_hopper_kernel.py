"""The warp-specialized Hopper kernel (Gluon, :mod:`liteattn.kernels.sm90`) against the PyTorch reference.

The numerical tests need an sm90 GPU and are skipped elsewhere (Gluon has no interpreter). On every machine the
kernel is compiled for sm90a with Triton's bundled assembler and its memory ordering checked in the PTX, and its
launch is checked on the CPU with the kernel replaced by a recorder. What the generated code must keep for speed
(no spills, predicated list reads, short row-max chains, lane sums) is in tests/test_perf_contract.py.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from liteattn import SkipState, lite_attention

triton = pytest.importorskip("triton")
sm90 = pytest.importorskip("liteattn.kernels.sm90")
import liteattn.kernels.op as op  # noqa: E402
from liteattn.kernels import dispatch  # noqa: E402
from liteattn.kernels.common import KernelCall, prepare  # noqa: E402
from sm90_build import compile_sm90  # noqa: E402

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm90) GPU")


def test_every_arrive_follows_a_barrier_over_its_partition():
    """The consumers' detection atomics, the non-finite flag and their output stores are ordered before the
    producer (or the compaction) reads or reuses them by the mbarrier arrive that follows them. One thread
    arrives for a four-warp partition, so that order holds because Triton puts a barrier over the partition's
    warps before every arrive (``bar.sync id, 128``; ``bar.warp.sync`` in the one-warp producer). Checked on the
    PTX of each tested Triton: a release that dropped the barrier would make the kernel race."""
    code = [line.strip() for line in compile_sm90(128, 128, "list", True)["ptx"].splitlines()]
    code = [line for line in code if line and not line.startswith(("//", ".loc"))]
    arrives = [i for i, line in enumerate(code) if re.search(r"\bmbarrier\.arrive\.shared", line)]
    consumer = 0
    for i in arrives:
        j = i - 1  # back to the start of the basic block: a barrier, a label or a branch
        while not re.match(r"(bar\.|barrier\.|\$L\w+:|(@!?%p\d+\s+)?bra(\.uni)?\s|ret;|\})", code[j]):
            j -= 1
        assert re.match(r"bar\.(sync\s+\d+,\s*128;|warp\.sync)", code[j]), (code[j], code[i])
        consumer += code[j].startswith("bar.sync")
    assert consumer >= 8, "the consumers' arrives were not found"


def _record_launches(monkeypatch) -> dict:
    """Replace the Gluon kernel by a recorder: the returned dict holds the last launch's keyword arguments and its
    ``grid``."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(kwargs, grid=grid)

    monkeypatch.setattr(sm90, "_lite_attention_fwd_sm90_persistent", Recorder())
    return seen


def _call(head_dim: int, walk: str, seq: int = 256) -> KernelCall:
    q = torch.randn(1, 2, seq, head_dim).bfloat16()
    kt = -(-seq // 128)
    counts = torch.full((1, 2, 2), kt, dtype=torch.int32)
    indices = torch.arange(kt, dtype=torch.int16).expand(1, 2, 2, kt).contiguous()
    prot = torch.zeros(kt, dtype=torch.int8)
    return KernelCall(q, q, q, counts, indices, counts.clone(), indices.clone(), prot, prot, 0.125, -10.0, 128, 128,
                      walk, walk == "list", False)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("walk", ["full", "list"])
def test_launch_passes_the_spec(head_dim, walk, monkeypatch):
    """The launch hands the kernel what the spec says (ring depth, turn-taking, row-max tree, lane sums, register
    split) and one program per SM, or ``max_programs``, never more than the work items (checked on the CPU)."""
    seen = _record_launches(monkeypatch)
    monkeypatch.setattr(sm90, "sm_count", lambda device: 3)
    call = _call(head_dim, walk)
    spec = dispatch.resolve(("cuda", (9, 0)), torch.bfloat16, head_dim, 128, 128, walk)
    for variant in (spec, dataclasses.replace(spec, pingpong=not spec.pingpong, tree_max=not spec.tree_max,
                                              lane_sums=not spec.lane_sums, regs=(24, 240), stages=3)):
        sm90.launch(variant, call, prepare(call), None)
        assert (seen["STAGES"], seen["PINGPONG"], seen["TREE_MAX"], seen["LANE_SUMS"]) == (
            variant.stages, variant.pingpong, variant.tree_max, variant.lane_sums)
        assert (seen["PRODUCER_REGS"], seen["CONSUMER_REGS"], seen["maxnreg"]) == (*variant.regs, variant.max_regs)
        assert seen["FULL_WALK"] is (walk == "full") and seen["WRITE_STATE"] is (walk == "list")
        assert seen["USE_ORDER"] is False and seen["RAGGED_K"] is False and seen["enable_fp_fusion"] is True
        assert seen["grid"] == (3,)  # 1 batch x 2 heads x 2 query tiles = 4 items, 3 SMs
    sm90.launch(dataclasses.replace(spec, max_programs=2), call, prepare(call), torch.zeros(1, 2, 2, dtype=torch.int32))
    assert seen["grid"] == (2,) and seen["USE_ORDER"] is True
    sm90.launch(dataclasses.replace(spec, max_programs=64), call, prepare(call), None)
    assert seen["grid"] == (4,)  # fewer items than programs


def _with_spec(monkeypatch, **overrides) -> list:
    """Make every kernel call of the test run the sm90 spec with ``overrides`` (a spec passed to the launcher, as
    development scripts pass one). The returned list gets one entry per call that ran the sm90 kernel."""
    launches = []
    launch_sm90, launch = sm90.launch, op.lite_attention_fwd
    monkeypatch.setattr(sm90, "launch", lambda *a, **kw: launches.append(1) or launch_sm90(*a, **kw))
    monkeypatch.setattr(op, "lite_attention_fwd",
                        lambda call: launch(call, spec=dataclasses.replace(dispatch.spec_for(call), **overrides)))
    return launches


@pytest.fixture(params=["one-per-sm", "5-programs", "5-programs-longest-first"])
def schedule(request) -> dict:
    """The persistent kernel's schedule: one program per SM, or five programs (many work items each, the K/V ring
    wrapping across items) claiming query tiles in index order or, as at large shapes, a head's longest lists
    first."""
    return {"one-per-sm": {}, "5-programs": dict(max_programs=5, work_order="index"),
            "5-programs-longest-first": dict(max_programs=5, work_order="longest-first")}[request.param]


@needs_hopper
@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("block", [(128, 128), (128, 64)])
def test_sm90_kernel_matches_reference(block, pingpong, schedule, monkeypatch, gen, local_qkv, shuffled_state, check,
                                       dense_attention):
    """Fresh state, a shuffled list with full, partial and empty rows, the list it writes, and the full walk
    (``enabled=False``), with GQA, ragged lengths and must-do tokens; and the calls did run the Gluon kernel."""
    launches = _with_spec(monkeypatch, pingpong=pingpong, **schedule)
    bm, bn = block
    sq, sk = 520, 1100
    q, k, v = (x.half() for x in local_qkv(2, sq, 4, 2, 128, seq_len_k=sk, generator=gen))
    fresh = SkipState.full(2, 4, sq, sk, bm, bn)
    nxt, marked = check(q, k, v, fresh, threshold=-3.0, must_do=[(0, 7)])
    assert marked > 0, "the inputs should make the reference mark tiles"
    check(q, k, v, nxt, threshold=-3.0, must_do=[(0, 7)])
    mask = torch.ones(2, 4, -(-sq // bm), -(-sk // bn), dtype=torch.bool)
    mask[1, 2, 1, 3:] = False
    mask[0, 0, 2, ::2] = False
    mask[0, 3, 1, :] = False  # an empty list: zero output, LSE -inf, and no wait for tiles that never come
    listed = shuffled_state(SkipState.from_dense(mask, sq, sk, bm, bn), generator=gen)
    nxt, marked = check(q, k, v, listed, threshold=-3.0)
    assert marked > 0
    out, _ = lite_attention(*(x.cuda().transpose(1, 2) for x in (q, k, v)), enabled=False, block_size=block)
    ref, _, _ = dense_attention(q, k, v)
    torch.testing.assert_close(out.transpose(1, 2).float().cpu(), ref.float(), rtol=0, atol=6e-3)
    assert len(launches) == 4


@needs_hopper
@pytest.mark.parametrize("tree_max,lane_sums", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_kernel_long_lists(head_dim, tree_max, lane_sums, schedule, monkeypatch, gen, local_qkv,
                                shuffled_state, check):
    """More than 128 key tiles per query tile in bf16: several 32-tile detection words per row, a compaction
    over more than one 32-position chunk, full rows next to partial ones; row maxima folded either way, row
    sums kept per lane or added across lanes at every tile."""
    launches = _with_spec(monkeypatch, tree_max=tree_max, lane_sums=lane_sums, **schedule)
    sq, sk, bm, bn = 260, 8300, 128, 64
    q, k, v = (x.bfloat16() for x in local_qkv(1, sq, 2, 1, head_dim, seq_len_k=sk, generator=gen))
    mask = torch.ones(1, 2, -(-sq // bm), -(-sk // bn), dtype=torch.bool)
    mask[0, 1, 0, 40:70] = False
    mask[0, 0, 2, 1::3] = False
    state = shuffled_state(SkipState.from_dense(mask, sq, sk, bm, bn), generator=gen)
    nxt, marked = check(q, k, v, state, threshold=-2.0)
    assert marked > 0
    check(q, k, v, nxt, threshold=-2.0)
    assert len(launches) == 2
