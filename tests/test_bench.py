"""``liteattn bench`` on a CPU: everything but the GPU timing itself.

The GPU part needs CUDA; here we test what decides whether its numbers mean
anything: the masks (fractions, >= 1 tile per query tile), the FlexAttention
BlockMask built from them, the ratio and TFLOP/s arithmetic, the writers,
argument parsing, and the clear message (no traceback) on a CPU machine.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import pytest
import torch

from liteattn import cli
from liteattn.bench import clocks, masks, methods, registry, report, results, run, timing
from liteattn.bench.plot import plot_rows
from liteattn.bench.results import Row

# ---------------------------------------------------------------- CPU message path


def test_cpu_machine_gets_a_clear_message_and_exit_code_1(monkeypatch, capsys):
    # Only the bench subcommand: this test is about bench, not about importing every other subcommand.
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {"bench": cli._SUBCOMMANDS["bench"]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--quick"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "needs a CUDA GPU" in captured.err
    assert "not a performance path" in captured.err
    assert torch.__version__ in captured.err


# ---------------------------------------------------------------- argument parsing


def _parse(argv):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return run.resolve_config(parser.parse_args(argv))


def test_quick_uses_small_shapes_and_few_reps():
    quick, full = _parse(["--quick"]), _parse([])
    assert quick.quick and not full.quick
    assert [s.name for s in quick.shapes] == list(registry.QUICK_SHAPES)
    assert [s.name for s in full.shapes] == list(registry.DEFAULT_SHAPES)
    assert "hunyuan-720p" not in [s.name for s in full.shapes]
    assert max(s.flops for s in quick.shapes) < min(s.flops for s in full.shapes) / 50
    assert quick.budget_ms < full.budget_ms and quick.max_reps < full.max_reps
    assert quick.fractions == full.fractions == list(registry.DEFAULT_FRACTIONS)
    assert [m.name for m in quick.methods] == [m.name for m in full.methods] == list(registry.DEFAULT_METHODS)
    assert set(registry.METHODS) - set(registry.DEFAULT_METHODS) == {"liteattn-int8", "liteattn-int8-sparse",
                                                                      "liteattn-int8-fp8pv",
                                                                      "liteattn-int8-fp8pv-sparse"}


def test_cases_without_a_mask_get_more_runs_in_ten_rounds_by_default():
    """Targets 1-2 compare unmasked calls within 2-3 %: at least 30 runs in 10 orders
    (lab/benchmarks-history.md §2.1)."""
    full, quick = _parse([]), _parse(["--quick"])
    assert (full.rounds, full.min_reps, full.dense_min_reps) == (10, 10, 30)
    assert quick.dense_min_reps == quick.min_reps == 3  # a smoke run stays short
    assert _parse(["--min-reps", "40"]).dense_min_reps == 40  # never fewer than the masked cases get
    assert _parse(["--dense-min-reps", "12", "--rounds", "3"]).dense_min_reps == 12
    assert _parse(["--dense-min-reps", "5"]).dense_min_reps == 10  # the config records what the runner does


def test_unmasked_cases_are_sized_with_dense_min_reps(tmp_path, monkeypatch):
    """With a budget worth fewer runs than either minimum, a case without a pattern (dense, detection) gets
    ``--dense-min-reps`` runs, a masked case ``--min-reps``."""
    from liteattn.bench.runner import BenchRun, _Case

    gpu = _FakeGpu(monkeypatch, call_ms=2.0, host_ms=0.0)
    monkeypatch.setattr(timing, "_flush_buffer", lambda: torch.empty(16, dtype=torch.int8))
    cfg = _parse(["--quick", "--shapes", "quick-d64", "--out", str(tmp_path), "--rounds", "4", "--budget-ms", "1",
                  "--min-reps", "3", "--dense-min-reps", "12"])
    bench_run, shape = BenchRun(cfg), cfg.shapes[0]
    bench_run.time_cases([_Case(shape, "liteattn-detect", lambda: (gpu.call, None)),
                          _Case(shape, "liteattn-sparse", lambda: (gpu.call, None), pattern="random", fraction=0.5)])
    detect, sparse = bench_run.rows
    assert (detect.reps, sparse.reps) == (12, 3)
    assert len(detect.round_medians_ms) == 4 and len(sparse.round_medians_ms) == 3  # 3 runs: one per round


def test_explicit_arguments_override_quick_defaults(tmp_path):
    cfg = _parse(["--quick", "--shapes", "hdim64-16k,quick-d64", "--fractions", "0.1,0.9", "--methods",
                  "flex,liteattn-sparse", "--patterns", "banded", "--budget-ms", "20", "--min-reps", "7",
                  "--layout", "native", "--out", str(tmp_path)])
    assert [s.name for s in cfg.shapes] == ["hdim64-16k", "quick-d64"]
    assert cfg.fractions == [0.1, 0.9]
    assert [m.name for m in cfg.methods] == ["flex", "liteattn-sparse"]
    assert [p.name for p in cfg.patterns] == ["banded"]
    assert (cfg.budget_ms, cfg.min_reps, cfg.layout, cfg.out) == (20.0, 7, "native", tmp_path)
    assert cfg.max_reps >= cfg.min_reps
    assert [s.name for s in _parse(["--shapes", "all"]).shapes] == list(registry.SHAPES)


@pytest.mark.parametrize("argv, needle", [
    (["--shapes", "wan2b"], "--shapes: unknown name"),
    (["--fractions", "0.5,1.0"], "--fractions: each skipped fraction must be in [0, 1)"),
    (["--fractions", "half"], "--fractions: expected comma-separated numbers"),
    (["--methods", "sdpa"], "--methods: unknown name"),
    (["--budget-ms", "0"], "expected a positive float"),
])
def test_bad_arguments_are_usage_errors_naming_the_argument(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_parsers_raise_value_error():
    with pytest.raises(ValueError, match="--patterns"):
        registry.parse_patterns("diagonal")
    with pytest.raises(ValueError, match="--shapes"):
        registry.parse_shapes(" , ")


def test_preset_shapes_and_flops():
    wan = registry.SHAPES["wan1.3b-480p"]
    assert wan.bshd == (1, 32760, 12, 128)
    assert registry.SHAPES["wan14b-720p"].bshd == (1, 75600, 40, 128)
    assert registry.SHAPES["hdim64-16k"].bshd == (1, 16384, 24, 64)
    assert registry.SHAPES["hunyuan-720p"].bshd == (1, 118800, 24, 128)
    assert wan.flops == 4 * 12 * 32760 ** 2 * 128


# ---------------------------------------------------------------- masks


def _fresh() -> torch.Generator:
    """A generator with a non-deterministic seed: the properties must hold for any draw."""
    gen = torch.Generator()
    gen.seed()
    return gen


_SEED = _fresh().initial_seed() % 2**31  # fresh inputs per test session


def _tiles(seq, heads=6, block=128, batch=2):
    n = math.ceil(seq / block)
    return batch, heads, n, n


@pytest.mark.parametrize("pattern", ["random", "random-uneven", "banded", "per-head"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masks_hit_the_fraction_and_keep_a_tile_per_query_tile(pattern, fraction):
    shape = _tiles(32760)  # 256 tiles a side, last one ragged, as Wan 1.3B
    mask = masks.build_mask(pattern, shape, fraction, generator=_fresh())
    assert mask.dtype == torch.bool and mask.shape == shape
    assert mask.sum(-1).min() >= 1
    assert abs(masks.achieved_fraction(mask) - fraction) <= 1.0 / shape[-1]


@pytest.mark.parametrize("pattern", ["random", "random-uneven", "banded", "per-head"])
def test_masks_keep_one_tile_even_when_almost_everything_is_skipped(pattern):
    mask = masks.build_mask(pattern, (1, 3, 5, 4), 0.99, generator=_fresh())
    assert (mask.sum(-1) == 1).all()


def _three_draws(builder, shape):
    """Two draws with one seed and one with the next seed."""
    seed = _fresh().initial_seed()
    return [builder(shape, 0.5, generator=torch.Generator().manual_seed(x)) for x in (seed, seed, seed + 1)]


def test_random_masks_differ_between_rows_and_follow_the_seed():
    a, b, c = _three_draws(masks.random_mask, (1, 2, 40, 40))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(-1) == 20).all()  # the same count per query tile ...
    assert len({tuple(row.tolist()) for row in a.reshape(-1, 40)}) > 70  # ... at different places
    # every key tile is used somewhere: uniform, not a fixed subset
    assert a.any(dim=(0, 1, 2)).all()


def test_random_uneven_masks_differ_in_count_between_rows_and_follow_the_seed():
    a, b, c = _three_draws(masks.random_uneven_mask, (2, 3, 40, 40))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(dim=(-2, -1)) == 800).all()  # the same count per (batch, head) ...
    counts = a.sum(-1).float()
    assert counts.std() > 1.5 and counts.min() < 20 < counts.max()  # ... not per query tile (binomial: std ~ 3.2)


def test_banded_mask_is_a_contiguous_window_around_the_diagonal():
    mask = masks.banded_mask((1, 1, 30, 30), 0.8)
    keep = masks.keep_count(0.8, 30)
    for i, row in enumerate(mask[0, 0]):
        cols = row.nonzero().flatten()
        assert len(cols) == keep
        assert cols[-1] - cols[0] == keep - 1  # contiguous
        assert cols[0] <= i <= cols[-1]  # covers the diagonal


def test_per_head_masks_differ_between_heads_with_mean_fraction():
    mask = masks.per_head_mask((2, 8, 64, 64), 0.6, generator=_fresh())
    per_head = 1.0 - mask.float().mean(dim=(0, 2, 3))
    assert len(set(per_head.tolist())) == 8  # every head its own fraction
    assert per_head.max() - per_head.min() > 0.2
    assert abs(per_head.mean().item() - 0.6) <= 1.0 / 64
    assert torch.equal(mask[0], mask[1])  # batch entries share the heads' pattern
    fractions = masks.per_head_fractions(0.9, 5)
    assert abs(sum(fractions) / 5 - 0.9) < 1e-12 and all(0 <= f < 1 for f in fractions)


@pytest.mark.parametrize("builder, kwargs, needle", [
    (masks.random_mask, dict(shape=(1, 1, 4, 4), fraction=1.0), "fraction"),
    (masks.banded_mask, dict(shape=(1, 0, 4, 4), fraction=0.5), "shape"),
    (masks.build_mask, dict(pattern="stripes", shape=(1, 1, 4, 4), fraction=0.5), "pattern"),
])
def test_mask_builders_reject_bad_input(builder, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        builder(**kwargs)


# ---------------------------------------------------------------- the methods' inputs and masks


def test_flex_block_mask_covers_exactly_the_tile_mask():
    mask = masks.random_mask((1, 3, 7, 7), 0.5, generator=_fresh())
    block_mask = methods.flex_block_mask(mask, 200, (32, 32))
    assert torch.equal(block_mask.to_dense().bool(), mask)
    assert block_mask.seq_lengths == (200, 200)
    assert int(block_mask.kv_num_blocks.sum()) == 0  # every tile is a full block: no mask_mod evaluated
    assert torch.equal(block_mask.full_kv_num_blocks, mask.sum(-1, dtype=torch.int32))


def test_sparse_and_detect_methods_on_the_reference_backend():
    shape = registry.Shape("tiny", 1, 100, 2, 32)
    inputs = methods.make_inputs(shape, "shared", "cpu", seed=_SEED, dtype=torch.float32)
    assert inputs.qh.data_ptr() == inputs.q.data_ptr()  # shared: one allocation, two views
    assert inputs.q.std() > 0.5
    mask = masks.banded_mask(inputs.tiles, 0.0)
    # With nothing skipped, the sparse and detect paths equal SDPA.
    ref = torch.nn.functional.scaled_dot_product_attention(inputs.qh, inputs.kh, inputs.vh)
    sparse, state = methods.liteattn_sparse(inputs, mask)
    detect, marked = methods.liteattn_detect(inputs)
    for out in (sparse(), detect(), methods.liteattn_dense(inputs)()):
        max_abs, rel_l2, ref_max = methods.compare(out.transpose(1, 2), ref)
        assert results.judge_errors(max_abs, rel_l2, ref_max) and rel_l2 < 1e-5
    assert marked() == 0
    assert state.sparsity() == 0.0
    native = methods.make_inputs(shape, "native", "cpu", seed=_SEED, dtype=torch.float32)
    assert native.qh.is_contiguous() and torch.equal(native.qh, inputs.qh)


def test_sparse_method_skips_the_mask_tiles():
    shape = registry.Shape("tiny", 1, 64, 2, 16)
    inputs = methods.make_inputs(shape, "shared", "cpu", seed=_SEED, dtype=torch.float32)
    inputs.block = (16, 16)  # 4 x 4 tiles
    mask = masks.random_mask(inputs.tiles, 0.5, generator=_fresh())
    call, state = methods.liteattn_sparse(inputs, mask)
    assert torch.equal(state.to_dense(), mask)
    out = call().transpose(1, 2)
    token_mask = mask.repeat_interleave(16, -1).repeat_interleave(16, -2)
    ref = torch.nn.functional.scaled_dot_product_attention(inputs.qh, inputs.kh, inputs.vh, attn_mask=token_mask)
    assert methods.compare(out, ref)[1] < 1e-5
    full = torch.nn.functional.scaled_dot_product_attention(inputs.qh, inputs.kh, inputs.vh)
    assert methods.compare(out, full)[1] > 1e-2  # skipping changed the result: the mask was applied


def test_compare_and_tolerances():
    ref = torch.randn(2, 3, 50, 16)
    assert methods.compare(ref, ref)[:2] == (0.0, 0.0)
    noisy = ref + 1e-3 * torch.randn_like(ref)
    assert results.judge_errors(*methods.compare(noisy, ref))
    wrong = ref.clone()
    wrong[:, :, :10] = torch.randn(2, 3, 10, 16)
    assert not results.judge_errors(*methods.compare(wrong, ref))
    assert not results.judge_errors(float("nan"), float("nan"), 1.0)
    # fp8 P.V's tolerance takes its rounding (about 4 % relative L2 on random inputs), not a wrong tile
    fp8_like = ref + 0.03 * ref.abs() * torch.randn_like(ref).clamp(-2, 2)
    assert not results.judge_errors(*methods.compare(fp8_like, ref))
    assert results.judge_errors(*methods.compare(fp8_like, ref), results.FP8_PV_TOLERANCE)
    assert not results.judge_errors(*methods.compare(wrong, ref), results.FP8_PV_TOLERANCE)
    with pytest.raises(ValueError, match="actual"):
        methods.compare(ref[:1], ref)


# ---------------------------------------------------------------- timing statistics and ratios


def test_summarize_percentiles():
    t = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.reps) == (3.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)  # numpy's linear interpolation
    assert timing.summarize([7.5]).p80_ms == 7.5
    with pytest.raises(ValueError, match="samples_ms"):
        timing.summarize([])
    with pytest.raises(ValueError, match="samples_ms"):
        timing.summarize([1.0, float("nan")])


def test_reps_for_budget_and_tflops():
    assert timing.reps_for_budget(10.0, 300.0, 5, 50) == 30
    assert timing.reps_for_budget(200.0, 300.0, 5, 50) == 5  # slow calls still get min_reps
    assert timing.reps_for_budget(0.01, 300.0, 5, 50) == 50
    with pytest.raises(ValueError, match="min_reps"):
        timing.reps_for_budget(1.0, 10.0, 0, 5)
    assert timing.tflops(2e12, 1000.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ms"):
        timing.tflops(1.0, 0.0)


def _fake_rows():
    shape = registry.SHAPES["wan1.3b-480p"]
    t = lambda ms: timing.Timing(ms, ms * 0.98, ms * 1.03, 20)  # noqa: E731
    rows = [
        results.timed_row(shape.name, shape.flops, "sdpa-cudnn", t(10.0)),
        results.timed_row(shape.name, shape.flops, "liteattn-dense", t(9.5)),
        results.timed_row(shape.name, shape.flops, "liteattn-detect", t(9.9)),
        results.failed_row(shape.name, "sdpa-flash", "RuntimeError: No available kernel"),
    ]
    for pattern, skipped, lite_ms, flex_ms in (("random", 0.5, 5.0, 6.0), ("random", 0.9, 1.2, 1.0),
                                               ("banded", 0.5, 4.9, 5.5)):
        rows.append(results.timed_row(shape.name, shape.flops, "liteattn-sparse", t(lite_ms), pattern=pattern,
                                      fraction=skipped, skipped=skipped))
        rows.append(results.timed_row(shape.name, shape.flops, "flex", t(flex_ms), pattern=pattern,
                                      fraction=skipped, skipped=skipped))
    return rows


def test_rows_carry_tflops_and_effective_tflops():
    rows = _fake_rows()
    flops = registry.SHAPES["wan1.3b-480p"].flops
    cudnn = rows[0]
    assert cudnn.tflops == pytest.approx(flops / 10e-3 / 1e12) == pytest.approx(cudnn.effective_tflops)
    sparse = rows[4]  # liteattn-sparse, random, s=0.5, 5 ms
    assert sparse.tflops == pytest.approx(flops / 5e-3 / 1e12)
    assert sparse.effective_tflops == pytest.approx(0.5 * flops / 5e-3 / 1e12)


def test_rows_carry_the_host_time_per_call():
    """The host's time per call travels with the GPU time, so a host-bound method is visible in the JSON."""
    shape = registry.SHAPES["wan1.3b-480p"]
    row = results.timed_row(shape.name, shape.flops, "liteattn-dense", timing.Timing(10.0, 9.8, 10.3, 20, 0.42))
    assert row.host_ms == 0.42 and row.to_dict()["host_ms"] == 0.42
    assert results.timed_row(shape.name, shape.flops, "sdpa-cudnn", timing.Timing(10.0, 9.8, 10.3, 20)).host_ms is None


def test_ratios_from_hand_made_rows():
    ratios = {(r.name, r.pattern, r.fraction): r for r in results.compute_ratios(_fake_rows())}
    dense = ratios[("liteattn-dense / sdpa-cudnn", None, 0.0)]
    assert dense.value == pytest.approx(0.95) and dense.target == 1.00 and dense.ok
    detect = ratios[("liteattn-detect / liteattn-dense", None, 0.0)]
    assert detect.value == pytest.approx(9.9 / 9.5) and not detect.ok  # 4.2% > the 3% target
    sparse = ratios[("liteattn-sparse / ((1-s) sdpa-cudnn)", "random", 0.5)]
    assert sparse.value == pytest.approx(5.0 / (0.5 * 10.0)) and sparse.ok
    sparse_own = ratios[("liteattn-sparse / ((1-s) liteattn-dense)", "random", 0.9)]
    assert sparse_own.value == pytest.approx(1.2 / (0.1 * 9.5)) and not sparse_own.ok
    flex = ratios[("flex / ((1-s) sdpa-cudnn)", "banded", 0.5)]
    assert flex.value == pytest.approx(5.5 / 5.0) and flex.ok
    assert len(ratios) == 2 + 3 * 2 * 2
    # A failed denominator drops the ratios that need it instead of inventing them.
    rows = [r for r in _fake_rows() if r.method != "sdpa-cudnn"]
    names = {r.name for r in results.compute_ratios(rows)}
    assert not any("sdpa-cudnn" in n for n in names) and "liteattn-detect / liteattn-dense" in names


def test_run_status_verdicts():
    ok = results.Check("s", "c", "passed", 1e-3, 1e-3, 1.0)
    rows = _fake_rows()
    assert results.run_status([ok], rows) == "passed"  # a failed method row is a platform fact, not a failure
    assert results.run_status([ok, results.Check("s", "c", "failed", 1.0, 1.0, 1.0)], rows) == "failed"
    assert results.run_status([ok, results.Check("s", "c", "error", detail="flex")], rows) == "unchecked"
    skipped = results.failed_row("s", "flex", "time", status="skipped")
    assert results.run_status([ok], rows + [skipped]) == "incomplete"


# ---------------------------------------------------------------- writers


def test_table_json_and_png_writers(tmp_path):
    rows = _fake_rows()
    checks = [results.Check("wan1.3b-480p", "liteattn-dense vs sdpa-cudnn", "passed", 2e-4, 3e-3, 0.05),
              results.Check("wan1.3b-480p", "liteattn-sparse vs flex", "failed", float("nan"), float("nan"), 0.05)]
    ratios = results.compute_ratios(rows)
    table = report.format_rows(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert len({line.index("  ") for line in lines[2:]}) == 1  # aligned: the first column ends at the same place
    assert "failed: RuntimeError: No available kernel" in table
    assert "MISSED" in report.format_ratios(ratios) and "1.100" in report.format_ratios(ratios)
    assert "nan" in report.format_checks(checks)

    payload = {"status": results.run_status(checks, rows), "environment": report.environment(["liteattn", "bench"]),
               "checks": checks, "rows": rows, "ratios": ratios}
    path = report.write_json(tmp_path / "out" / "bench.json", payload)
    data = json.loads(path.read_text())
    assert data["status"] == "failed"
    assert data["environment"]["command"] == "liteattn bench"
    assert {"torch", "triton", "liteattn", "device", "date"} <= set(data["environment"])
    assert len(data["rows"]) == len(rows) and data["rows"][0]["method"] == "sdpa-cudnn"
    assert data["checks"][1]["max_abs"] == "nan"  # strict JSON even with NaN errors
    assert {"name", "value", "target", "ok"} <= set(data["ratios"][0])

    png = plot_rows(rows, tmp_path / "out" / "bench.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_rows([results.failed_row("s", "flex", "x")], tmp_path / "none.png") is None


def test_cli_imports_no_heavy_optional_dependency():
    import subprocess
    import sys

    code = ("import sys, liteattn.bench.run, liteattn.bench.runner; "
            "print(sorted(m for m in ('matplotlib', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_row_round_trips_as_dict():
    row = Row("s", "flex", "random", 0.5, 0.49, "ok", "", 1.0, 0.9, 1.1, 10, 3.0, 1.5)
    assert Row(**row.to_dict()) == row


class _FakeGpu:
    """A GPU timeline for ``time_cuda`` on a CPU machine: events read the clock, a sleep and each call
    advance it; ``_sleep`` runs at 1e6 cycles per ms. A call also advances a fake host clock by ``host_ms``
    (the timer reads no real clock, so a stall of the machine running the tests changes nothing)."""

    def __init__(self, monkeypatch, call_ms: float, host_ms: float):
        self.now, self.call_ms, self.host_ms, self.sleeps = 0.0, call_ms, host_ms, []
        self.host_now_ms = 0.0
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = gpu.now

            def elapsed_time(self, end):
                return end.t - self.t

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", self.sleep, raising=False)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(timing, "_host_seconds", lambda: gpu.host_now_ms / 1e3)

    def sleep(self, cycles):
        self.sleeps.append(cycles / 1e6)
        self.now += cycles / 1e6

    def call(self):
        self.host_now_ms += self.host_ms
        self.now += self.call_ms


def test_time_cuda_lets_the_host_get_ahead(monkeypatch):
    """The GPU sleeps 1.5x the host's time to issue every run (plus 1 ms) before the first timed run, then
    the runs' GPU times and the host's time per run come back."""
    gpu = _FakeGpu(monkeypatch, call_ms=2.0, host_ms=0.5)
    t = timing.time_cuda(gpu.call, budget_ms=20.0, min_reps=4, max_reps=8, flush_l2=False)
    assert t.reps == 8 and t.median_ms == t.p20_ms == t.p80_ms == pytest.approx(2.0)
    assert t.host_ms == pytest.approx(0.5)
    calibration, lead = gpu.sleeps  # one to measure the clock, one lead before the timed runs (no retry)
    assert lead == pytest.approx(1.5 * 0.5 * 8 + 1.0)

    gpu.sleeps.clear()
    timing.time_cuda(gpu.call, budget_ms=20.0, min_reps=4, max_reps=8, flush_l2=False, host_lead=False)
    assert gpu.sleeps == []


def test_time_cuda_repeats_with_a_longer_lead_when_the_gpu_caught_up(monkeypatch):
    """A host that slows down after the estimate outlasts the first lead: the runs are repeated."""
    gpu = _FakeGpu(monkeypatch, call_ms=1.0, host_ms=0.0)

    def fn():
        gpu.call()
        gpu.host_ms = 2.0  # the estimate's call was instant, every later one takes 2 ms

    timing.time_cuda(fn, budget_ms=5.0, min_reps=5, max_reps=5, warmup=0, flush_l2=False)
    _, first_lead, second_lead = gpu.sleeps
    assert first_lead == pytest.approx(1.0) and second_lead == pytest.approx(3.0 * 2.0 * 5 + 1.0)


def test_split_reps_spreads_runs_over_rounds():
    assert timing.split_reps(5, 3) == [2, 2, 1]
    assert timing.split_reps(2, 3) == [1, 1]  # no empty round
    assert timing.split_reps(7, 1) == [7]
    with pytest.raises(ValueError, match="reps/rounds"):
        timing.split_reps(0, 3)


def _bench_run(tmp_path, monkeypatch, rounds: int):
    """A BenchRun on the CPU: the fake GPU's clock, no L2 flush buffer on a device."""
    from liteattn.bench.runner import BenchRun

    monkeypatch.setattr(timing, "_flush_buffer", lambda: torch.empty(16, dtype=torch.int8))
    cfg = _parse(["--quick", "--shapes", "quick-d64", "--out", str(tmp_path), "--rounds", str(rounds),
                  "--budget-ms", "16", "--min-reps", "8"])
    return BenchRun(cfg), cfg.shapes[0]


def _drifting_case(gpu, shape, method, fail_in_round=None, fail_after=False):
    """A case whose calls all cost the same work, while the fake GPU's clock slows 0.5 % per call."""
    from liteattn.bench.runner import _Case

    calls = {"n": 0}

    def call():
        calls["n"] += 1
        if fail_in_round is not None and calls["n"] > 2 + 2 * fail_in_round:  # warm-up + sizing + 2 per round
            raise RuntimeError(f"{method} broke")
        gpu.call_ms = 2.0 * (1.005 ** gpu.calls)
        gpu.calls += 1
        gpu.call()

    def after():
        if fail_after:
            raise RuntimeError("the state changed while timing")

    return _Case(shape, method, lambda: (call, after))


@pytest.mark.parametrize("rounds,close", [(1, False), (4, True)])
def test_interleaved_rounds_give_cases_the_same_clock(tmp_path, monkeypatch, rounds, close):
    """Two cases of equal work on a GPU that slows down as it runs: timed back to back the later one looks
    several percent slower; in rounds (in shuffled order) both see nearly the same clocks."""
    gpu = _FakeGpu(monkeypatch, call_ms=2.0, host_ms=0.0)
    gpu.calls = 0
    bench_run, shape = _bench_run(tmp_path, monkeypatch, rounds)
    cases = [_drifting_case(gpu, shape, m) for m in ("sdpa-cudnn", "liteattn-dense")]
    bench_run.time_cases(cases)
    first, second = bench_run.rows
    assert [first.method, second.method] == ["sdpa-cudnn", "liteattn-dense"]
    assert first.status == second.status == "ok" and first.reps == second.reps == 8
    assert len(first.round_medians_ms) == rounds
    ratio = second.median_ms / first.median_ms
    assert (abs(ratio - 1) < 0.012) if close else (abs(ratio - 1) > 0.03), ratio


def test_rounds_shuffle_the_order_and_report_in_case_order(tmp_path, monkeypatch):
    """Each round times the cases in a new order (no case always follows the same one); rows keep the
    cases' order."""
    from liteattn.bench.runner import _Case

    gpu = _FakeGpu(monkeypatch, call_ms=1.0, host_ms=0.0)
    bench_run, shape = _bench_run(tmp_path, monkeypatch, 4)
    timed = []
    names = ["sdpa-cudnn", "sdpa-flash", "liteattn-dense", "liteattn-detect", "liteattn-detect-list", "flex"]

    def case(name):
        def call():
            timed.append(name)
            gpu.call()
        return _Case(shape, name, lambda: (call, None))

    sleep = gpu.sleep
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: timed.append("lead") or sleep(cycles))
    bench_run.time_cases([case(n) for n in names])
    assert [r.method for r in bench_run.rows] == names
    assert [n for n in timed if n != "lead"][:2 * len(names)] == [n for n in names for _ in range(2)]
    batches = [timed[i + 1] for i, n in enumerate(timed[:-1]) if n == "lead" and timed[i + 1] != "lead"]
    batches = batches[len(names):]  # after warm-up and sizing (the clock calibration sleeps before each sizing)
    per_round = [batches[i * len(names):(i + 1) * len(names)] for i in range(4)]
    assert len(batches) == 4 * len(names) and all(sorted(r) == sorted(names) for r in per_round)
    assert len({tuple(r) for r in per_round}) > 1, per_round


def test_rounds_record_failures_per_case_and_keep_the_others(tmp_path, monkeypatch):
    gpu = _FakeGpu(monkeypatch, call_ms=2.0, host_ms=0.0)
    gpu.calls = 0
    bench_run, shape = _bench_run(tmp_path, monkeypatch, 4)
    cases = [_drifting_case(gpu, shape, "sdpa-cudnn", fail_in_round=2),
             _drifting_case(gpu, shape, "liteattn-dense", fail_after=True),
             _drifting_case(gpu, shape, "liteattn-detect")]
    bench_run.time_cases(cases)
    broke, changed, fine = bench_run.rows
    assert broke.status == "failed" and "sdpa-cudnn broke" in broke.error
    assert changed.status == "failed" and "state changed" in changed.error
    assert fine.status == "ok" and fine.reps == 8 and len(fine.round_medians_ms) == 4
    assert all(c.timer is None and c.fn is None for c in cases)  # buffers released

    bench_run.deadline = time.monotonic() - 1.0
    bench_run.time_cases([_drifting_case(gpu, shape, "sdpa-flash")])
    assert bench_run.rows[-1].status == "skipped" and "--max-minutes" in bench_run.rows[-1].error


# ---------------------------------------------------------------- SM clock and power per case


def test_clock_samples_parse_and_summarize_inside_the_case_windows():
    lines = ["timestamp, clocks.sm [MHz], power.draw [W]\n",  # a header, if one is printed
             "2026/11/30 10:00:00.000, 1500, 600.5\n",
             "2026/11/30 10:00:00.020, [N/A], 601.0\n",
             "2026/11/30 10:00:00.040, 1600, 700.0\n",
             "2026/11/30 10:00:00.060, 1700, 690.0\n",
             "2026/11/30 10:00:00.080, 1700, 69"]  # cut by the sampler's stop: not a 69 W sample
    samples = clocks.parse_samples(lines)
    assert [(mhz, w) for _, mhz, w in samples] == [(1500, 600.5), (1600, 700.0), (1700, 690.0)]
    t0 = samples[0][0]
    assert samples[1][0] - t0 == pytest.approx(0.04)
    got = clocks.summarize(samples, [(t0 - 0.001, t0 + 0.001), (t0 + 0.05, t0 + 0.07)])
    assert got == clocks.ClockSummary(1600.0, 645.25, 2)  # medians of the first and the last sample
    assert clocks.summarize(samples, [(t0 + 0.01, t0 + 0.03)]) == clocks.ClockSummary(None, None, 0)


def test_clock_sampler_reads_back_what_its_process_printed():
    """A stand-in for nvidia-smi printing a sample every 5 ms until the sampler stops it."""
    script = ("import datetime, sys, time\n"
              "while True:\n"
              "    print(datetime.datetime.now().strftime('%Y/%m/%d %H:%M:%S.%f')[:-3] + ', 1410, 650.0', flush=True)\n"
              "    time.sleep(0.005)\n")
    start = clocks.host_now()
    sampler = clocks.ClockSampler(command=[sys.executable, "-c", script])
    time.sleep(0.5)
    samples = sampler.stop()
    assert len(samples) >= 5 and sampler.error == ""
    assert all(start - 1.0 <= t <= clocks.host_now() + 1.0 for t, _, _ in samples)
    assert clocks.summarize(samples, [(start - 1.0, clocks.host_now() + 1.0)]).sm_clock_mhz == 1410.0
    assert sampler.stop() == []  # stopping twice is harmless


def test_clock_sampler_without_nvidia_smi_says_so(monkeypatch):
    monkeypatch.setattr(clocks.shutil, "which", lambda name: None)
    sampler = clocks.ClockSampler("0")
    assert sampler.stop() == [] and sampler.error == "nvidia-smi not found"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_clock_sampler_that_fails_says_why(stream):
    """A sampler that exits at once (e.g. an unknown device) leaves its complaint in ``error``, from either
    stream (nvidia-smi writes it to stdout)."""
    script = f"import sys; sys.{stream}.write('No devices were found\\n'); sys.exit(6)"
    sampler = clocks.ClockSampler(command=[sys.executable, "-c", script])
    sampler.wait_for_first_sample(timeout_s=5.0)  # returns once the process has written or exited
    assert sampler.stop() == [] and sampler.error == "nvidia-smi gave no samples (No devices were found)"


def test_clock_sampler_process_ends_with_the_context_even_on_an_error():
    script = "import time\nwhile True:\n    time.sleep(0.01)\n"
    with pytest.raises(RuntimeError, match="case broke"):
        with clocks.ClockSampler(command=[sys.executable, "-c", script]) as sampler:
            proc = sampler._proc
            raise RuntimeError("case broke")
    assert proc.poll() is not None and sampler._proc is None


@pytest.mark.parametrize("sample", [True, False])
def test_rounds_record_each_cases_clock_from_its_own_batches(tmp_path, monkeypatch, sample):
    """Each case's SM clock is the median over the samples taken during its own timed batches (a fake
    sampler: the host clock ticks once per read, and the sample at t + 0.5 reads 1000 + t MHz); with
    ``--no-clocks`` no sampler runs and the rows have no clock."""
    from liteattn.bench.runner import _Case

    gpu = _FakeGpu(monkeypatch, call_ms=1.0, host_ms=0.0)
    tick = {"t": 0}

    def host_now():
        tick["t"] += 1
        return float(tick["t"])

    class FakeSampler:
        def __init__(self, device):
            assert sample, "--no-clocks must not start a sampler"
            self.error = ""

        def wait_for_first_sample(self):
            pass

        def stop(self):
            return [(t + 0.5, 1000.0 + t, 500.0 + t) for t in range(tick["t"] + 1)]

    monkeypatch.setattr(clocks, "host_now", host_now)
    monkeypatch.setattr(clocks, "ClockSampler", FakeSampler)
    monkeypatch.setattr(clocks, "device_id", lambda: "GPU-test")
    bench_run, shape = _bench_run(tmp_path, monkeypatch, 3)
    bench_run.config.clocks = sample
    cases = [_Case(shape, name, lambda: (gpu.call, None)) for name in ("sdpa-cudnn", "liteattn-dense")]
    bench_run.time_cases(cases)
    windows = {c.method: c.windows for c in cases}
    assert all(len(w) == 3 for w in windows.values())
    assert [row.status for row in bench_run.rows] == ["ok", "ok"]
    for row in bench_run.rows:
        if not sample:
            assert row.sm_clock_mhz is None and row.power_w is None and row.clock_samples == 0
            continue
        starts = [a for a, _ in windows[row.method]]  # one sample (t + 0.5) inside each (t, t + 1) window
        assert row.clock_samples == 3
        assert row.sm_clock_mhz == pytest.approx(1000.0 + sorted(starts)[1])
        assert row.power_w == pytest.approx(500.0 + sorted(starts)[1])
    table = report.format_rows(bench_run.rows)
    assert "SM MHz" in table.splitlines()[0]


def test_clock_lines_name_each_case_with_its_medians():
    """The ``--clocks`` lines of the benchmark scripts: tuple keys print as their parts, a case without samples
    prints None, and the sampler's error is kept."""
    t0 = 1000.0
    samples = [(t0, 1500.0, 600.0), (t0 + 1, 1700.0, 700.0), (t0 + 2, 1600.0, 650.0)]
    lines = clocks.case_lines(samples, {("hdim64", "persist", "dense"): [(t0 - 0.5, t0 + 1.5)],
                                        "iid": [(t0 + 5, t0 + 6)]}, error="nvidia-smi exited with 9")
    assert lines == ["clocks hdim64 persist dense SM MHz median 1600.0 power W median 650.0 samples 2 "
                     "nvidia-smi exited with 9",
                     "clocks iid SM MHz median None power W median None samples 0 nvidia-smi exited with 9"]
    assert clocks.case_lines(samples, {"all": [(t0, t0 + 2)]}) == [
        "clocks all SM MHz median 1600.0 power W median 650.0 samples 3"]
