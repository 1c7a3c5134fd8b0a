"""liteattn under diffusers' context parallelism, on two and four CPU processes (gloo).

What must hold (:mod:`liteattn.integrations.parallel` says why):

- Ulysses (each rank: the whole sequence, half the heads): one process's output and, head for head, its skip
  decisions, at every step and in both CFG contexts.
- Ring (each rank: its query block against each K/V chunk in turn): the chunk of the first keys makes one
  process's decisions at every step; a later chunk marks a subset of them at the first skipping step (its running
  maximum has seen fewer tiles), which keeps the output nearer dense attention; with nothing marked the output is
  one process's; each chunk's attention is liteattn's own on that chunk, merged by log-sum-exp.
- A row with nothing to attend in a chunk gets zero weight from it, never NaN, whichever chunk comes first.
- Unified (ring x Ulysses, four processes): both at once.
- Every generation starts from fresh states; nothing falls back to dense.

The ranks run in ``parallel_worker.py`` (one launch per world size for all scenarios: starting processes is
what costs here); the one-process references are computed here from the same settings.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

import liteattn.integrations as li  # noqa: E402
from liteattn import LiteAttention  # noqa: E402
from liteattn.integrations import LiteAttentionConfig  # noqa: E402
from liteattn.integrations.layer import ForwardInfo, KeyPaddingMasks, LayerRuntime  # noqa: E402
from liteattn.integrations.parallel import LseGuard, Part, attend, fallback_reason, local_ranges  # noqa: E402

WORKER_PATH = Path(__file__).with_name("parallel_worker.py")
LAUNCH_TIMEOUT_S = 600
# diffusers' ring loop merges the chunks' outputs in float32 (ContextParallelConfig.convert_to_fp32): a float64
# model's ring output carries float32 rounding (seen: up to 4e-7 on values of order 1).
RING_ATOL = 2e-6


def _load_worker():
    spec = importlib.util.spec_from_file_location("parallel_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def _launch(world: int, scenarios: list[str], outdir: Path):
    """Run the scenarios on ``world`` ranks; ``result(name, rank)`` loads what a rank saved."""
    proc = subprocess.run([sys.executable, str(WORKER_PATH), str(world), str(outdir), *scenarios],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode == W.CANNOT_START:
        pytest.skip(f"{world} processes with gloo cannot start here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, f"the ranks failed:\n{proc.stderr[-4000:]}"

    def result(name: str, rank: int) -> dict:
        saved = torch.load(outdir / f"{name}-{rank}.pt", weights_only=False)
        if "error" in saved:
            pytest.fail(f"rank {rank} of scenario {name!r} raised:\n{saved['error']}")
        return saved

    return result


# The kernel scenario runs the Triton kernel in Triton's CPU interpreter: on a GPU machine the ranks' gloo tensors
# stay on the CPU, so it is left out there (the two-GPU benchmark runs the kernel under NCCL).
KERNEL_ON_CPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    scenarios = ["ulysses", "ring", "ring_op", "ring_empty", "bench"] + (["kernel"] if KERNEL_ON_CPU else [])
    return _launch(2, scenarios, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _launch(4, ["unified"], tmp_path_factory.mktemp("four"))


@pytest.fixture(scope="module")
def one():
    """One process on the same model: dense, liteattn (with its states after every forward), marking nothing."""
    def model():
        return W.tiny._wan(dtype=torch.float64, sharpen=W.SHARPEN, seed=W.MODEL_SEED)

    def generate(m):
        return W.tiny._wan_generate(m, seed=W.LOOP_SEED, steps=W.STEPS)[0]

    dense = generate(model())
    m = model()
    handle = li.apply(m, threshold=W.THRESHOLD, block_size=W.TILES)
    snapshots = W.record_states(m, handle)
    out = generate(m)
    per_step = handle.summary().per_step()
    m = model()
    li.apply(m, threshold=W.NO_SKIP, block_size=W.TILES)
    no_skip = generate(m)
    m = model()
    li.apply(m, threshold=W.THRESHOLD, block_size=W.TILES, dense_steps=1)
    return SimpleNamespace(dense=dense, out=out, snapshots=snapshots, per_step=per_step, no_skip=no_skip,
                           dense_first=generate(m))


# ---------------------------------------------------------------------------- helpers
def _lists(counts: torch.Tensor, indices: torch.Tensor) -> list:
    """``[b][h][qt]`` -> the visited key tiles in order (a full row is visited in ascending order)."""
    kt = indices.shape[-1]
    return [[[list(range(kt)) if int(n) == kt else row[:int(n)].tolist() for n, row in zip(ns, rows)]
             for ns, rows in zip(bn, bi)] for bn, bi in zip(counts, indices)]


def _chunk(row: list[int], chunk: int, tiles: int) -> list[int]:
    """A one-process list cut to one chunk's key tiles, in chunk coordinates (order kept)."""
    return [j - chunk * tiles for j in row if chunk * tiles <= j < (chunk + 1) * tiles]


def _forwards(snapshots: list):
    """``(forward index, context, that forward's states)``: Wan's loop calls cond then uncond each step."""
    for i, states in enumerate(snapshots):
        yield i, ("cond", "uncond")[i % 2], states


def _marked(lists: list, key_tiles: int) -> int:
    """How many (b, h, query tile) rows have lost a tile."""
    return sum(len(row) < key_tiles for b in lists for h in b for row in h)


# ---------------------------------------------------------------------------- Ulysses
def test_ulysses_matches_one_process_head_for_head(two, one):
    ranks = [two("ulysses", r) for r in range(2)]
    for rank, res in enumerate(ranks):
        torch.testing.assert_close(res["outputs"][0], one.out, rtol=0, atol=1e-12)
        assert res["fallbacks"] == {}
        assert len(res["snapshots"][0]) == len(one.snapshots) == 2 * W.STEPS
        compared = 0
        for (i, context, states), mine in zip(_forwards(one.snapshots), res["snapshots"][0]):
            for (layer, ctx, _), (counts, indices) in states.items():
                if ctx != context:
                    continue
                part = Part((rank, 2), (0, 1), 0)
                theirs = _lists(counts, indices)
                ours = _lists(*mine[(layer, ctx, part)])
                assert ours == [[b[rank]] for b in theirs], (i, layer, context)
                compared += 1
        assert compared == 2 * 2 * W.STEPS  # layers x contexts x steps
    marked = sum(_marked(_lists(*s), 10) for s in one.snapshots[-1].values())
    assert marked > 0, "the one-process run should skip, or equal decisions say nothing"
    # Each rank reports its own heads: their mean is the one-process fraction (equal shares of the tiles).
    for step, row in one.per_step.items():
        mean = sum(r["per_step"][0][step]["sparsity"] for r in ranks) / 2
        assert math.isclose(mean, row["sparsity"], abs_tol=1e-6)  # float32 fractions


def test_ulysses_dense_steps_run_the_model_backend_in_parallel(two, one):
    for rank in range(2):
        res = two("ulysses", rank)
        per_step = res["dense_first_per_step"]
        assert per_step[0]["dense"] == per_step[0]["calls"] == 4 and per_step[1]["dense"] == 0
        torch.testing.assert_close(res["dense_first"], one.dense_first, rtol=0, atol=1e-12)
        assert not torch.equal(res["dense_first"], res["outputs"][0])  # the dense first step changed something


# ---------------------------------------------------------------------------- ring
def test_ring_skip_decisions_relative_to_one_process(two, one):
    """Chunk 0: one process's lists at every step. Chunk 1 at the first skipping step: a superset of them."""
    qt = kt = 5  # tiles per rank's query block and per chunk
    chunk0_marks = chunk1_marks = 0
    for rank in range(2):
        res = two("ring", rank)
        assert res["fallbacks"] == {}
        for (i, context, states), mine in zip(_forwards(one.snapshots), res["snapshots"][0]):
            for (layer, ctx, _), (counts, indices) in states.items():
                if ctx != context:
                    continue
                theirs = _lists(counts, indices)[0]
                for chunk in range(2):
                    ours = _lists(*mine[(layer, ctx, Part((0, 1), (rank, 2), chunk))])[0]
                    for h in range(len(ours)):
                        for t in range(qt):
                            expected = _chunk(theirs[h][rank * qt + t], chunk, kt)
                            if chunk == 0:
                                assert ours[h][t] == expected, (i, layer, context, rank, h, t)
                                chunk0_marks += len(expected) < kt
                            elif i < 2:  # the first skipping step, cond and uncond
                                assert set(expected) <= set(ours[h][t]), (i, layer, context, rank, h, t)
                                chunk1_marks += len(ours[h][t]) < kt
    assert chunk0_marks > 0 and chunk1_marks > 0, "both chunks should mark tiles, or the checks say nothing"


def test_ring_output_stays_nearer_dense_than_one_process(two, one):
    """Ring marks fewer tiles than one process at the first step (and here at every step): its output lies
    between dense attention's and one process's."""
    for rank in range(2):
        out = two("ring", rank)["outputs"][0]
        assert torch.isfinite(out).all()
        assert (out - one.dense).abs().max() <= (one.out - one.dense).abs().max()


def test_ring_marking_nothing_is_one_process(two, one):
    """diffusers' ring loop with liteattn's forward op is exact: chunk order, merge and placement."""
    for rank in range(2):
        torch.testing.assert_close(two("ring", rank)["no_skip"], one.no_skip, rtol=0, atol=RING_ATOL)


def test_every_generation_starts_fresh(two):
    for name in ("ulysses", "ring"):
        shrank = False
        for rank in range(2):
            res = two(name, rank)
            assert torch.equal(res["outputs"][1], res["outputs"][0]), (name, rank)
            assert res["per_step"][1] == res["per_step"][0] and res["per_step"][1][0]["sparsity"] == 0.0
            first, again, last = res["snapshots"][0][0], res["snapshots"][1][0], res["snapshots"][0][-1]
            assert all(torch.equal(first[key][0], again[key][0]) and torch.equal(first[key][1], again[key][1])
                       for key in first), (name, rank)
            shrank = shrank or any(not torch.equal(first[key][0], last[key][0]) for key in first)
        # Had the second generation started from the first one's states, its first lists could not all be the
        # first generation's first lists, which are longer somewhere than the lists it ended with.
        assert shrank, name


def _chunked_one_process():
    """The op-level ring computed in one process: one LiteAttention per (query block, chunk), merged by lse."""
    steps = W.op_inputs()
    seq = steps[0][0].shape[1] // 2
    blocks = {(rank, chunk): LiteAttention(W.OP_THRESHOLD, block_size=W.TILES, backend="torch")
              for rank in range(2) for chunk in range(2)}
    outputs = []
    for q, k, v in steps:
        per_rank = []
        for rank in range(2):
            outs, lses = [], []
            for chunk in range(2):
                o, lse = blocks[rank, chunk](q[:, rank * seq:(rank + 1) * seq], k[:, chunk * seq:(chunk + 1) * seq],
                                             v[:, chunk * seq:(chunk + 1) * seq], return_lse=True)
                outs.append(o.double())
                lses.append(lse.double().transpose(1, 2)[..., None])
            total = torch.logsumexp(torch.stack(lses), dim=0)
            per_rank.append(sum(o * torch.exp(lse - total) for o, lse in zip(outs, lses)))
        outputs.append(per_rank)
    return outputs, blocks


def test_ring_op_is_liteattn_per_chunk_merged(two):
    """Through ``LayerRuntime.attend`` and diffusers' ring loop: each step's output and each chunk's state are
    those of one LiteAttention per (query block, chunk) in one process, states carried over the steps."""
    expected, blocks = _chunked_one_process()
    for rank in range(2):
        res = two("ring_op", rank)
        for step in range(W.OP_STEPS):
            torch.testing.assert_close(res["outputs"][step], expected[step][rank], rtol=0, atol=RING_ATOL)
        for chunk in range(2):
            state = blocks[rank, chunk].state
            counts, indices = res["states"][-1][Part((0, 1), (rank, 2), chunk)]
            assert _lists(counts, indices) == _lists(state.kv_num_blocks, state.kv_indices), (rank, chunk)
        assert 0.0 < res["sparsity"][-1] < 1.0


def test_ring_op_chunk_decisions_relative_to_one_process(two):
    """The op-level inputs mark tiles in both chunks: chunk 0 equals one process's lists at every step, chunk 1
    keeps a superset of them at the first step."""
    one = LiteAttention(W.OP_THRESHOLD, block_size=W.TILES, backend="torch")
    qt = kt = W.OP_SHAPE[1] // 2 // W.TILES[0]
    marks = [0, 0]
    for step, (q, k, v) in enumerate(W.op_inputs()):
        one(q, k, v)
        theirs = _lists(one.state.kv_num_blocks, one.state.kv_indices)[0]
        for rank in range(2):
            for chunk in range(2):
                ours = _lists(*two("ring_op", rank)["states"][step][Part((0, 1), (rank, 2), chunk)])[0]
                for h in range(len(ours)):
                    for t in range(qt):
                        cut = _chunk(theirs[h][rank * qt + t], chunk, kt)
                        if chunk == 0:
                            assert ours[h][t] == cut, (step, rank, h, t)
                        elif step == 0:
                            assert set(cut) <= set(ours[h][t]), (rank, h, t)
                        marks[chunk] += len(ours[h][t]) < kt
    assert marks[0] > 0 and marks[1] > 0


@pytest.mark.skipif(not KERNEL_ON_CPU, reason="the kernel scenario runs in Triton's CPU interpreter")
def test_the_triton_kernel_under_ring_and_ulysses_skips_as_the_reference(two):
    """The kernel reads its inputs' data pointers: ring's K/V chunks come from an all-gather still in flight, so
    the forward op waits for them (without that the kernel fails). Same skipped fractions as the reference, same
    outputs within float16's tolerance."""
    for rank in range(2):
        res = two("kernel", rank)
        for layout in ("ring", "ulysses"):
            (ref, ref_sparsity), (out, sparsity) = res[layout, "torch"], res[layout, "triton"]
            assert sparsity == ref_sparsity and sparsity[-1] > 0.0, (rank, layout)
            for a, b in zip(out, ref):
                torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_ring_rows_with_nothing_in_a_chunk(two):
    """Head 0: query tile 0 has nothing in chunk 0, tile 1 nothing anywhere, tile 2 nothing in chunk 1; each
    rank meets one of them in the first chunk of its order. Expected: attention over the tiles that are there,
    zeros where none is, and no NaN."""
    q, k, v = (x.double().transpose(1, 2) for x in W.op_inputs()[0])  # BHSD
    seq = q.shape[2] // 2
    bm, bn = W.TILES
    for rank in range(2):
        allowed = torch.cat([W.empty_list_masks(chunk) for chunk in range(2)], dim=-1)  # (B, H, QT, 2 * KT)
        allowed = allowed.repeat_interleave(bm, 2).repeat_interleave(bn, 3)
        qs = q[:, :, rank * seq:(rank + 1) * seq]
        scores = (qs @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
        expected = (weights @ v).transpose(1, 2)
        out = two("ring_empty", rank)["output"]
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=0, atol=RING_ATOL)
        assert torch.equal(out[0, bm:2 * bm, 0], torch.zeros(bm, q.shape[-1], dtype=out.dtype))


def _merge_sigmoid_form(parts):
    """The running merge of ``(out, lse)`` pairs in the sigmoid form diffusers' ring loop uses:
    ``out -= sigmoid(lse_i - lse) * (out - out_i)``, ``lse -= logsigmoid(lse - lse_i)``."""
    out, lse = parts[0]
    for o, l in parts[1:]:
        out = out - torch.sigmoid(l - lse) * (out - o)
        lse = lse - torch.nn.functional.logsigmoid(lse - l)
    return out


@pytest.mark.parametrize("empty", [(0,), (1,), (3,), (0, 1), (0, 2, 3), (0, 1, 2, 3), ()])
def test_lse_guard_gives_empty_chunks_zero_weight(empty, gen):
    """Four chunks; rows of every kind (mass in some chunks, in none); the guarded merge equals the exact one."""
    rows, chunks = 6, 4
    lses = torch.randn(chunks, rows, 1, generator=gen) * 20
    outs = torch.randn(chunks, rows, 1, 3, generator=gen)
    for c in empty:
        lses[c, :4] = -math.inf  # rows 0-3 are empty in these chunks
        outs[c, :4] = 0.0
    lses[:, 4] = -math.inf  # row 4 is empty everywhere
    outs[:, 4] = 0.0
    guard = LseGuard()
    handed = [(o, guard(lse)[..., None]) for o, lse in zip(outs, lses)]
    merged = _merge_sigmoid_form(handed)
    weights = torch.softmax(lses, dim=0).nan_to_num(0.0)[..., None]
    exact = (weights * outs).sum(0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, exact, rtol=1e-5, atol=1e-6)
    if not empty:  # rows with mass in the first chunk are handed their values unchanged
        assert all(torch.equal(h[:4, :, 0], lse[:4]) for (_, h), lse in zip(handed, lses))
    if empty and empty[0] == 0:  # what the guard prevents
        unguarded = _merge_sigmoid_form([(o, lse[..., None]) for o, lse in zip(outs, lses)])
        assert not torch.isfinite(unguarded).all()


# ---------------------------------------------------------------------------- unified
def test_unified_ring_by_ulysses(four, one):
    """Ranks (ring r, Ulysses u): heads u, query block r. Chunk 0 makes one process's decisions for head u; with
    nothing marked the output is one process's."""
    qt = kt = 5
    compared = 0
    for global_rank in range(4):
        ring, heads = divmod(global_rank, 2)
        res = four("unified", global_rank)
        assert res["fallbacks"] == {}
        torch.testing.assert_close(res["no_skip"], one.no_skip, rtol=0, atol=RING_ATOL)
        assert (res["outputs"][0] - one.dense).abs().max() <= (one.out - one.dense).abs().max()
        for (i, context, states), mine in zip(_forwards(one.snapshots), res["snapshots"][0]):
            for (layer, ctx, _), (counts, indices) in states.items():
                if ctx != context:
                    continue
                theirs = _lists(counts, indices)[0][heads]
                ours = _lists(*mine[(layer, ctx, Part((heads, 2), (ring, 2), 0))])[0][0]
                assert ours == [_chunk(theirs[ring * qt + t], 0, kt) for t in range(qt)], (i, layer, global_rank)
                compared += 1
    assert compared == 4 * 2 * 2 * W.STEPS


# ---------------------------------------------------------------------------- the benchmark script
def test_benchmark_script_runs_its_parallel_part(two):
    assert two("bench", 0)["code"] == two("bench", 1)["code"] == 0
    report = json.loads(Path(two("bench", 0)["out"]).read_text())
    runs = {run["parallel"]: run for run in report["runs"]}
    assert set(runs) == {"ulysses", "ring"} and all(run["processes"] == 2 for run in runs.values())
    assert list(runs["ulysses"]["modes"]) == ["stock", "dense", "liteattn", "forced"]
    assert list(runs["ring"]["modes"]) == ["liteattn", "forced"] and set(runs["ring"]["skipped"]) == {"stock",
                                                                                                      "dense"}
    for run in runs.values():
        forced = run["modes"]["forced"]["sparsity"]
        assert 0.0 < forced[0] == forced[1] < 1.0 and run["modes"]["forced"]["fallbacks"] == {}
        assert all(len(m["step_ms"]) == 2 for m in run["modes"].values())
    assert runs["ulysses"]["modes"]["dense"]["sparsity"] == [0.0, 0.0]
    assert report["nccl_nvls_enable"] == "0"


# ---------------------------------------------------------------------------- one process, no collectives
def _fake_parallel(ring=1, ulysses=1, ring_anything=False):
    cp = SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses, ring_anything=ring_anything,
                         _ring_local_rank=0, _ulysses_local_rank=0)
    return SimpleNamespace(context_parallel_config=cp)


def _runtime(calls=None, text_position=None, **config):
    def dense(*args, **kwargs):
        calls.append(kwargs)
        return args[0]

    config = LiteAttentionConfig(block_size=W.TILES, backend="torch", **config)
    return LayerRuntime("blocks.0.attn1", config, text_position, dense, KeyPaddingMasks(), Counter())


def test_fallback_reasons():
    runtime = _runtime()
    assert fallback_reason(runtime, _fake_parallel(ring=2), None) is None
    assert fallback_reason(runtime, SimpleNamespace(context_parallel_config=None), None) == "context_parallel"
    assert fallback_reason(runtime, _fake_parallel(ulysses=2), torch.ones(1, 8)) == "context_parallel_mask"
    assert fallback_reason(_runtime(skip_rule="per_call"), _fake_parallel(ring=2), None) == "context_parallel_per_call"
    runtime.steer = lambda *args: args[-1]
    assert fallback_reason(runtime, _fake_parallel(ring=2), None) == "context_parallel_steer"
    ranged = _runtime(must_do=[(0, 16)])
    assert fallback_reason(ranged, _fake_parallel(ring=2, ring_anything=True), None) == "context_parallel_must_do"
    assert fallback_reason(ranged, _fake_parallel(ring=2), None) is None  # even blocks: the offsets are known


def test_a_masked_parallel_call_runs_the_original_backend_with_its_configuration():
    calls = []
    runtime = _runtime(calls)
    parallel = _fake_parallel(ulysses=2)
    x = torch.randn(1, 32, 2, 16)
    runtime.enter(ForwardInfo("cond", 0, 0), None)
    with pytest.warns(UserWarning, match="context_parallel_mask"):
        out = runtime.attend(x, x, x, attn_mask=torch.ones(1, 32, dtype=torch.bool), parallel_config=parallel)
    runtime.exit()
    assert out is x and calls[0]["parallel_config"] is parallel
    assert runtime.fallbacks == {"context_parallel_mask": 1}
    assert [r.mode for r in runtime.contexts["cond"].records] == ["fallback"]


def test_parallel_calls_refuse_cuda_graph_capture():
    """Raised inside a capture, the error makes the graphs run that forward eagerly (with one warning)."""
    runtime = _runtime()
    runtime.log = []
    x = torch.randn(1, 32, 2, 16)
    with pytest.raises(NotImplementedError, match="not captured in CUDA graphs"):
        attend(runtime, ForwardInfo("cond", 0, 0), x, x, x, None, False, _fake_parallel(ring=2))


def test_local_ranges_protect_both_sides():
    part = Part((0, 1), (1, 2), 0)  # queries 64..127 against keys 0..63
    assert local_ranges([], part, 64, 64) == []
    assert local_ranges([(0, 16)], part, 64, 64) == [(0, 16)]  # a key range of chunk 0
    assert local_ranges([(100, 110)], part, 64, 64) == [(36, 46)]  # a query range of block 1
    assert local_ranges([(0, 16), (60, 70)], part, 64, 64) == [(0, 16), (60, 64)]
    assert local_ranges([(60, 70)], Part((0, 1), (0, 1), 0), 128, 128) == [(60, 70)]  # Ulysses: the sequence


@pytest.fixture
def bench(monkeypatch):
    """lab/benchmarks/wan14b_parallel.py, loaded with its folder on sys.path (it imports wan14b_shape.py)."""
    folder = Path(__file__).resolve().parents[2] / "lab" / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("wan14b_parallel", folder / "wan14b_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_without_cuda_explains_and_exits_0(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)  # main() sets it when unset: undone after the test
    assert bench.main(["--out", str(tmp_path / "r.json")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out and not (tmp_path / "r.json").exists()


def test_benchmark_script_checks_its_arguments(bench):
    for bad in (["--warmup", "0"], ["--steps", "0"], ["--force-sparsity", "1.0"], ["--parallel", "tree"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "forced" not in bench.parse_args([]).modes
    with pytest.raises(ValueError, match="--parallel unified: expected an even number of processes >= 4, got 2"):
        bench.parallel_config("unified", 2)
