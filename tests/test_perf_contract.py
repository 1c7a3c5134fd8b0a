"""Performance contracts: properties of the generated code and of the host path that the kernels' measured speed
depends on, checked without a GPU. Behaviour (what a call computes) is tested elsewhere; a change that breaks one
of these computes the same and runs slower.

Marked ``perf_contract`` and deselected by a plain ``python -m pytest tests`` (pyproject.toml); CI runs them
(``python -m pytest tests -m perf_contract``, .ci/run). The sm90 kernel is compiled for sm90a with Triton's
bundled assembler (tests/sm90_build.py), on every tested Triton release.
"""
from __future__ import annotations

import re

import pytest
import torch

pytestmark = pytest.mark.perf_contract

triton = pytest.importorskip("triton")
sm90 = pytest.importorskip("liteattn.kernels.sm90")
from liteattn.kernels import common, dispatch  # noqa: E402
from liteattn.kernels._gluon import triton_version  # noqa: E402
from sm90_build import (compile_portable_sm90, compile_sm90, longest_fmnmx_chain, sass, tile_loops,  # noqa: E402
                        unconditional_loads, unskipped)


@pytest.mark.parametrize("regs", [None, (24, 240)])
@pytest.mark.parametrize("head_dim,block_n,walk,write_state,pingpong", [
    (128, 128, "full", False, True),  # the full walk (enabled=False, or nothing to mark on a fresh state)
    (128, 128, "list", True, False),  # the list walk with detection: every step, the first included
    (128, 128, "list", False, True),  # the list walk, no detection, consumers taking turns
    (128, 64, "list", True, True),
    (64, 128, "list", True, None),  # head_dim 64 with the spec's own turn-taking rule
    (64, 128, "list", True, True),  # head_dim 64 with turns forced
    (64, 128, "full", False, None),  # the full walk at head_dim 64: row maxima as a tree (the spec's rule)
])
def test_sm90_kernel_compiles_without_spills(regs, head_dim, block_n, walk, write_state, pingpong):
    """No register spills with the spec's register split, on any tested Triton; with (24, 240) none inside the tile
    loops (Triton 3.8 spills 24 bytes outside them with that split); a wgmma pipeline ptxas kept asynchronous; the
    producer gives its registers to the consumers."""
    overrides = {k: v for k, v in (("regs", regs), ("pingpong", pingpong)) if v is not None}
    built = compile_sm90(head_dim, block_n, walk, write_state, **overrides)
    ptx, report = built["ptx"], built["log"]
    assert "bytes spill" in report, report  # the report of Triton's own ptxas run
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and (max(spills) == 0 or regs is not None), report
    loops = tile_loops(sass(built["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    assert not [ins for body in loops for ins in body if re.match(r"(@!?P\w+\s+)?(LDL|STL)\b", ins)], report
    assert "C7515" not in report and "serialized" not in report, report  # wgmma pipeline kept asynchronous
    producer, consumer = regs or dispatch.resolve(("cuda", (9, 0)), torch.bfloat16, head_dim, 128, block_n,
                                                  walk).regs
    assert re.search(rf"setmaxnreg\.dec\.sync\.aligned\.u32\s+{producer};", ptx)
    assert re.search(rf"setmaxnreg\.inc\.sync\.aligned\.u32\s+{consumer};", ptx)


@pytest.mark.parametrize("head_dim,block_m,block_n,walk,write_state", [
    (128, 128, 64, "list", True),  # a step with detection, the portable kernel's tiles at head_dim 128
    (128, 128, 64, "full", False),  # the full walk (enabled=False)
    (64, 128, 128, "list", True),
])
def test_int8_qk_builds_for_sm90_with_integer_tensor_cores(head_dim, block_m, block_n, walk, write_state):
    """``qk8`` builds for Hopper on every tested Triton: Q.K^T as integer wgmma (s8 x s8 -> s32), P.V still in bf16,
    and no register spills with 8 warps (with 4 the 16-bit path for non-finite tokens spills at these tiles, as the
    16-bit kernel does at head_dim 128; the autotuner has both)."""
    built = compile_portable_sm90(head_dim, block_m, block_n, walk, write_state, qk8=True)
    ptx, report = built["ptx"], built["log"]
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", ptx), "no integer Q.K^T"
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", ptx), "no bf16 P.V"
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and max(spills) == 0, report


@pytest.mark.parametrize("head_dim,walk,write_state", [(128, "full", False), (128, "list", True), (64, "full", False)])
def test_int8_qk_sm90_kernel_builds_with_integer_tensor_cores(head_dim, walk, write_state):
    """The sm90 kernel's ``qk8`` mode on every tested Triton: Q.K^T as integer wgmma (s8 x s8 -> s32), P.V in bf16,
    and no register spills in the same register split as 16 bits."""
    built = compile_sm90(head_dim, 128, walk, write_state, qk8=True)
    ptx, report = built["ptx"], built["log"]
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", ptx), "no integer Q.K^T"
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", ptx), "no bf16 P.V"
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and max(spills) == 0, report


@pytest.mark.parametrize("head_dim,walk,write_state", [(128, "full", False), (128, "list", True), (64, "list", True)])
def test_int8_scores_need_no_conversion_and_the_ragged_mask_stays_behind_its_branch(head_dim, walk, write_state):
    """The sm90 ``qk8`` tile loop reads Q·Kᵀ's int32 sums as floats (the product accumulates onto the bits of
    1.5 * 2^23), so no conversion runs per score; and the last key tile's mask stays behind its branch instead of
    becoming selects and predicate copies on every tile. Before, both cost 130-200 instructions per tile, 20-30 % of
    the loop (lab/kernel-notes.md, v20)."""
    code = sass(compile_sm90(head_dim, 128, walk, write_state, qk8=True)["cubin"])
    loops, every_tile = tile_loops(code), unskipped(code)
    assert len(loops) == 2, "one tile loop per consumer"
    for body, path in zip(loops, every_tile):
        assert not [ins for ins in body if re.search(r"\bI2F", ins)], "a conversion per score"
        selects = [ins for ins in path if re.search(r"\b(FSEL|PLOP3)\b", ins)]
        assert len(selects) < 16, selects[:8]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_skip_softmax_mode_compiles_without_spills(head_dim):
    """The skip-softmax mode (64-row query tiles, one per consumer) fits the same register split without spills, and
    ptxas keeps its wgmma pipeline asynchronous across the branches that leave P·V out."""
    built = compile_sm90(head_dim, 128, "full", False, per_call=True, block_m=64)
    report = built["log"]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and max(spills) == 0, report
    assert "C7515" not in report and "serialized" not in report, report


def test_tile_loop_reads_the_list_only_for_partial_rows():
    """A consumer's tile loop loads a list entry for the ragged-tile check only under a predicate (a row that is
    not full), so detection on full rows waits for no load per tile (on an H200 full-row calls ran 0-1 % faster,
    lab/kernel-notes.md v12). (A correct kernel could also fail this if ptxas branched around the load instead of
    predicating it.)"""
    loops = tile_loops(sass(compile_sm90(128, 128, "list", True)["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    for body in loops:
        loads = [ins for ins in body if "LDG" in ins]
        assert loads, body  # partial rows still read their list
        assert not unconditional_loads(body), loads


def test_unconditional_load_check_finds_an_unguarded_load():
    """The check above can fail: on SASS that reads the list whatever the row (as the kernel did before v12, where
    a full row's index came from a select over the loaded entry) it finds the load."""
    body = ["@P0 LDG.E.U16 R4, desc[UR4][R2.64]", "LDG.E.U16 R6, desc[UR4][R8.64]", "@!P2 BRA 0x1230",
            "@PT LDG.E.U16 R7, desc[UR4][R8.64]", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT"]
    assert unconditional_loads(body) == ["LDG.E.U16 R6, desc[UR4][R8.64]", "@PT LDG.E.U16 R7, desc[UR4][R8.64]"]
    assert unconditional_loads(body[:1] + body[2:3]) == []


@pytest.mark.parametrize("tree_max", [True, False])
def test_row_max_is_folded_as_a_tree(tree_max):
    """With ``tree_max`` a consumer's row maximum is a short dependency chain: each thread's 32 columns of a row
    take 16 + 8 independent FMNMX and then a chain of 7, plus one FMNMX after each of the two shuffles across the
    row's four lanes (11 deep). Triton 3.6 emits the plain reduction as a chain 31 + 2 deep, and the check fails on
    it; from 3.8 on Triton folds a reduction as a tree itself, and both are short (3.7 still emits the chain)."""
    loops = tile_loops(sass(compile_sm90(64, 128, "full", False, tree_max=tree_max)["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    for body in loops:
        chain = longest_fmnmx_chain(body)
        assert (7 <= chain <= 12) if tree_max or triton_version() >= (3, 8) else (chain >= 31), chain


@pytest.mark.parametrize("lane_sums", [True, False])
def test_row_sums_stay_in_each_lane_until_the_end(lane_sums):
    """With ``lane_sums`` the tile loop shuffles only for the row maximum (two levels for each of a thread's two rows:
    4 SHFL); adding the lanes' sums at every tile, as the kernel did before v16, takes 4 more, and the check fails
    on that."""
    loops = tile_loops(sass(compile_sm90(64, 128, "full", False, lane_sums=lane_sums)["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    for body in loops:
        shuffles = sum(ins.startswith("SHFL") for ins in body)
        assert shuffles == (4 if lane_sums else 8), shuffles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_descriptors_reuse_one_layout_per_tile_shape(dtype):
    """The launch's four TMA descriptors take their shared-memory layout from a per-shape cache: the same object
    for every call, equal to the layout Gluon derives for that tile and dtype (deriving it took a quarter of the
    launch's host time)."""
    from triton.experimental.gluon import language as gl

    x = torch.empty(1, 3, 300, 64, dtype=dtype)
    first, again = sm90._descriptor(x, 64), sm90._descriptor(x[:, :2], 64)
    assert first.layout is again.layout
    gl_dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.int8: gl.int8}[dtype]
    assert first.layout == gl.NVMMASharedLayout.get_default_for([1, 1, 64, 64], gl_dtype)
    assert first.block_shape == [1, 1, 64, 64] and again.shape == [1, 2, 300, 64]
    assert sm90._descriptor(x, 128).layout is sm90._tile_layout(128, 64, dtype)


def test_device_capability_is_asked_once_per_gpu(monkeypatch):
    """Every launch checks the compute capability; torch is asked once per GPU index, and a device without an
    index means the current one (checked on the CPU: torch's lookup is replaced by a counter)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (9, index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    common._capability.cache_clear()
    try:
        for _ in range(3):
            assert common.device_capability(torch.device("cuda", 0)) == (9, 0)
            assert common.device_capability(torch.device("cuda")) == (9, 1)
        assert asked == [0, 1]
    finally:
        common._capability.cache_clear()  # the real lookup for later tests


def test_a_spec_is_resolved_once_per_key(monkeypatch):
    """A call's spec costs one cached lookup: the rules run once per (target, dtype, head_dim, tiles, walk, rule), and
    every later call with that key gets the same object."""
    built = []
    rule = dispatch._sm90_spec
    monkeypatch.setattr(dispatch, "_sm90_spec", lambda *args: built.append(args) or rule(*args))
    dispatch.resolve.cache_clear()
    try:
        keys = [(128, "list", False, False, False), (128, "full", False, False, False),
                (128, "list", False, False, False), (64, "full", True, False, False),
                (128, "full", False, False, False), (64, "full", True, False, False), (128, "full", False, True, False),
                (128, "full", False, True, False), (128, "full", False, True, True), (128, "full", False, True, True)]
        specs = [dispatch.resolve(("cuda", (9, 0)), torch.bfloat16, 128, block_m, 128, walk, per_call, qk8, pv8)
                 for block_m, walk, per_call, qk8, pv8 in keys]
        assert specs[0] is specs[2] and specs[1] is specs[4] and specs[3] is specs[5] and specs[6] is specs[7]
        assert specs[8] is specs[9]
        assert len({specs[0], specs[1], specs[3], specs[6], specs[8]}) == 5
        assert built == [(128, 128, 128, "list", False, False, False), (128, 128, 128, "full", False, False, False),
                         (128, 64, 128, "full", True, False, False), (128, 128, 128, "full", False, True, False),
                         (128, 128, 128, "full", False, True, True)]
    finally:
        dispatch.resolve.cache_clear()
