"""Generate one video twice, with dense attention and with liteattn, and compare speed and quality.

The model is liteattn's shipped testbed: a small Wan transformer (diffusers'
WanTransformer3DModel) trained on videos of moving shapes, so this runs
offline on any machine. The same prompt, seed and noise are used for both
runs; liteattn is switched on with its one-line diffusers integration,
``liteattn.integrations.apply(transformer, ...)``.

On a GPU the demo runs at the testbed's full size (32 frames of 64x64
pixels: 32,768 tokens, where attention is most of a step's GPU time, as in
real video models), with every transformer forward replayed from a CUDA graph
in both runs. On a CPU it runs a small size (8 frames of 32x32, 2,048
tokens) through liteattn's PyTorch reference: the same skipping, no speed-up.

Thresholds: where the run has the token count and steps of the shipped
calibration profile (``liteattn calibrate``; the CPU size), the demo runs that
profile: a threshold per layer and step range, chosen to a quality budget.
Elsewhere (the GPU size) it runs one threshold and a number of dense first
steps chosen on an H200 sweep (the profile was not calibrated there).
``--profile FILE`` runs a profile where its token rule covers the run's size
(checked before any generation); ``--threshold`` or ``--profile none`` runs
one threshold.

Reported (printed, and in the output folder): wall time and attention time of
each run, the fraction of attention tiles skipped at each step and in each
layer, each video's quality scores from the testbed's evaluator (judged on
its own, from the generator's rules), the liteattn video's PSNR/SSIM against
the dense one, pictures, and report.json with every number. ``liteattn eval``
scores many prompts and seeds with confidence intervals.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ._testbed_cli import (SHIPPED_PROFILE, add_precision_arguments, add_run_arguments, check_positive,
                           check_pv_dtype, check_size_options, prepare, profile_covers, profile_option)

__all__ = ["DEFAULT_DENSE_STEPS", "DEFAULT_PROMPT", "DEFAULT_THRESHOLD", "add_arguments", "check_args", "choose_setting",
           "run"]

# Chosen on an H200 from a sweep of thresholds and dense first steps over 32 prompts and seeds at the large size
# (docs/testbed.md, "Choosing the defaults"): the most skipping whose evaluator scores stay inside dense's
# confidence intervals. The first steps stay dense, as serving stacks do: the noisiest steps lay out the video,
# and their attention is the least like the later steps'.
DEFAULT_THRESHOLD = -1.0
DEFAULT_DENSE_STEPS = 3
DEFAULT_PROMPT = "yellow striped circle, red square, blue triangle"
MASK_CONTEXT = "cond"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="liteattn-demo", help="output folder (default: liteattn-demo)")
    add_run_arguments(parser)
    parser.add_argument("--profile", default="auto",
                        help=f"a calibration profile (liteattn calibrate; '{SHIPPED_PROFILE}': the testbed's, "
                             "which comes with liteattn), 'none' for one threshold, or 'auto' (default): the shipped "
                             "profile where the run has its token count and steps (the CPU size), else one threshold")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"run one negative log2 skip threshold instead of a profile (default without a profile: "
                             f"{DEFAULT_THRESHOLD:g}, chosen for the testbed on an H200)")
    parser.add_argument("--dense-steps", type=int, default=None,
                        help=f"with one threshold, the first steps run dense before liteattn starts skipping (default: "
                             f"{DEFAULT_DENSE_STEPS})")
    add_precision_arguments(parser, "the liteattn run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"1-4 shapes, 'COLOUR [TEXTURE] KIND, ...' (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="GPU: run forwards eagerly instead of replaying CUDA graphs (both runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_args(args) -> None:
    """Every option checked before any work starts (a ``ValueError`` naming the option)."""
    from .testbed.data import encode_prompt

    check_size_options(args)
    if args.threshold is not None and not args.threshold < 0:
        raise ValueError(f"--threshold: expected a negative number (log2 units, e.g. -2), got {args.threshold:g}")
    check_positive("--dense-steps", args.dense_steps, 0)
    if args.profile not in ("auto", "none"):
        if args.threshold is not None or args.dense_steps is not None:
            given = "--threshold" if args.threshold is not None else "--dense-steps"
            raise ValueError(f"{given}: a profile sets every layer's thresholds and the dense steps; expected "
                             f"--profile none (or auto) with {given}, got --profile {args.profile}")
        profile_option(args.profile)
    if not args.guidance >= 0:
        raise ValueError(f"--guidance: expected a number >= 0, got {args.guidance:g}")
    check_pv_dtype(args)
    try:
        encode_prompt(args.prompt)
    except ValueError as err:
        raise ValueError(f"--prompt: {str(err).removeprefix('prompt: ')}") from None


def choose_setting(args, tokens: int, steps: int) -> dict:
    """What the demo runs: ``{"profile": Profile or None, "threshold", "dense_steps", "why"}``.

    ``--profile auto`` takes the shipped profile only where it was calibrated (this token count and step count):
    elsewhere its thresholds were never measured, so the measured defaults run instead.
    """
    plain = {"profile": None, "threshold": DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
             "dense_steps": DEFAULT_DENSE_STEPS if args.dense_steps is None else args.dense_steps}
    if args.profile == "none" or args.threshold is not None or args.dense_steps is not None:
        return dict(plain, why="one threshold (asked for)")
    if args.profile != "auto":
        profile = profile_option(args.profile)
        profile_covers(profile, tokens)  # refused here, before any generation
        return {"profile": profile, "threshold": None, "dense_steps": profile.dense_steps,
                "why": f"profile {args.profile}"}
    from .calibration import TESTBED_PROFILE

    if not TESTBED_PROFILE.is_file():
        return dict(plain, why="measured defaults (no shipped profile in this installation)")
    profile = profile_option(SHIPPED_PROFILE)
    if (profile.tokens, profile.steps) == (tokens, steps):
        return {"profile": profile, "threshold": None, "dense_steps": profile.dense_steps,
                "why": "the shipped calibration profile"}
    return dict(plain, why=f"measured defaults (the shipped profile was calibrated at {profile.tokens} tokens and "
                           f"{profile.steps} steps, this run has {tokens} and {steps})")


def _per_layer_per_step(summary) -> dict[str, dict[int, float]]:
    """Mean skipped fraction of each layer at each step, over CFG contexts."""
    groups: dict[str, dict[int, list[float]]] = {}
    for call in summary.calls:
        groups.setdefault(call.layer, {}).setdefault(call.step, []).append(call.sparsity)
    return {layer: {s: sum(v) / len(v) for s, v in steps.items()} for layer, steps in groups.items()}


def _write_outputs(out: Path, dense, lite, report: dict, tokens_per_frame: int) -> list[str]:
    from .testbed.media import frame_grid, label_columns, save_gif
    from .testbed.plots import plot_rows, plot_skip_masks, plot_sparsity

    a, b = dense.video[0], lite.video[0]
    diff = ((b - a).abs() * 5).clamp(0, 2) - 1  # |difference| x5, black = identical
    scale = max(2, 128 // a.shape[-1])
    labels = ["dense", "liteattn", "|difference| x5"]
    frames = label_columns(frame_grid([a, b, diff], columns=3, scale=scale), labels)
    steps_dense = report["dense_steps"]
    files = {
        "side_by_side.gif": lambda p: save_gif(frames, p),
        "side_by_side.png": lambda p: plot_rows(
            [a, b, diff], labels, p, every=max(1, a.shape[1] // 8),
            title=f"'{report['prompt']}', seed {report['seed']}: {_every_text(max(1, a.shape[1] // 8))}; "
                  "the bottom row is |liteattn - dense| x 5 (black: identical)"),
        "sparsity.png": lambda p: plot_sparsity(
            {int(k): v["sparsity"] for k, v in lite.summary.per_step().items()},
            _per_layer_per_step(lite.summary), p,
            f"liteattn, {_setting_text(report)}: tiles skipped per step", dense_steps=steps_dense),
    }
    if lite.masks:
        block_m, block_n = lite.tiles
        files["skip_masks.png"] = lambda p: plot_skip_masks(
            lite.masks, p, (tokens_per_frame / block_m, tokens_per_frame / block_n),
            f"skip masks after the last step ({MASK_CONTEXT} pass, {block_m}x{block_n}-token tiles): light = "
            "computed, dark = skipped; dotted lines = frame boundaries")
    written = []
    for name, write in files.items():
        write(out / name)
        written.append(name)
    (out / "summary.txt").write_text(str(lite.summary) + "\n")
    written.append("summary.txt")
    report["files"] = written + ["report.json"]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return report["files"]


def _setting_text(report: dict) -> str:
    if report.get("profile"):
        return f"profile {report['profile']['name']!r} (per-layer thresholds)"
    return f"threshold {report['threshold']:g}"


def _every_text(every: int) -> str:
    return "every frame" if every == 1 else f"every {every}th frame"


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def run(args) -> int:
    check_args(args)
    setup = prepare(args, "demo")
    if isinstance(setup, str):
        print(setup, file=sys.stderr)
        return 2
    import torch

    from .testbed import describe_prompt, encode_prompt
    from .testbed.evaluator import score_video
    from .testbed.metrics import psnr, ssim
    from .testbed.runs import generate

    device, size, frames, pixels, steps = setup.device, setup.size, setup.frames, setup.pixels, setup.steps
    out, dtype, testbed = setup.out, setup.dtype, setup.testbed
    tokens = encode_prompt(args.prompt)[None]
    tokens_per_video = testbed.tokens_per_video(frames, pixels)
    setting = choose_setting(args, tokens_per_video, steps)
    graphs = device.type == "cuda" and not args.no_cuda_graph
    print(f"liteattn demo: '{describe_prompt(tokens[0])}', {frames} frames of {pixels}px = {tokens_per_video} tokens, "
          f"{steps} steps, guidance {args.guidance:g}, seed {args.seed}, {device} {str(dtype).replace('torch.', '')}"
          f"{', CUDA graphs' if graphs else ''}")

    common = dict(frames=frames, size=pixels, steps=steps, guidance=args.guidance, cuda_graph=graphs,
                  show_progress=not args.no_progress)
    dense = generate(testbed, tokens, [args.seed], threshold=None, dense_steps=steps, desc="dense", **common)
    blocks = len(testbed.transformer.blocks)
    lite = generate(testbed, tokens, [args.seed], threshold=setting["threshold"], dense_steps=setting["dense_steps"],
                    profile=setting["profile"], mask_layers=tuple(sorted({0, blocks // 2, blocks - 1})),
                    desc="liteattn", qk_dtype=args.qk_dtype, pv_dtype=args.pv_dtype, **common)

    per_step = {int(k): v["sparsity"] for k, v in lite.summary.per_step().items()}
    last = per_step[max(per_step)] if per_step else 0.0
    scores = {name: score_video(run.video[0], tokens[0]).as_dict() for name, run in (("dense", dense),
                                                                                        ("liteattn", lite))}
    tokens_per_frame = tokens_per_video // frames
    report = {
        "prompt": describe_prompt(tokens[0]), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "qk_dtype": args.qk_dtype, "pv_dtype": args.pv_dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "backend": "triton" if device.type == "cuda" else "torch (reference; no speed-up on a CPU)",
        "cuda_graphs": graphs, "size": size, "frames": frames, "pixels": pixels, "tokens_per_video": tokens_per_video,
        "tiles": list(lite.tiles or ()), "steps": steps, "guidance": args.guidance, "seed": args.seed,
        "threshold": setting["threshold"], "dense_steps": setting["dense_steps"], "setting": setting["why"],
        "profile": None if setting["profile"] is None else {
            "name": setting["profile"].name, "tokens": setting["profile"].tokens,
            "token_rule": setting["profile"].token_rule, "steps": setting["profile"].steps,
            "thresholds": setting["profile"].to_dict()["thresholds"], "budget": setting["profile"].budget},
        "dense": {"wall_s": dense.wall_s, "attention_s": dense.attention_s, "kernels_s": dense.kernels_s},
        "liteattn": {"wall_s": lite.wall_s, "attention_s": lite.attention_s, "kernels_s": lite.kernels_s,
                     "sparsity_mean": lite.summary.sparsity, "sparsity_last_step": last,
                     "sparsity_per_step": [per_step[k] for k in sorted(per_step)],
                     "sparsity_per_layer": {k: v["sparsity"] for k, v in lite.summary.per_layer().items()},
                     "fallbacks": lite.summary.fallbacks},
        "speedup": {"wall": dense.wall_s / lite.wall_s,
                    "attention": dense.attention_s / lite.attention_s if lite.attention_s else None},
        "scores": scores,
        "fidelity_vs_dense": {"psnr_db": _finite(psnr(lite.video, dense.video)), "ssim": ssim(lite.video, dense.video)},
        "model": dict(testbed.info, layers=blocks, heads=testbed.transformer.config.num_attention_heads,
                      head_dim=testbed.transformer.config.attention_head_dim),
    }
    if dense.kernels_s:
        report["dense"]["attention_share_of_gpu_time"] = dense.attention_s / dense.kernels_s
    files = _write_outputs(out, dense, lite, report, tokens_per_frame)
    _print_report(report, out, files)
    return 0


def _print_report(r: dict, out: Path, files: list[str]) -> None:
    d, lt, f = r["dense"], r["liteattn"], r["fidelity_vs_dense"]
    gpu = r["device"].startswith("cuda")
    attn = lambda run: "-" if run["attention_s"] is None else f"{run['attention_s']:6.2f} s"  # noqa: E731
    share = f" ({100 * d['attention_share_of_gpu_time']:.0f}% of GPU time)" if "attention_share_of_gpu_time" in d else ""
    print(f"dense    : wall {d['wall_s']:6.2f} s, attention {attn(d)}{share}")
    print(f"liteattn : wall {lt['wall_s']:6.2f} s, attention {attn(lt)}; {_setting_text(r)}, "
          f"first {r['dense_steps']} steps dense")
    print(f"setting  : {r['setting']}")
    print(f"skipped  : {100 * lt['sparsity_mean']:.1f}% of tiles over the run, {100 * lt['sparsity_last_step']:.1f}% "
          "at the last step; per step: " + " ".join(f"{100 * s:.0f}" for s in lt["sparsity_per_step"]))
    attn_speedup = r["speedup"]["attention"]
    print(f"speed-up : wall {r['speedup']['wall']:.2f}x, attention "
          f"{'-' if attn_speedup is None else f'{attn_speedup:.2f}x'}"
          + ("" if gpu else "  (CPU: liteattn runs its PyTorch reference, which does not save time; run on a GPU "
                            "for speed)"))
    names = ("prompt_adherence", "subject_consistency", "motion_smoothness", "background_stability", "overall")
    print("scores   : " + ", ".join(f"{n.split('_')[0]} {r['scores']['dense'][n]:.2f} / {r['scores']['liteattn'][n]:.2f}"
                                    for n in names) + "  (dense / liteattn; one video each: `liteattn eval` for "
                                                      "many prompts and seeds)")
    psnr_text = f["psnr_db"] if isinstance(f["psnr_db"], str) else f"{f['psnr_db']:.1f}"
    print(f"fidelity : PSNR {psnr_text} dB, SSIM {f['ssim']:.4f} of the liteattn video against the dense one")
    if lt["fallbacks"]:
        print(f"note     : dense fallbacks {lt['fallbacks']}")
    print(f"wrote    : {', '.join(str(out / name) for name in files)}")
