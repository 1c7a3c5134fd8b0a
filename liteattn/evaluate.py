"""Judge liteattn's quality and speed on the testbed over many prompts and seeds, dense beside it.

For every prompt x seed pair the testbed generates one video with dense
attention and one per liteattn setting (a threshold and a number of dense
first steps, several making a sweep; or a calibration profile, ``--profile``,
as ``liteattn calibrate`` writes it and ``liteattn demo`` runs it). Each video
is scored on its own by the testbed's evaluator (prompt adherence, subject
consistency, motion smoothness, background stability), and the liteattn videos
also against the dense ones (PSNR, SSIM). Reported per setting: the mean of
each score with a 95% bootstrap confidence interval, the paired difference to
dense with its interval, whether every mean falls inside dense's interval ("no
degradation"; not judged from a single pair, whose interval is a point), the
skipped fraction, and, on a GPU, the wall time of one generation (batch 1, CUDA
graphs, as ``liteattn demo`` runs) and its attention kernel time. Writes
eval.json, eval.md and pareto.png.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ._testbed_cli import (SHIPPED_PROFILE, add_precision_arguments, add_run_arguments, check_positive,
                           check_pv_dtype, check_size_options, prepare, profile_covers, profile_option)
from .demo import DEFAULT_DENSE_STEPS, DEFAULT_THRESHOLD

__all__ = ["add_arguments", "check_args", "run"]

DIMENSIONS = ("prompt_adherence", "subject_consistency", "motion_smoothness", "background_stability", "overall")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="liteattn-eval", help="output folder (default: liteattn-eval)")
    add_run_arguments(parser)
    parser.add_argument("--prompts", type=int, default=16, help="random prompts (default: 16)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: 2; 32 pairs in all)")
    parser.add_argument("--threshold", type=float, nargs="+", default=None,
                        help=f"one or more thresholds to sweep (default: {DEFAULT_THRESHOLD:g}; none with --profile)")
    parser.add_argument("--dense-steps", type=int, nargs="+", default=None,
                        help=f"one or more numbers of dense first steps to sweep with the thresholds (default: "
                             f"{DEFAULT_DENSE_STEPS})")
    parser.add_argument("--profile", nargs="+", default=[],
                        help=f"one or more calibration profiles to judge, each a setting of its own (liteattn "
                             f"calibrate's files; '{SHIPPED_PROFILE}': the testbed's, which comes with liteattn)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    add_precision_arguments(parser, "each liteattn setting")
    parser.add_argument("--batch", type=int, default=32, help="videos generated at once (default: 32)")
    parser.add_argument("--workers", type=int, default=0, help="processes scoring videos (default: CPU cores, max 16)")
    parser.add_argument("--no-timing", action="store_true", help="GPU: skip the batch-1 timings")
    parser.add_argument("--no-cuda-graph", action="store_true", help="GPU: time eager forwards instead of CUDA graphs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_args(args) -> None:
    """Every option checked before any work starts."""
    check_size_options(args)
    for name in ("prompts", "seeds", "batch"):
        check_positive(f"--{name}", getattr(args, name))
    for t in args.threshold or ():
        if not t < 0:
            raise ValueError(f"--threshold: expected negative numbers (log2 units, e.g. -2), got {t:g}")
    for d in args.dense_steps or ():
        check_positive("--dense-steps", d, 0)
    if args.profile and args.dense_steps and not args.threshold:
        raise ValueError("--dense-steps: sweeps with --threshold; a profile has its own dense steps (give "
                         "--threshold too, or leave --dense-steps out)")
    for text in args.profile:
        profile_option(text)
    if not args.guidance >= 0:
        raise ValueError(f"--guidance: expected a number >= 0, got {args.guidance:g}")
    check_positive("--workers", args.workers, 0)
    check_pv_dtype(args)


def _score(item):
    import torch

    from .testbed.evaluator import score_video

    torch.set_num_threads(1)
    video, prompt = item
    return score_video(video, prompt).as_dict()


def _score_all(videos, prompts, workers: int) -> list[dict]:
    items = list(zip(videos, prompts))
    if workers <= 1:
        return [_score(item) for item in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_score, items, chunksize=2))


def _stats(per_video: list[dict], dense: list[dict] | None) -> dict:
    from .testbed.evaluator import summarize

    out = {}
    for dim in DIMENSIONS:
        values = [s[dim] for s in per_video]
        out[dim] = summarize(values)
        if dense is not None:
            out[dim]["diff_vs_dense"] = summarize([v - d[dim] for v, d in zip(values, dense)])
    return out


def _settings(args, tokens: int) -> list[dict]:
    """The liteattn settings judged: the thresholds x dense steps sweep, then each profile (refused here, before any
    generation, where its token rule does not cover ``tokens``)."""
    thresholds = args.threshold or ([] if args.profile else [DEFAULT_THRESHOLD])
    settings = [{"threshold": float(t), "dense_steps": int(d), "profile": None, "loaded": None}
                for t, d in itertools.product(thresholds, args.dense_steps or [DEFAULT_DENSE_STEPS])]
    for text in args.profile:
        profile = profile_option(text)
        profile_covers(profile, tokens)
        settings.append({"threshold": None, "dense_steps": profile.dense_steps, "profile": text, "loaded": profile})
    return settings


def run(args) -> int:
    check_args(args)
    setup = prepare(args, "eval")
    if isinstance(setup, str):
        print(setup, file=sys.stderr)
        return 2
    import os

    import torch

    from .testbed import describe_prompt
    from .testbed.data import random_prompts
    from .testbed.metrics import psnr, ssim
    from .testbed.runs import generate

    device, frames, pixels, steps = setup.device, setup.frames, setup.pixels, setup.steps
    out, dtype, testbed = setup.out, setup.dtype, setup.testbed
    prompts = random_prompts(args.prompts, torch.Generator().manual_seed(20261202))
    pairs = [(p, s) for p in range(args.prompts) for s in range(args.seeds)]
    all_prompts = torch.stack([prompts[p] for p, _ in pairs])
    all_seeds = [1000 + s for _, s in pairs]
    workers = args.workers or min(16, os.cpu_count() or 1)
    settings = _settings(args, testbed.tokens_per_video(frames, pixels))
    graphs = device.type == "cuda" and not args.no_cuda_graph
    print(f"liteattn eval: {len(pairs)} prompt x seed pairs, {frames} frames of {pixels}px "
          f"({testbed.tokens_per_video(frames, pixels)} tokens), {steps} steps, {len(settings)} liteattn setting(s)"
          f"{', 8-bit QK' if args.qk_dtype else ''}{', fp8 P.V' if args.pv_dtype else ''}, {device} "
          f"{str(dtype).replace('torch.', '')}")

    def videos_of(setting):
        chunks, sparsity, calls = [], 0.0, 0
        for start in range(0, len(pairs), args.batch):
            gen = generate(testbed, all_prompts[start:start + args.batch], all_seeds[start:start + args.batch],
                           frames=frames, size=pixels, steps=steps, guidance=args.guidance, cuda_graph=False,
                           warmup=0, kernel_times=False, show_progress=not args.no_progress,
                           desc="dense" if setting is None else _label(setting), **_options(setting, steps, args))
            chunks.append(gen.video)
            n = len(gen.summary.calls)
            sparsity, calls = sparsity + gen.summary.sparsity * n, calls + n
        return torch.cat(chunks), sparsity / max(calls, 1)

    def timing(setting):
        if device.type != "cuda" or args.no_timing:
            return {}
        gen = generate(testbed, all_prompts[:1], all_seeds[:1], frames=frames, size=pixels, steps=steps,
                       guidance=args.guidance, cuda_graph=graphs, **_options(setting, steps, args))
        return {"wall_s": gen.wall_s, "attention_s": gen.attention_s, "kernels_s": gen.kernels_s}

    dense_videos, _ = videos_of(None)
    dense_scores = _score_all(dense_videos, all_prompts, workers)
    report = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "frames": frames, "pixels": pixels, "tokens_per_video": testbed.tokens_per_video(frames, pixels),
              "steps": steps, "guidance": args.guidance, "cuda_graphs": graphs, "qk_dtype": args.qk_dtype,
              "pv_dtype": args.pv_dtype,
              "pairs": [{"prompt": describe_prompt(prompts[p]), "seed": 1000 + s} for p, s in pairs],
              "dense": {"scores": _stats(dense_scores, None), "timing": timing(None)}, "settings": []}
    for setting in settings:
        videos, sparsity = videos_of(setting)
        scores = _score_all(videos, all_prompts, workers)
        fidelity = [(psnr(v[None], d[None]), ssim(v[None], d[None])) for v, d in zip(videos, dense_videos)]
        stats = _stats(scores, dense_scores)
        # One pair's interval is a point: "inside" would only say whether two numbers are equal.
        inside = None if len(pairs) < 2 else all(
            report["dense"]["scores"][d]["low"] <= stats[d]["mean"] <= report["dense"]["scores"][d]["high"]
            for d in DIMENSIONS)
        finite = [p for p, _ in fidelity if p != float("inf")]
        entry = {"threshold": setting["threshold"], "dense_steps": setting["dense_steps"],
                 "profile": setting["profile"], "sparsity": sparsity, "scores": stats,
                 "inside_dense_interval": inside,
                 "psnr_db_mean": sum(finite) / len(finite) if finite else float("inf"),
                 "ssim_mean": sum(s for _, s in fidelity) / len(fidelity), "timing": timing(setting)}
        dense_wall = report["dense"]["timing"].get("wall_s")
        if dense_wall and entry["timing"].get("wall_s"):
            entry["speedup_wall"] = dense_wall / entry["timing"]["wall_s"]
        report["settings"].append(entry)
        print(_line(entry), flush=True)
        (out / "eval.json").write_text(json.dumps(report, indent=1, default=str) + "\n")  # kept if a later one fails
    best = [e for e in report["settings"] if e["inside_dense_interval"]]
    key = (lambda e: e.get("speedup_wall", e["sparsity"]))
    chosen = max(best, key=key) if best else None
    report["chosen"] = {k: chosen[k] for k in ("threshold", "dense_steps", "profile")} if chosen else None
    (out / "eval.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "eval.md").write_text(_markdown(report))
    _plot(report, out / "pareto.png")
    print(_markdown(report))
    print(f"wrote    : {out / 'eval.json'}, {out / 'eval.md'}, {out / 'pareto.png'}")
    return 0


def _options(setting: dict | None, steps: int, args) -> dict:
    """:func:`liteattn.testbed.runs.generate`'s options for a setting (None: dense)."""
    if setting is None:
        return dict(threshold=None, dense_steps=steps)
    return dict(threshold=setting["threshold"], dense_steps=setting["dense_steps"], profile=setting["loaded"],
                qk_dtype=args.qk_dtype, pv_dtype=args.pv_dtype)


def _label(e: dict) -> str:
    if e["profile"] is not None:
        return f"profile {e['profile']} ({e['dense_steps']} dense steps)"
    return f"threshold {e['threshold']:g}, {e['dense_steps']} dense steps"


# Whether every score's mean is inside dense's interval: (in a line, in the table); None: one pair, no interval.
_VERDICT = {True: ("inside dense's intervals", "yes"), False: ("OUTSIDE dense's intervals", "no"),
            None: ("one pair: no interval to judge", "-")}


def _line(e: dict) -> str:
    speed = f", wall {e['speedup_wall']:.2f}x" if "speedup_wall" in e else ""
    verdict = _VERDICT[e["inside_dense_interval"]][0]
    return (f"{_label(e)}: skipped {100 * e['sparsity']:.1f}%{speed}, overall {e['scores']['overall']['mean']:.3f}, "
            f"PSNR {e['psnr_db_mean']:.1f} dB, {verdict}")


def _cell(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def _markdown(r: dict) -> str:
    n = len(r["pairs"])
    lines = [f"{n} prompt x seed pairs, {r['frames']} frames of {r['pixels']}px ({r['tokens_per_video']} tokens), "
             f"{r['steps']} steps, {r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''}; "
             "mean [95% bootstrap interval]", "",
             "| setting | skipped | wall speed-up | PSNR vs dense | " + " | ".join(d.replace("_", " ") for d in DIMENSIONS)
             + " | inside dense's intervals |",
             "|---" * (5 + len(DIMENSIONS)) + "|",
             "| dense | 0 % | 1.00x | - | " + " | ".join(_cell(r["dense"]["scores"][d]) for d in DIMENSIONS) + " | - |"]
    for e in r["settings"]:
        speed = f"{e['speedup_wall']:.2f}x" if "speedup_wall" in e else "-"
        lines.append(f"| {_label(e)} | {100 * e['sparsity']:.1f} % | {speed} | {e['psnr_db_mean']:.1f} dB | "
                     + " | ".join(_cell(e["scores"][d]) for d in DIMENSIONS)
                     + f" | {_VERDICT[e['inside_dense_interval']][1]} |")
    if r.get("chosen"):
        lines += ["", f"Fastest setting inside dense's intervals: {_label(r['chosen'])}."]
    return "\n".join(lines) + "\n"


def _short_name(profile: str) -> str:
    """A profile's label in the plot: its file's stem, or its folder's name for ``liteattn calibrate``'s
    ``DIR/profile.json``."""
    p = Path(profile)
    return p.parent.name if p.stem == "profile" and p.parent.name else p.stem


def _plot(r: dict, path: Path) -> None:
    from .testbed.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    dense = r["dense"]["scores"]["overall"]
    for ax, xkey, xlabel in ((axes[0], "speedup_wall", "wall-clock speed-up over dense (batch 1)"),
                             (axes[1], "sparsity", "tiles skipped over the run")):
        ax.axhspan(dense["low"], dense["high"], color="tab:blue", alpha=0.15, label="dense: 95% interval")
        ax.axhline(dense["mean"], color="tab:blue", lw=1)
        for e in r["settings"]:
            x = e.get(xkey)
            if x is None:
                continue
            s = e["scores"]["overall"]
            color = {True: "tab:green", False: "tab:red", None: "tab:gray"}[e["inside_dense_interval"]]
            ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]], fmt="o",
                        color=color, capsize=3)
            name = _short_name(e["profile"]) if e["profile"] is not None else f"{e['threshold']:g}/{e['dense_steps']}"
            ax.annotate(name, (x, s["mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("overall score (mean of the 4 dimensions)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("liteattn settings (threshold / dense first steps, or a profile): green = every score inside "
                 "dense's interval, red = outside, gray = one pair, not judged", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
