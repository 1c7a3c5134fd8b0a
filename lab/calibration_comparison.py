"""Does calibration earn its place? Sparsity against quality on the testbed for five ways of choosing what to skip.

Run: ``python lab/calibration_comparison.py --out DIR [--device cuda] [--profile NAME=PATH ...] [--marginal
NAME=PATH ...]`` (profiles from ``liteattn calibrate`` at the same size; ``--frames/--pixels/--steps`` set it).

On held-out prompts and seeds (disjoint from the calibration inputs), at the
size given, every method generates the same videos:

(i)   one global threshold and 3 dense first steps (the paper; the GPU demo's rule);
(ii)  calibrated profiles (``liteattn calibrate``, a fidelity budget);
(iii) upstream-style marginal calibration (per layer and step, relative L1 of the step's new marks);
(iv)  per-call skip-softmax without carry-over (NVIDIA's rule: QK always computed);
(v)   dense.

Reported per method: the skipped fraction of tiles over the run, the fraction of
attention FLOPs skipped (a carried skip drops QK and P.V, a per-call skip only
P.V, half of a tile's FLOPs), with ``--time`` the attention time of one generation
(every attention call timed, with CUDA events on a GPU; the per-call rule runs liteattn's
kernel in its skip-softmax mode, dense runs the model's own attention), PSNR/SSIM against
dense (mean, worst), and the evaluator's four scores with 95 % bootstrap
intervals and paired differences to dense. Every evaluation is kept in
DIR/journal.json (resumable). Also measures the premise (tiles negligible at
step t still negligible at t + d, per layer) with ``--premise``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

DIMENSIONS = ("prompt_adherence", "subject_consistency", "motion_smoothness", "background_stability", "overall")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--inputs", type=int, default=12, help="held-out prompts, one seed each (default 12)")
    parser.add_argument("--seed", type=int, default=2, help="draws them (calibration used 0, its held-out 1)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[-2.0, -1.0, -0.5, -0.25])
    parser.add_argument("--per-call", type=float, nargs="*", default=[-1.0, -0.5, -0.25])
    parser.add_argument("--dense-steps", type=int, default=3)
    parser.add_argument("--profile", nargs="*", default=[], help="NAME=PATH of calibrated profiles")
    parser.add_argument("--marginal", nargs="*", default=[], help="NAME=PATH of marginal-rule profiles")
    parser.add_argument("--premise", action="store_true", help="also measure the premise (4 inputs)")
    parser.add_argument("--only-premise", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--pixels", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16)")
    parser.add_argument("--time", action="store_true", help="also time one generation's attention per method")
    args = parser.parse_args()

    from liteattn.calibration import Budget, Profile, TestbedRunner, testbed_inputs
    from liteattn.calibration.premise import measure_persistence
    from liteattn.calibration.session import Calibration, Setting
    from liteattn.testbed import load_testbed
    from liteattn.testbed.evaluator import summarize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    testbed = load_testbed(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    runner = TestbedRunner(testbed, frames=args.frames, size=args.pixels, steps=args.steps, guidance=4.0,
                           batch_size=args.batch)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    meta = {"date": datetime.date.today().isoformat(), "device": where, "torch": torch.__version__,
            "command": " ".join(["python", "lab/calibration_comparison.py"] + sys.argv[1:]),
            "size": f"{args.frames} frames of {args.pixels} px ({testbed.tokens_per_video(args.frames, args.pixels)} "
                    f"tokens), {args.steps} steps, guidance 4, 128x128 tiles"}

    if args.premise or args.only_premise:
        premise = measure_persistence(runner, testbed_inputs(4, args.seed), thresholds=(-3.0, -1.0, -0.5),
                                      max_gap=12)
        (out / "premise.json").write_text(json.dumps(dict(premise, **meta), indent=1) + "\n")
        print("premise:", {k: v["all"] for k, v in premise["thresholds"].items()}, flush=True)
        if args.only_premise:
            return 0

    inputs = testbed_inputs(args.inputs, args.seed)
    cal = Calibration(runner, inputs, Budget.parse("psnr>=30"), work_dir=out, block_size=None)
    layers, d = cal.layers, args.dense_steps
    methods = [("dense", None, "dense")]
    methods += [(f"global {t:g}", Setting.uniform(layers, d, (d,), t), "global") for t in args.thresholds]
    methods += [(f"per-call {t:g}", Setting.uniform(layers, d, (d,), t, "per_call"), "per_call")
                for t in args.per_call]
    for kind, entries in (("profile", args.profile), ("marginal", args.marginal)):
        for entry in entries:
            name, path = entry.split("=", 1)
            p = Profile.load(path)
            tokens = testbed.tokens_per_video(args.frames, args.pixels)
            if (p.tokens, p.steps) != (tokens, args.steps):
                raise SystemExit(f"{name}: calibrated at {p.tokens} tokens and {p.steps} steps, not {tokens} and "
                                 f"{args.steps}")
            seen = {json.dumps(x) for x in p.calibration.get("inputs", [])}
            if seen & {json.dumps(x) for x in runner.describe(inputs)}:
                raise SystemExit(f"{name}: its calibration inputs overlap the comparison's; pick another --seed")
            setting = Setting(p.dense_steps, p.range_starts, tuple((k, p.thresholds[k]) for k in layers), p.skip_rule)
            methods.append((name, setting, kind))

    dense_scores = runner.score(cal.dense(), inputs)
    rows = []
    for name, setting, kind in methods:
        if setting is None:
            result = {"sparsity": 0.0, "psnr_mean": None, "psnr_worst": None, "ssim_mean": None, "scores": dense_scores}
        else:
            print(f"{name}: generating {len(inputs)} videos", flush=True)
            result = cal.evaluate(setting)
        scores = result["scores"]
        timed = attention_time(runner, cal, setting, inputs[0], device) if args.time else None
        row = {"method": name, "kind": kind, "sparsity": result["sparsity"], "attention": timed,
               "flops_skipped": result["sparsity"] * (0.5 if kind == "per_call" else 1.0),
               "psnr_mean": result.get("psnr_mean"), "psnr_worst": result.get("psnr_worst"),
               "ssim_mean": result.get("ssim_mean"), "scores": {}, "diff_vs_dense": {},
               "setting": None if setting is None else json.loads(setting.key())}
        for dim in DIMENSIONS:
            row["scores"][dim] = summarize([s[dim] for s in scores])
            if setting is not None:
                row["diff_vs_dense"][dim] = summarize([s[dim] - r[dim] for s, r in zip(scores, dense_scores)])
        rows.append(row)
        line = (f"{name:>22}: skipped {100 * row['sparsity']:5.1f}%, FLOPs {100 * row['flops_skipped']:5.1f}%, "
                f"overall {row['scores']['overall']['mean']:.3f} [{row['scores']['overall']['low']:.3f}, "
                f"{row['scores']['overall']['high']:.3f}]")
        if row["psnr_mean"] is not None:
            line += f", PSNR {row['psnr_mean']:.1f} dB (worst {row['psnr_worst']:.1f})"
        if timed is not None:
            line += f", attention {timed['attention_ms']:.0f} ms of {timed['wall_ms']:.0f} ms"
        print(line, flush=True)
        report = dict(meta, inputs=runner.describe(inputs), methods=rows)
        (out / "comparison.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def attention_time(runner, cal, setting, one_input, device) -> dict:
    """Attention time (every call timed by CUDA events) and wall time of one generation of ``one_input`` with
    ``setting`` (None: dense, the model's own attention); the second of two (the first compiles and autotunes)."""
    import math
    import time

    from liteattn.integrations import LiteAttentionConfig, apply, remove

    if setting is None:
        config = LiteAttentionConfig(threshold=-math.inf, timing=True)
    else:
        config = LiteAttentionConfig(profile=cal.profile(setting), timing=True, skip_rule=setting.skip_rule)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # the second run is the one kept
        handle = apply(runner.target, config=config)
        try:
            sync()
            start = time.perf_counter()
            runner.generate([one_input])
            sync()
            wall_ms = (time.perf_counter() - start) * 1e3
            summary = handle.summary()
        finally:
            remove(runner.target)
    return {"attention_ms": summary.attention_ms, "wall_ms": wall_ms, "sparsity": summary.sparsity,
            "input": runner.describe([one_input])[0]}


if __name__ == "__main__":
    sys.exit(main())
