"""The GPU run: correctness gate, timing of every case, incremental output.

Why failures are rows and not exceptions: a method that is unavailable on a
GPU (an SDPA backend, a Triton feature) or runs out of memory is a result
worth reporting next to the others, with its error text; one broken method
must not take the whole comparison down. Outputs are rewritten after every
shape, so a run stopped by a time limit still leaves its finished shapes.
"""
from __future__ import annotations

import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import clocks as C
from . import methods as M
from .config import SPARSE_CHECK_FRACTION, BenchConfig
from .masks import achieved_fraction, build_mask
from .plot import plot_rows
from .registry import Shape
from .report import environment, format_checks, format_ratios, format_rows, write_json, write_text
from .results import (BF16_TOLERANCE, FP8_PV_TOLERANCE, RATIO_TARGETS, Check, Row, Tolerance, compute_ratios,
                      failed_row, judge_errors, run_status, timed_row)
from .timing import CaseTimer, release_flush_buffers, split_reps

__all__ = ["BenchRun"]


class BenchRun:
    def __init__(self, config: BenchConfig):
        self.config = config
        self.rows: list[Row] = []
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.start = time.monotonic()
        self.deadline = self.start + 60.0 * config.max_minutes
        self.env = environment()
        self.selected = {m.name for m in config.methods}

    # ------------------------------------------------------------------ top level
    def run(self) -> int:
        c = self.config
        self._say(f"liteattn bench on {self.env['device']} | torch {self.env['torch']} | triton {self.env['triton']} "
                  f"| liteattn {self.env['liteattn']}")
        self._say(f"layout: {c.layout}: {M.LAYOUT_NOTES[c.layout]}")
        self._say(f"shapes: {', '.join(s.name for s in c.shapes)} | methods: {', '.join(sorted(self.selected))} | "
                  f"patterns: {', '.join(p.name for p in c.patterns)} | s: {c.fractions} | bf16, non-causal")
        for i, shape in enumerate(c.shapes):
            self._say(f"== shape {i + 1}/{len(c.shapes)}: {shape.name} (B, S, H, D) = {shape.bshd}, "
                      f"{shape.flops / 1e12:.1f} TFLOP dense")
            try:
                self._shape(shape)
            except Exception as exc:  # inputs or masks could not even be built (e.g. out of memory)
                self.notes.append(f"{shape.name}: {_describe(exc)}")
                self.rows.append(failed_row(shape.name, "*", _describe(exc)))
                self._say(f"   shape failed: {_describe(exc)}")
            release_flush_buffers()
            _release()
            self._write(final=False)
        return self._finish()

    def _shape(self, shape: Shape) -> None:
        c = self.config
        inputs = M.make_inputs(shape, c.layout, "cuda", c.seed)
        self._gate(inputs)
        dense = {
            "sdpa-cudnn": lambda: (M.sdpa(inputs, "cudnn"), None),
            "sdpa-flash": lambda: (M.sdpa(inputs, "flash"), None),
            "liteattn-dense": lambda: (M.liteattn_dense(inputs), None),
            "liteattn-int8": lambda: (M.liteattn_dense(inputs, "int8"), None),
            "liteattn-int8-fp8pv": lambda: (M.liteattn_dense(inputs, "int8", "fp8"), None),
            "liteattn-detect": lambda: _with_detect_check(*M.liteattn_detect(inputs)),
            "liteattn-detect-list": lambda: _with_detect_check(*M.liteattn_detect(inputs, fresh=False)),
        }
        cases = [_Case(shape, name, build) for name, build in dense.items() if name in self.selected]
        sparse = [m for m in ("flex", "liteattn-sparse", "liteattn-int8-sparse", "liteattn-int8-fp8pv-sparse")
                  if m in self.selected]
        gen = torch.Generator(device="cuda").manual_seed(c.seed + 1)
        for pattern in c.patterns if sparse else ():
            for fraction in c.fractions:
                mask = build_mask(pattern.name, inputs.tiles, fraction, generator=gen, device="cuda")
                builders = {
                    "flex": lambda mask=mask: (M.flex(inputs, mask), None),
                    "liteattn-sparse": lambda mask=mask: _with_sparse_check(*M.liteattn_sparse(inputs, mask), mask),
                    "liteattn-int8-sparse": lambda mask=mask: _with_sparse_check(
                        *M.liteattn_sparse(inputs, mask, "int8"), mask),
                    "liteattn-int8-fp8pv-sparse": lambda mask=mask: _with_sparse_check(
                        *M.liteattn_sparse(inputs, mask, "int8", "fp8"), mask),
                }
                got = achieved_fraction(mask)
                cases += [_Case(shape, name, builders[name], pattern.name, fraction, got) for name in sparse]
        self.time_cases(cases)

    def time_cases(self, cases: list[_Case]) -> None:
        """Build and size every case, time them all in ``config.rounds`` rounds (each in its own shuffled
        order), then check and report them in the given order.

        A case that fails at any step becomes a failed row with its error and warnings; the others go on.
        The deadline stops new cases from being built, not the rounds of those already built.
        """
        c = self.config
        for case in cases:
            if time.monotonic() > self.deadline:
                case.fail(f"not run: --max-minutes {c.max_minutes} used up", status="skipped")
                continue
            self._attempt(case, lambda case=case: case.start(c))
        sampler = C.ClockSampler(C.device_id()) if c.clocks else None
        try:
            if sampler is not None:
                sampler.wait_for_first_sample()
            for i in range(c.rounds):
                self._say(f"   round {i + 1}/{c.rounds}")
                # A new order every round: under a power cap a kernel runs faster right after a light one (the
                # clock moved between 1320 and 1980 MHz on an H200 at 700 W), so no case may always follow the
                # same one.
                for case in random.Random(c.seed * 1000 + i).sample(cases, len(cases)):
                    if case.row is None and i < len(case.rounds):
                        start = C.host_now()
                        self._attempt(case, lambda case=case: case.timer.run(case.rounds[i]))
                        case.windows.append((start, C.host_now()))
        finally:
            samples = sampler.stop() if sampler is not None else []
        if sampler is not None and sampler.error:
            self._note("clocks", f"SM clock not sampled: {sampler.error}")
        for case in cases:
            if case.row is None:
                self._attempt(case, lambda case=case: case.after and case.after())
            if case.row is None:
                case.row = timed_row(case.shape.name, case.shape.flops, case.method, case.timer.result(),
                                     pattern=case.pattern, fraction=case.fraction, skipped=case.skipped,
                                     clocks=C.summarize(samples, case.windows))
            case.release()
            self._report(case)

    def _attempt(self, case: _Case, step: Callable[[], object]) -> None:
        """Run one step of a case; on an exception the case becomes a failed row (with the warnings seen)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                step()
            except Exception as exc:
                case.fail(_describe(exc, case.warnings + caught))
            finally:
                if case.fn is not None:
                    self._note(case.shape.name, getattr(case.fn, "note", ""))
            case.warnings += caught
            if case.row is not None:
                case.release()
                _release()

    # ------------------------------------------------------------------ correctness gate
    def _gate(self, inputs: M.Inputs) -> None:
        """liteattn dense (and its int8 mode, when selected) vs SDPA, liteattn-sparse vs flex; failures are recorded,
        never raised."""
        name = inputs.shape.name
        reference, ref_name, errors = None, None, []
        for method, backend in (("sdpa-cudnn", "cudnn"), ("sdpa-flash", "flash")):
            try:
                reference, ref_name = _quiet(M.sdpa(inputs, backend)), method
                break
            except Exception as exc:
                errors.append(f"{method}: {_describe(exc)}")
        if reference is None:
            self._add_check(Check(name, "liteattn-dense vs sdpa", "error", detail="; ".join(errors)))
        else:
            self._add_check(self._compare(name, f"liteattn-dense vs {ref_name}",
                                          lambda: _quiet(M.liteattn_dense(inputs)).transpose(1, 2), reference))
            if "liteattn-int8" in self.selected or "liteattn-int8-sparse" in self.selected:
                self._add_check(self._compare(name, f"liteattn-int8 vs {ref_name}",
                                              lambda: _quiet(M.liteattn_dense(inputs, "int8")).transpose(1, 2),
                                              reference))
            if "liteattn-int8-fp8pv" in self.selected or "liteattn-int8-fp8pv-sparse" in self.selected:
                self._add_check(self._compare(
                    name, f"liteattn-int8-fp8pv vs {ref_name}",
                    lambda: _quiet(M.liteattn_dense(inputs, "int8", "fp8")).transpose(1, 2), reference,
                    tol=FP8_PV_TOLERANCE))
        del reference
        gen = torch.Generator(device="cuda").manual_seed(self.config.seed + 2)
        mask = build_mask("random", inputs.tiles, SPARSE_CHECK_FRACTION, generator=gen, device="cuda")
        check_name = f"liteattn-sparse vs flex (random, s={achieved_fraction(mask):.3f})"
        try:
            flex_fn = M.flex(inputs, mask)
            self._note(name, flex_fn.note)
            flex_out = _quiet(flex_fn)
        except Exception as exc:
            self._add_check(Check(name, check_name, "error", detail=f"flex: {_describe(exc)}"))
            return
        self._add_check(self._compare(name, check_name,
                                      lambda: _quiet(M.liteattn_sparse(inputs, mask)[0]).transpose(1, 2), flex_out))

    def _compare(self, shape: str, check_name: str, actual: Callable[[], torch.Tensor],
                 reference: torch.Tensor, tol: Tolerance = BF16_TOLERANCE) -> Check:
        try:
            max_abs, rel_l2, ref_max = M.compare(actual(), reference)
        except Exception as exc:
            return Check(shape, check_name, "error", detail=_describe(exc))
        status = "passed" if judge_errors(max_abs, rel_l2, ref_max, tol) else "failed"
        return Check(shape, check_name, status, max_abs, rel_l2, ref_max)

    def _note(self, shape: str, note: str) -> None:
        if note and f"{shape}: {note}" not in self.notes:
            self.notes.append(f"{shape}: {note}")
            self._say(f"   note: {note}")

    def _add_check(self, check: Check) -> None:
        self.checks.append(check)
        errs = "" if check.rel_l2 is None else (f" max abs {check.max_abs:.2e} (max |ref| {check.ref_max_abs:.2e}), "
                                                f"rel L2 {check.rel_l2:.2e}")
        self._say(f"   check {check.name}:{errs} -> {check.status.upper()} {check.detail}".rstrip())

    # ------------------------------------------------------------------ reporting one case
    def _report(self, case: _Case) -> None:
        row = case.row
        where = f"{case.method}" + (f" {case.pattern} s={case.fraction:.2f} (got {case.skipped:.3f})"
                                    if case.pattern else "")
        self.rows.append(row)
        if row.status == "ok":
            clock = f", SM {row.sm_clock_mhz:.0f} MHz" if row.sm_clock_mhz is not None else ""
            self._say(f"   {where:<44} {row.median_ms:9.3f} ms  p20 {row.p20_ms:.3f}  p80 {row.p80_ms:.3f}  "
                      f"{row.tflops:6.1f} TFLOP/s  ({row.reps} reps, host {row.host_ms or 0:.3f} ms/call{clock})")
        else:
            error = row.error if len(row.error) <= 300 else row.error[:297] + "..."
            self._say(f"   {where:<44} {row.status.upper()}: {error}")

    # ------------------------------------------------------------------ output
    def _payload(self) -> dict:
        return {
            "status": run_status(self.checks, self.rows),
            "environment": self.env,
            "config": self.config.to_dict(),
            "layout": M.LAYOUT_NOTES[self.config.layout],
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "targets": RATIO_TARGETS,
            "checks": self.checks,
            "rows": self.rows,
            "ratios": compute_ratios(self.rows),
            "notes": self.notes,
        }

    def _text(self, payload: dict) -> str:
        return "\n\n".join([
            f"liteattn bench: {payload['status'].upper()} | {self.env['device']} | {self.env['date']}",
            f"layout: {payload['layout']}",
            "correctness gate:\n" + format_checks(self.checks),
            "timings (TFLOP/s = 4 B H S^2 D / median; eff = x (1 - s got)):\n" + format_rows(self.rows),
            "ratios (s = achieved skipped fraction):\n" + format_ratios(payload["ratios"]),
        ] + (["notes:\n" + "\n".join(self.notes)] if self.notes else []))

    def _write(self, final: bool) -> str:
        out = self.config.out
        payload = self._payload()
        write_json(out / "bench.json", payload)
        text = self._text(payload)
        write_text(out / "bench.txt", text)
        try:
            plot_rows(self.rows, out / "bench.png", title=f"liteattn bench, {self.env['device']}, bf16, "
                                                           f"layout {self.config.layout}")
        except ImportError as exc:
            if final:
                self._say(f"plot not written: {exc} (pip install 'liteattn[viz]')")
        except Exception as exc:  # a plot problem must not lose the numbers already written
            if final:
                self._say(f"plot not written: {_describe(exc)}")
        return text

    def _finish(self) -> int:
        text = self._write(final=True)
        status = run_status(self.checks, self.rows)
        print("\n" + text, flush=True)
        self._say(f"wrote {self.config.out / 'bench.json'}, bench.txt, bench.png in "
                  f"{time.monotonic() - self.start:.0f} s; status {status.upper()}")
        return 2 if status in ("failed", "unchecked") else 0

    def _say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {text}", flush=True)


@dataclass
class _Case:
    """One method (and mask) of a shape, from building its call to its row."""

    shape: Shape
    method: str
    build: Callable[[], tuple[Callable[[], object], Callable[[], None] | None]]  # -> (call, check after timing)
    pattern: str | None = None
    fraction: float = 0.0
    skipped: float = 0.0
    fn: Callable[[], object] | None = None
    after: Callable[[], None] | None = None
    timer: CaseTimer | None = None
    rounds: list[int] = field(default_factory=list)  # runs per round
    windows: list[tuple[float, float]] = field(default_factory=list)  # host times of its timed batches
    warnings: list = field(default_factory=list)
    row: Row | None = None

    def start(self, config) -> None:
        """Build the call, warm it up and size its repetitions (more for a case without a mask: see
        ``BenchConfig.dense_min_reps``)."""
        self.fn, self.after = self.build()
        min_reps = max(config.min_reps, config.dense_min_reps) if self.pattern is None else config.min_reps
        self.timer = CaseTimer(self.fn, budget_ms=config.budget_ms, min_reps=min_reps,
                               max_reps=max(config.max_reps, min_reps))
        self.rounds = split_reps(self.timer.reps, config.rounds)

    def fail(self, error: str, status: str = "failed") -> None:
        self.row = failed_row(self.shape.name, self.method, error, pattern=self.pattern, fraction=self.fraction,
                              skipped=self.skipped, status=status)

    def release(self) -> None:
        """Drop the call, its state, mask and timer (a shape's cases are alive together until reported)."""
        self.build = self.fn = self.after = self.timer = None


def _with_detect_check(call, marked):
    def after():
        n = marked()
        if n:
            raise RuntimeError(f"{n} tiles were marked at threshold {M.DETECT_THRESHOLD}: the time includes skipped "
                               "work, so it is not the detection overhead")
    return call, after


def _with_sparse_check(call, state, mask):
    expected = int(mask.sum())

    def after():
        active = int(state.kv_num_blocks.sum(dtype=torch.int64))
        if active != expected:
            raise RuntimeError(f"the skip state holds {active} active tiles after timing, the mask {expected}")
    return call, after


def _quiet(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run once with warnings silenced (eager-fallback and backend notices are irrelevant for a check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
        torch.cuda.synchronize()
    return out


def _describe(exc: BaseException, caught: list | None = None) -> str:
    """Error type and message, plus the warnings that explain it (SDPA says why a backend was refused)."""
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    notes = list(dict.fromkeys(str(w.message).strip() for w in caught or ()))
    return text + ("" if not notes else " | warnings: " + " | ".join(notes))


def _release() -> None:
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # a sticky CUDA error: every later case fails too, and says so itself
        print(f"CUDA error after a failure: {exc}", file=sys.stderr, flush=True)
    torch.cuda.empty_cache()
