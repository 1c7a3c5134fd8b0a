"""The warp-specialized Hopper kernel (Gluon) against the PyTorch reference.

Both Gluon kernels: one program per query tile (:mod:`liteattn.kernels.hopper`) and one per SM
(:mod:`liteattn.kernels.hopper_persistent`). The numerical tests need an sm90 GPU and are skipped elsewhere
(Gluon has no interpreter). On every machine each kernel is compiled for sm90a with Triton's bundled
assembler and checked for what made the plain Triton kernel slow: register spills, and a tensor-core
pipeline that ptxas serialized.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from liteattn import SkipState, lite_attention

triton = pytest.importorskip("triton")
hopper = pytest.importorskip("liteattn.kernels.hopper")
persistent = pytest.importorskip("liteattn.kernels.hopper_persistent")
import liteattn.kernels.forward as fwd  # noqa: E402
from liteattn.kernels._gluon import triton_version  # noqa: E402

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm90) GPU")


def _compile(module, block_n, head_dim, dense, write_state, pingpong, regs=None, switches="") -> dict:
    """One specialization compiled for sm90a in a fresh process (this one runs Triton in interpreter mode), as
    Triton builds it: ``ptx``, the ``cubin`` its own ptxas made, and that ptxas run's ``-v`` report (``log``;
    printed with TRITON_DUMP_PTXAS_LOG, and only by a compile that is not served from the cache, hence the
    empty cache directory). Using Triton's ptxas and flags matters: Triton 3.9 assembles sm90 with the ptxas of
    CUDA 13 and ``--regAllocOptLevel=2``, 3.6 with CUDA 12.8's, and register allocation differs between them.
    ``switches``: Python run on the module (``m``) first, e.g. ``"m.BY_POSITION = False"``."""
    extra = f", regs={regs}" if regs else ""
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cubin_path = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        code = (f"import sys; import liteattn.kernels.{module} as m; {switches or 'pass'}; "
                f"k = m.compile_offline(block_n={block_n}, head_dim={head_dim}, dense={dense}, "
                f"write_state={write_state}, pingpong={pingpong}{extra}); "
                f"open(sys.argv[1], 'w').write(k.asm['ptx']); open(sys.argv[2], 'wb').write(k.asm['cubin'])")
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
                   TRITON_CACHE_DIR=os.path.join(d, "cache"))
        res = subprocess.run([sys.executable, "-c", code, ptx_path, cubin_path], capture_output=True, text=True,
                             env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "TRITON_DEFAULT_FP_FUSION" not in res.stderr  # fusion is passed, not left to a changing default
        with open(ptx_path) as f:
            ptx = f.read()
        with open(cubin_path, "rb") as f:
            cubin = f.read()
    return dict(ptx=ptx, cubin=cubin, log=res.stdout)


def _sass(cubin: bytes) -> str:
    """SASS of a cubin (Triton's bundled cuobjdump)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                             check=True)
    return res.stdout


def _tile_loops(sass: str) -> list[list[str]]:
    """The innermost loops (a backward branch with none inside) that issue wgmma: the consumers' tile loops."""
    code = [(int(a, 16), ins.strip()) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    back = [(int(t, 16), a) for a, ins in code for t in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
            if int(t, 16) <= a]
    loops = []
    for lo, hi in back:
        if any((lo, hi) != other and lo <= other[0] and other[1] <= hi for other in back):
            continue
        body = [ins for a, ins in code if lo <= a <= hi]
        if any("HGMMA" in ins for ins in body):
            loops.append(body)
    return loops


@pytest.mark.parametrize("module,regs", [("hopper", (24, 240)), ("hopper_persistent", persistent.REGS),
                                         ("hopper_persistent", (24, 240))])
@pytest.mark.parametrize("block_n,head_dim,dense,write_state,pingpong", [
    (128, 128, True, False, True),  # dense walk (enabled=False, or nothing to mark on a fresh state)
    (128, 128, False, True, False),  # list walk with detection: every step, the first included
    (128, 128, False, False, True),  # list walk, no detection, consumers taking turns
    (64, 128, False, True, True),
    (128, 64, False, True, None),  # head_dim 64 with each module's own turn-taking rule
    (128, 64, False, True, True),  # head_dim 64 with turns forced (PINGPONG = True)
    (128, 64, True, False, None),  # the dense walk at head_dim 64: row maxima as a tree (TREE_MAX rule)
])
def test_sm90_kernel_compiles_without_spills(module, regs, block_n, head_dim, dense, write_state, pingpong):
    """No register spills, and none inside the tile loops on any tested Triton.

    Triton 3.8 and 3.9 (their ptxas and register-allocation flags) spill a few scalars before and after the tile
    loops of some detection specializations: the per-tile kernel's (16 and 128 bytes of loads at head_dim 128)
    and, on 3.8, the persistent kernel's with the (24, 240) register split (24 bytes); the persistent kernel with
    its own split (``REGS``), the one Hopper runs by default, spills nothing on every tested release."""
    built = _compile(module, block_n, head_dim, dense, write_state, pingpong,
                     regs if module == "hopper_persistent" else None)
    ptx, report = built["ptx"], built["log"]
    assert "bytes spill" in report, report  # the report of Triton's own ptxas run
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    loops = _tile_loops(_sass(built["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    assert not [ins for body in loops for ins in body if re.match(r"(@!?P\w+\s+)?(LDL|STL)\b", ins)], report
    if (module == "hopper_persistent" and regs == persistent.REGS) or not write_state or triton_version() < (3, 8):
        assert spills and max(spills) == 0, report
    assert "C7515" not in report and "serialized" not in report, report  # wgmma pipeline kept asynchronous
    # The producer gives its registers to the consumers.
    producer, consumer = regs
    assert re.search(rf"setmaxnreg\.dec\.sync\.aligned\.u32\s+{producer};", ptx)
    assert re.search(rf"setmaxnreg\.inc\.sync\.aligned\.u32\s+{consumer};", ptx)


@pytest.mark.parametrize("module", ["hopper", "hopper_persistent"])
@pytest.mark.parametrize("by_position", [True, False])
def test_tile_loop_reads_the_list_only_for_partial_rows(module, by_position):
    """With ``BY_POSITION`` (the default) a consumer's tile loop loads a list entry for the ragged-tile check
    only under a predicate (a row that is not full), so detection on full rows waits for no load per tile;
    without it the same check finds the unconditional load, which shows the check can fail."""
    loops = _tile_loops(_sass(_compile(module, 128, 128, False, True, None,
                                       switches=f"m.BY_POSITION = {by_position}")["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    for body in loops:
        loads = [ins for ins in body if "LDG" in ins]
        assert loads, body  # partial rows still read their list
        unconditional = [ins for ins in loads if not re.match(r"@!?P[0-6]\b", ins)]  # @PT is unconditional
        # (A correct kernel could also fail this if ptxas branched around the load instead of predicating it.)
        assert bool(unconditional) is (not by_position), loads


@pytest.mark.parametrize("module", ["hopper", "hopper_persistent"])
def test_every_arrive_follows_a_barrier_over_its_partition(module):
    """The consumers' detection atomics, the non-finite flag and their output stores are ordered before the
    producer (or the compaction) reads or reuses them by the mbarrier arrive that follows them. One thread
    arrives for a four-warp partition, so that order holds because Triton puts a barrier over the partition's
    warps before every arrive (``bar.sync id, 128``; ``bar.warp.sync`` in the one-warp producer). Checked on the
    PTX of each tested Triton: a release that dropped the barrier would make the kernels race."""
    code = [line.strip() for line in _compile(module, 128, 128, False, True, None)["ptx"].splitlines()]
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


def _longest_fmnmx_chain(body: list[str]) -> int:
    """Longest run of FMNMX in a tile loop's SASS where each reads the one before (register dataflow in
    program order; any other instruction writing a register ends the chain through it)."""
    depth, longest = {}, 0
    for ins in body:
        op, _, operands = re.sub(r"^@!?U?P\w+\s+", "", ins).partition(" ")
        regs = re.findall(r"\bR\d+\b", operands)
        if not regs:
            continue
        if op.startswith("FMNMX"):
            depth[regs[0]] = 1 + max((depth.get(r, 0) for r in regs[1:]), default=0)
            longest = max(longest, depth[regs[0]])
        else:
            depth[regs[0]] = 0
    return longest


@pytest.mark.parametrize("module", ["hopper", "hopper_persistent"])
@pytest.mark.parametrize("tree_max", [True, False])
def test_row_max_is_folded_as_a_tree(module, tree_max):
    """With ``TREE_MAX`` a consumer's row maximum is a short dependency chain: each thread's 32 columns of a
    row take 16 + 8 independent FMNMX and then a chain of 7, plus one FMNMX after each of the two shuffles
    across the row's four lanes (11 deep). Triton 3.6 and 3.7 emit the plain reduction as a chain 31 + 2 deep,
    and the check fails on it; from 3.8 on Triton folds a reduction as a tree itself, and both are short."""
    loops = _tile_loops(_sass(_compile(module, 128, 64, True, False, None,
                                       switches=f"m.TREE_MAX = {tree_max}")["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    for body in loops:
        chain = _longest_fmnmx_chain(body)
        assert (7 <= chain <= 12) if tree_max or triton_version() >= (3, 8) else (chain >= 31), chain


@pytest.mark.parametrize("module", ["hopper", "hopper_persistent"])
@pytest.mark.parametrize("lane_sums", [True, False])
def test_row_sums_stay_in_each_lane_until_the_end(module, lane_sums):
    """With ``LANE_SUMS`` the tile loop shuffles only for the row maximum (two levels for each of a thread's two
    rows: 4 SHFL); adding the lanes' sums at every tile, as the kernel did before, takes 4 more, and the check
    fails on that."""
    loops = _tile_loops(_sass(_compile(module, 128, 64, True, False, None,
                                       switches=f"m.LANE_SUMS = {lane_sums}")["cubin"]))
    assert len(loops) == 2, "one tile loop per consumer"
    for body in loops:
        shuffles = sum(ins.startswith("SHFL") for ins in body)
        assert shuffles == (4 if lane_sums else 8), shuffles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_descriptors_reuse_one_layout_per_tile_shape(dtype):
    """The launch's four TMA descriptors take their shared-memory layout from a per-shape cache: the same object
    for every call, equal to the layout Gluon derives for that tile and dtype."""
    from triton.experimental.gluon import language as gl

    x = torch.empty(1, 3, 300, 64, dtype=dtype)
    first, again = persistent._descriptor(x, 64), persistent._descriptor(x[:, :2], 64)
    assert first.layout is again.layout
    assert first.layout == gl.NVMMASharedLayout.get_default_for(
        [1, 1, 64, 64], gl.float16 if dtype == torch.float16 else gl.bfloat16)
    assert first.block_shape == [1, 1, 64, 64] and again.shape == [1, 2, 300, 64]
    assert persistent._descriptor(x, 128).layout is persistent._tile_layout(128, 64, dtype == torch.float16)


def _record_launches(monkeypatch, module, kernel_name) -> dict:
    """Replace a module's Gluon kernel by a recorder: the returned dict holds the last launch's keyword
    arguments (the constexprs) and its ``grid``."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(kwargs, grid=grid)

    monkeypatch.setattr(module, kernel_name, Recorder())
    return seen


@pytest.mark.parametrize("forced", [None, True, False])
def test_persistent_launch_takes_turns_above_head_dim_64(forced, monkeypatch):
    """The persistent launch passes ``pingpong_for(head_dim)``, ``tree_max_for(head_dim, dense)``,
    ``lane_sums_for(dense)`` and the ring depth the shared memory allows
    (checked on the CPU: the kernel is replaced by a recorder)."""
    seen = _record_launches(monkeypatch, persistent, "_lite_attention_fwd_sm90_persistent")
    monkeypatch.setattr(persistent, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(persistent, "PINGPONG", forced)
    monkeypatch.setattr(persistent, "TREE_MAX", forced)
    monkeypatch.setattr(persistent, "LANE_SUMS", forced)
    for head_dim in (64, 128):
        q = torch.randn(1, 2, 256, head_dim).bfloat16()
        small = torch.zeros(4, dtype=torch.int32)
        args = (q, q, q, torch.empty_like(q), small, small, small, small, small, small, small, small, small, 1,
                0, 0, 2, 1, 256, 256, 2, 2, 0.1, -10.0)
        persistent.launch(args, dim=head_dim, seq_k=256, block_m=128, block_n=128, dense=False, write_state=True,
                          return_lse=False, use_order=False)
        assert seen["PINGPONG"] is (head_dim > 64 if forced is None else forced)
        assert seen["TREE_MAX"] is (False if forced is None else forced)  # a list walk (dense=False)
        assert seen["LANE_SUMS"] is (True if forced is None else forced)
        persistent.launch(args, dim=head_dim, seq_k=256, block_m=128, block_n=128, dense=True, write_state=False,
                          return_lse=False, use_order=False)
        assert seen["TREE_MAX"] is (head_dim == 64 if forced is None else forced)  # the dense walk
        assert seen["LANE_SUMS"] is (False if forced is None else forced)
        assert seen["STAGES"] == (4 if head_dim == 64 else 2)
        assert seen["grid"] == (4,)  # 1 batch x 2 heads x 2 query tiles, fewer than the SMs


@pytest.mark.parametrize("forced", [None, True, False])
def test_persistent_kernel_sorts_items_where_a_heads_kv_exceeds_half_the_l2(forced, monkeypatch):
    """``order_by_work``: a head's query tiles longest list first when its K and V take more than half the L2
    (Wan 14B and HunyuanVideo on an H100's 50 MiB L2, not Wan 1.3B), unless ``ORDER_BY_WORK`` forces it."""
    monkeypatch.setattr(persistent, "_l2_bytes", lambda index: 50 * 2**20)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(persistent, "ORDER_BY_WORK", forced)
    for seq_k, head_dim, by_default in ((32760, 128, False), (75600, 128, True), (118800, 128, True),
                                        (102400, 64, False), (102401, 64, True)):
        k = torch.empty(1, 2, seq_k, head_dim, dtype=torch.bfloat16, device="meta")
        assert persistent.order_by_work(k) is (by_default if forced is None else forced), (seq_k, head_dim)
    assert persistent.order_by_work(torch.empty(1, 2, 51200, 128, dtype=torch.float32, device="meta")) is (
        True if forced is None else forced)  # bytes, not elements: 4-byte K/V take twice the L2


@pytest.mark.parametrize("forced", [None, True, False])
def test_per_tile_launch_folds_row_maxima_by_the_rule(forced, monkeypatch):
    """The per-tile launch passes ``tree_max_for(head_dim, dense)`` and ``lane_sums_for(dense)`` too: by default
    a tree in the dense walk at head_dim 64 only, lane sums in list walks only (checked on the CPU: the kernel is
    replaced by a recorder)."""
    seen = _record_launches(monkeypatch, hopper, "_lite_attention_fwd_sm90")
    monkeypatch.setattr(hopper, "TREE_MAX", forced)
    monkeypatch.setattr(hopper, "LANE_SUMS", forced)
    for head_dim in (64, 128):
        for dense in (True, False):
            hopper.launch((1, 1), (), dim=head_dim, seq_k=256, block_m=128, block_n=128, dense=dense,
                          write_state=not dense, return_lse=False, use_order=False)
            assert seen["TREE_MAX"] is ((head_dim == 64 and dense) if forced is None else forced)
            assert seen["LANE_SUMS"] is ((not dense) if forced is None else forced)


@pytest.fixture(params=["per-tile", "persistent", "persistent-5-programs", "persistent-5-programs-by-work"])
def gluon_launches(request, monkeypatch):
    """Run the test on one Gluon kernel: one program per query tile, one per SM, or five programs (many
    work items each, the K/V ring wrapping across items) claiming query tiles in index order or, with the
    non-default ``ORDER_BY_WORK``, a head's longest lists first. The returned list counts that kernel's
    launches."""
    is_persistent = request.param.startswith("persistent")
    monkeypatch.setattr(fwd, "SM90_PERSISTENT", is_persistent)
    monkeypatch.setattr(persistent, "MAX_PROGRAMS", 5 if "5-programs" in request.param else None)
    monkeypatch.setattr(persistent, "ORDER_BY_WORK", request.param.endswith("by-work"))
    module = persistent if is_persistent else hopper
    launches = []
    launch = module.launch
    monkeypatch.setattr(module, "launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    return launches


@needs_hopper
@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("block", [(128, 128), (128, 64)])
def test_sm90_kernel_matches_reference(block, pingpong, monkeypatch, gluon_launches, gen, local_qkv, shuffled_state,
                                       check, dense_attention):
    """Fresh state, a shuffled list with full, partial and empty rows, the list it writes, and
    dense mode, with GQA, ragged lengths and must-do tokens; and the calls did run the Gluon kernel."""
    monkeypatch.setattr(hopper, "PINGPONG", pingpong)
    monkeypatch.setattr(persistent, "PINGPONG", pingpong)
    launches = gluon_launches
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
def test_sm90_kernel_long_lists(head_dim, tree_max, lane_sums, monkeypatch, gluon_launches, gen, local_qkv,
                                shuffled_state, check):
    """More than 128 key tiles per query tile in bf16: several 32-tile detection words per row, a compaction
    over more than one 128-position chunk, full rows next to partial ones; row maxima folded either way, row
    sums kept per lane or added across lanes at every tile."""
    monkeypatch.setattr(hopper, "TREE_MAX", tree_max)
    monkeypatch.setattr(persistent, "TREE_MAX", tree_max)
    monkeypatch.setattr(hopper, "LANE_SUMS", lane_sums)
    monkeypatch.setattr(persistent, "LANE_SUMS", lane_sums)
    launches = gluon_launches
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
