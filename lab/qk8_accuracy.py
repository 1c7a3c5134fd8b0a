"""How much does 8-bit QK change the testbed's attention, and which rounding should the kernel use?

Run: ``OMP_NUM_THREADS=1 python lab/qk8_accuracy.py --out lab/results/qk8/accuracy-cpu.json`` (CPU, about
10 minutes on one core at the defaults). Generates videos with the trained testbed (dense attention: nothing is
skipped, so every call sees the dense trajectory's q, k, v) and, at the self-attention calls of the measured
steps (cond branch), compares attention with Q.K^T from q and k rounded to 8 bits against attention from the
unrounded q and k (both from the same inputs rounded to bfloat16, what the GPU kernel reads, computed in float32):

- the output: cosine similarity and relative L1 (``sum |o - o_ref| / sum |o_ref|``), SageAttention's metrics;
  its targets: cos >= 0.999, rel. L1 <= 0.02;
- the skip decisions of liteattn's rule from a full list at each threshold: the fraction of (head, query tile,
  key tile) decisions equal to the unrounded ones (target >= 99 %), and the flips per tile the unrounded rule marks.
  As a yardstick, the same metrics for the unrounded rule on the model's float32 q, k, v against bfloat16 ones;
  and per key tile, how much finer smoothing makes the int8 step (absmax(k) / absmax(k - mean)).

Variants: int8 or fp8 (e4m3); one scale per tile (``block_m`` query rows, ``block_n`` keys: what the reference
specifies) or per token; K smoothed by its mean over the keys or not. The reference's own ``qk_dtype="int8"``
path is the spec and is measured as such; the other variants round q and k here and attend densely, and the
per-tile smoothed int8 variant is computed both ways as a check of this file's code (reported under "check").
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from collections import defaultdict

import torch

from liteattn import SkipState
from liteattn.integrations import apply, remove
from liteattn.kernels import default_block_sizes
from liteattn.reference import lite_attention_reference
from liteattn.testbed import encode_prompt, load_testbed
from liteattn.testbed.sampler import sample_video

PROMPTS = ("yellow striped circle, red square, blue triangle", "green checkered cross, white circle",
           "magenta gradient square, cyan triangle, orange striped circle, red cross")
QMAX = {"int8": 127.0, "fp8": 448.0}
VARIANTS = {  # name: (format, granularity, smoothed)
    "int8-tile-smooth": ("int8", "tile", True),
    "int8-tile-raw": ("int8", "tile", False),
    "int8-token-smooth": ("int8", "token", True),
    "int8-token-raw": ("int8", "token", False),
    "fp8-tile-smooth": ("fp8", "tile", True),
    "fp8-token-smooth": ("fp8", "token", True),
}
SPEC = "int8-tile-smooth"
YARDSTICK = "unrounded, float32 inputs"  # against the same rule on bfloat16 inputs (the baseline)
LOG2E = 1.0 / math.log(2.0)


def round_rows(x: torch.Tensor, block: int, fmt: str) -> torch.Tensor:
    """(B, H, S, D) rounded to 8 bits with one symmetric scale per ``block`` consecutive rows, dequantized."""
    b, h, s, d = x.shape
    assert s % block == 0, "the testbed's token counts are multiples of the tiles"
    t = x.reshape(b, h, s // block, block, d)
    absmax = t.abs().amax(dim=(-2, -1), keepdim=True)
    step = torch.where(absmax > 0, absmax / QMAX[fmt], torch.ones_like(absmax))
    y = (t / step).clamp(-QMAX[fmt], QMAX[fmt])
    y = y.round() if fmt == "int8" else y.to(torch.float8_e4m3fn).to(x.dtype)
    return (y * step).reshape(b, h, s, d)


def marks_from_scores(s: torch.Tensor, bm: int, bn: int, thresholds) -> dict:
    """liteattn's rule from a full list (ascending, no must-do tokens): per (B, H, QT, KT), is the tile marked?

    A tile is marked when, for every row of its query tile, ``(max of the tile's scores - running max of the
    tiles before it) * log2(e) < threshold``; never the first tile."""
    b, h, sq, sk = s.shape
    tile_max = s.reshape(b, h, sq, sk // bn, bn).amax(-1)  # [B, H, S_q, KT]
    before = torch.cummax(tile_max, dim=-1).values.roll(1, -1)
    before[..., 0] = -math.inf
    margin = ((tile_max - before) * LOG2E).reshape(b, h, sq // bm, bm, sk // bn)
    first = torch.zeros(sk // bn, dtype=torch.bool)
    first[0] = True
    return {th: (margin < th).all(-2) & ~first for th in thresholds}


def attend(q, k, v, scale, bm, bn, thresholds):
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v, marks_from_scores(s, bm, bn, thresholds)


def compare(out, ref_out, marks, ref_marks) -> dict:
    out, ref_out = out.double(), ref_out.double()
    diff = (out - ref_out).abs().sum()
    row = {"cos": float(torch.nn.functional.cosine_similarity(out.flatten(), ref_out.flatten(), dim=0)),
           "rel_l1": float(diff / ref_out.abs().sum())}
    for th, m in marks.items():
        row[f"agree{th:g}"] = float((m == ref_marks[th]).float().mean())
        row[f"flips{th:g}"] = int((m != ref_marks[th]).sum())
        row[f"marked{th:g}"] = int(ref_marks[th].sum())
        row[f"tiles{th:g}"] = m.numel()
    return row


class Study:
    def __init__(self, thresholds, steps_measured, input_dtype):
        self.thresholds = thresholds
        self.steps_measured = steps_measured
        self.input_dtype = input_dtype
        self.rows = []  # one per (call, variant)
        self.checks = []
        self.offsets = []
        self.seconds = 0.0

    def observe(self, runtime, info, attention, q, k, v, scale, must_do, threshold):
        if info.context != "cond" or info.step not in self.steps_measured:
            return -math.inf
        if must_do:
            raise RuntimeError("this study assumes no must-do tokens (testbed self-attention has none)")
        start = time.perf_counter()
        with torch.no_grad():
            self.measure(runtime.profile_key, info.step, q, k, v, scale)
        self.seconds += time.perf_counter() - start
        return -math.inf  # nothing marked: the trajectory stays dense

    def measure(self, layer, step, q, k, v, scale):
        q32, k32, v32 = (x.transpose(1, 2).float() for x in (q, k, v))  # BHSD, the model's float32 values
        q, k, v = (x.to(self.input_dtype).float() for x in (q32, k32, v32))  # as the kernel reads them
        assert q.shape[1] == k.shape[1], "the testbed has no GQA"
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        bm, bn = default_block_sizes(q.shape[-1])
        state = SkipState.full(q.shape[0], q.shape[1], q.shape[2], k.shape[2], bm, bn)
        th0 = self.thresholds[0]
        results = {}
        for name, qk in (("none", None), (SPEC, "int8")):
            out, _, (counts, indices), scores = lite_attention_reference(q, k, v, state, th0, scale,
                                                                         return_scores=True, qk_dtype=qk)
            # a full list is visited in ascending order: position t is key tile t
            marks = {th: (scores < th) & (torch.arange(scores.shape[-1]) > 0) for th in self.thresholds}
            kept = SkipState(counts, indices, state.seq_len_q, state.seq_len_k, bm, bn).to_dense()
            assert torch.equal(kept, ~marks[th0]), "decisions read from the scores must be the reference's"
            results[name] = (out, marks)
        ref_out, ref_marks = results["none"]
        # What smoothing buys: per key tile, absmax(k) / absmax(k - mean), i.e. how much finer the int8 step gets.
        tiles = lambda x: x.reshape(*x.shape[:2], -1, bn * x.shape[-1]).abs().amax(-1)  # noqa: E731
        gain = tiles(k) / tiles(k - k.mean(dim=2, keepdim=True)).clamp(min=1e-30)
        self.offsets.append(dict(layer=layer, step=step, step_gain_mean=float(gain.mean()),
                                 step_gain_max=float(gain.max())))
        # A yardstick for the flips: the unrounded rule on the model's float32 inputs against bfloat16 inputs.
        out, marks = attend(q32, k32, v32, scale, bm, bn, self.thresholds)
        self.rows.append(dict(compare(out, ref_out, marks, ref_marks), variant=YARDSTICK, layer=layer, step=step))
        for name, (fmt, granularity, smooth) in VARIANTS.items():
            ks = k - k.mean(dim=2, keepdim=True) if smooth else k
            rows_q, rows_k = (bm, bn) if granularity == "tile" else (1, 1)
            out, marks = attend(round_rows(q, rows_q, fmt), round_rows(ks, rows_k, fmt), v, scale, bm, bn,
                                self.thresholds)
            if name == SPEC:  # this file's rounding against the reference's: same output, same decisions
                spec_out, spec_marks = results[SPEC]
                self.checks.append(dict(compare(out, spec_out, marks, spec_marks), layer=layer, step=step))
                out, marks = spec_out, spec_marks
            self.rows.append(dict(compare(out, ref_out, marks, ref_marks), variant=name, layer=layer, step=step))
        _, plain_marks = attend(q, k, v, scale, bm, bn, self.thresholds)  # this file's rule on unrounded scores
        self.checks.append(dict(compare(ref_out, ref_out, plain_marks, ref_marks), layer=layer, step=step,
                                what="rule"))


def summarize(rows, thresholds, key) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    out = {}
    for g, rs in sorted(groups.items()):
        entry = {"calls": len(rs), "cos_mean": sum(r["cos"] for r in rs) / len(rs),
                 "cos_min": min(r["cos"] for r in rs),
                 "rel_l1_mean": sum(r["rel_l1"] for r in rs) / len(rs), "rel_l1_max": max(r["rel_l1"] for r in rs)}
        for th in thresholds:
            tiles = sum(r[f"tiles{th:g}"] for r in rs)
            flips = sum(r[f"flips{th:g}"] for r in rs)
            marked = sum(r[f"marked{th:g}"] for r in rs)
            entry[f"agree{th:g}"] = 1 - flips / tiles
            entry[f"agree{th:g}_min_call"] = min(r[f"agree{th:g}"] for r in rs)
            entry[f"marked{th:g}"] = marked / tiles
            entry[f"flips_per_marked{th:g}"] = flips / marked if marked else None
        out[g] = entry
    return out


def observe_generations(testbed, observe, args) -> None:
    """Generate ``args.prompts`` of :data:`PROMPTS` (seed = index) with the testbed, every self-attention call
    passing through liteattn's PyTorch path, where ``observe`` (a layer runtime's ``steer``) sees its q, k, v."""
    start = time.perf_counter()
    for i, text in enumerate(PROMPTS[:args.prompts]):
        # a finite threshold routes every self-attention call through liteattn, where the observer runs
        handle = apply(testbed.transformer, threshold=-1.0, backend="torch")
        try:
            for runtime in handle.layer_runtimes().values():
                runtime.steer = observe
            sample_video(testbed, encode_prompt(text)[None], frames=args.frames, size=args.size, steps=args.steps,
                         guidance=4.0, seed=i, show_progress=False)
        finally:
            remove(testbed.transformer)
        print(f"prompt {i + 1}/{args.prompts} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The generations an accuracy study observes (:func:`observe_generations`) and the input dtype it measures."""
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--measure-every", type=int, default=2, help="measure every n-th step (0, n, 2n, ...)")
    p.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} prompts (seed = index)")
    p.add_argument("--input-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generation_arguments(p)
    p.add_argument("--bucket", type=int, default=5, help="steps per bucket of the per-layer table")
    p.add_argument("--thresholds", type=float, nargs="+", default=[-1.0, -3.0])
    p.add_argument("--out", default="lab/results/qk8/accuracy-cpu.json")
    args = p.parse_args()

    torch.manual_seed(0)
    testbed = load_testbed("cpu", torch.float32)
    steps_measured = set(range(0, args.steps, args.measure_every))
    study = Study(args.thresholds, steps_measured, getattr(torch, args.input_dtype))
    start = time.perf_counter()
    observe_generations(testbed, study.observe, args)

    def bucket(step):
        first = step - step % args.bucket
        return f"steps {first:02d}-{first + args.bucket - 1:02d}"
    ths = args.thresholds
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["OMP_NUM_THREADS=1 python lab/qk8_accuracy.py", *sys.argv[1:]]),
        "device": f"CPU ({cpu_name()}), torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "config": {"frames": args.frames, "size": args.size, "steps": args.steps, "guidance": 4.0,
                   "prompts": list(PROMPTS[:args.prompts]), "seeds": list(range(args.prompts)),
                   "steps_measured": sorted(steps_measured), "context": "cond", "input_dtype": args.input_dtype,
                   "tokens": testbed.tokens_per_video(args.frames, args.size),
                   "block_size": list(default_block_sizes(testbed.transformer.config.attention_head_dim)),
                   "thresholds": ths, "variants": {k: dict(zip(("format", "scale_per", "smoothed_k"), v))
                                                   for k, v in VARIANTS.items()}},
        "targets": {"cos_min": 0.999, "rel_l1_max": 0.02, "skip_agreement_min": 0.99},
        "seconds": {"total": time.perf_counter() - start, "measuring": study.seconds},
        "overall": summarize(study.rows, ths, lambda r: r["variant"]),
        "by_layer": {v: summarize([r for r in study.rows if r["variant"] == v], ths, lambda r: r["layer"])
                     for v in (*VARIANTS, YARDSTICK)},
        "by_layer_and_steps": {v: {f"{layer} | {b}": e for (layer, b), e in summarize(
            [r for r in study.rows if r["variant"] == v], ths, lambda r: (r["layer"], bucket(r["step"]))).items()}
            for v in (*VARIANTS, YARDSTICK)},
        "smoothing_step_gain_by_layer": {
            layer: {"mean": sum(o["step_gain_mean"] for o in group) / len(group),
                    "max": max(o["step_gain_max"] for o in group)}
            for layer in sorted({o["layer"] for o in study.offsets})
            for group in [[o for o in study.offsets if o["layer"] == layer]]},
        "check": {
            "this file's rounding vs the reference's qk_dtype='int8'": summarize(
                [c for c in study.checks if "what" not in c], ths, lambda r: "all")["all"],
            "this file's rule vs the reference's, unrounded": summarize(
                [c for c in study.checks if "what" in c], ths, lambda r: "all")["all"],
        },
        "calls": study.rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{'variant':26s} {'cos min':>9s} {'cos mean':>9s} {'relL1 mean':>10s} {'relL1 max':>9s} "
          + " ".join(f"{'agree' + format(t, 'g'):>9s}" for t in ths))
    for name, e in result["overall"].items():
        print(f"{name:26s} {e['cos_min']:9.5f} {e['cos_mean']:9.5f} {e['rel_l1_mean']:10.4f} {e['rel_l1_max']:9.4f} "
              + " ".join(f"{e[f'agree{t:g}']:9.4%}" for t in ths))
    print(json.dumps(result["check"], indent=1))


if __name__ == "__main__":
    main()
