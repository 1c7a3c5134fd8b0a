"""Generate one video twice, with dense attention and with liteattn, and compare.

The model is liteattn's shipped testbed: a small Wan transformer
(diffusers' WanTransformer3DModel) trained on videos of moving shapes, so
this runs offline on any machine. The same prompt, seed and noise are used
for both runs; liteattn is switched on with its one-line diffusers
integration, ``liteattn.integrations.apply(transformer, ...)``.

Reported (printed, and in the output folder): wall time and attention time of
each run, the fraction of attention tiles skipped at each step and in each
layer, quality of the liteattn video against the dense one (PSNR, SSIM), a
GIF of both side by side, skip masks of a few layers at the last step, and
report.json with every number.

On a CPU liteattn runs its PyTorch reference implementation (the GPU
kernel's skipping rules, no speed-up): the CPU run shows sparsity and quality, the
speed-up needs a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_PROMPT", "DEFAULT_THRESHOLD", "SIZES", "add_arguments", "run"]

# Per size: frames and denoising steps. Small fits ~2 minutes on a laptop CPU;
# large is the default on a GPU.
SIZES = {"small": {"frames": 8, "steps": 20}, "large": {"frames": 16, "steps": 30}}
# Chosen on the shipped testbed (docs/testbed.md has the sweep): at the small size
# this skips ~25% of tiles by the last step with PSNR 27-30 dB against dense.
# The testbed's attention is flatter than a large model's (one head per layer
# attends to the whole background), so it needs a far less negative threshold
# than liteattn's general default of -10, which skips ~1% here. Three dense
# steps first, as serving stacks do: the noisiest steps lay out the video and
# an early skip would move every later frame.
DEFAULT_THRESHOLD = -1.5
DEFAULT_DENSE_STEPS = 3
# The testbed's sequences are short (2-4k tokens): 64x128 tiles (the sweep's tiles) keep 32-64 query tiles per
# head, where the library default at head_dim 64 (128x128, chosen for speed at 30k+ tokens) would halve that.
DEMO_TILES = (64, 128)
DEFAULT_PROMPT = "yellow striped circle, red square, blue triangle"
LPIPS_NOTE = ("LPIPS not computed: it needs pretrained network weights (AlexNet/VGG), which cannot be downloaded "
              "offline; PSNR and SSIM need none")
MASK_CONTEXT = "cond"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="liteattn-demo", help="output folder (default: liteattn-demo)")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="small: 8 frames, 20 steps; large: 16 frames, 30 steps (default: small on a CPU, "
                             "large on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: per size)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: per size)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"liteattn's negative log2 skip threshold (default: {DEFAULT_THRESHOLD:g}, tuned for the testbed)")
    parser.add_argument("--dense-steps", type=int, default=DEFAULT_DENSE_STEPS,
                        help=f"first steps run dense before liteattn starts skipping (default: {DEFAULT_DENSE_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"1-3 shapes, 'COLOUR [TEXTURE] KIND, ...' (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args):
    """Validated settings: (device, size name, frames, steps)."""
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {args.device!r} asked for, but no CUDA device is available; use --device cpu")
    size = args.size or ("large" if device.type == "cuda" else "small")
    frames = SIZES[size]["frames"] if args.frames is None else args.frames
    steps = SIZES[size]["steps"] if args.steps is None else args.steps
    if frames < 1:
        raise ValueError(f"--frames: expected an int >= 1, got {frames}")
    if steps < 1:
        raise ValueError(f"--steps: expected an int >= 1, got {steps}")
    if not args.threshold < 0:
        raise ValueError(f"--threshold: expected a negative number (log2 units, e.g. -8), got {args.threshold}")
    if args.dense_steps < 0:
        raise ValueError(f"--dense-steps: expected an int >= 0, got {args.dense_steps}")
    if args.guidance < 0:
        raise ValueError(f"--guidance: expected a number >= 0, got {args.guidance}")
    return device, size, frames, steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(testbed, tokens, frames: int, steps: int, args, device, sparse: bool) -> dict:
    """One timed generation with liteattn patched in; returns the video, times and the skip records.

    The dense run goes through the same patch with every step dense
    (``dense_steps=steps``): the model's own attention runs, timed by the same
    code as liteattn's, so the two attention times compare like for like.
    """
    from .integrations import apply, remove
    from .testbed.sampler import sample_video

    transformer = testbed.transformer
    kwargs = {"threshold": args.threshold, "dense_steps": args.dense_steps} if sparse else {"dense_steps": steps}
    handle = apply(transformer, profile=True, block_size=DEMO_TILES, **kwargs)
    try:
        sample = dict(prompts=tokens, frames=frames, guidance=args.guidance, seed=args.seed)
        if device.type == "cuda":  # compile and autotune kernels outside the timed run (past the dense steps)
            sample_video(testbed, show_progress=False, steps=min(steps, args.dense_steps + 2), **sample)
        _sync(device)
        start = time.perf_counter()
        video = sample_video(testbed, steps=steps, show_progress=not args.no_progress,
                             desc="liteattn" if sparse else "dense", **sample)
        _sync(device)
        wall = time.perf_counter() - start
        summary = handle.summary()
        masks, tiles = {}, None
        if sparse:
            blocks = len(transformer.blocks)
            for index in sorted({0, blocks // 2, blocks - 1}):
                name = f"blocks.{index}.attn1"
                state = handle.attention(name, MASK_CONTEXT).state
                if state is not None:
                    masks[name] = state.to_dense()[0].cpu()
                    tiles = (state.block_m, state.block_n)
    finally:
        remove(transformer)
    return {"video": video.cpu(), "wall_s": wall, "summary": summary, "masks": masks, "tiles": tiles}


def _per_layer_per_step(summary) -> dict[str, dict[int, float]]:
    """Mean skipped fraction of each layer at each step, over CFG contexts."""
    groups: dict[str, dict[int, list[float]]] = {}
    for call in summary.calls:
        groups.setdefault(call.layer, {}).setdefault(call.step, []).append(call.sparsity)
    return {layer: {s: sum(v) / len(v) for s, v in steps.items()} for layer, steps in groups.items()}


def _write_outputs(out: Path, dense: dict, lite: dict, report: dict, tokens_per_frame: int) -> list[str]:
    from .testbed.media import frame_grid, label_columns, save_gif, save_strip
    from .testbed.plots import plot_skip_masks, plot_sparsity

    a, b = dense["video"][0], lite["video"][0]
    diff = ((b - a).abs() * 5).clamp(0, 2) - 1  # |difference| x5, black = identical
    frames = label_columns(frame_grid([a, b, diff], columns=3, scale=4), ["dense", "liteattn", "|diff| x5"])
    files = {
        "side_by_side.gif": lambda p: save_gif(frames, p),
        # PNG: one row per video (dense, liteattn, |diff| x5), frames left to right.
        "side_by_side.png": lambda p: save_strip(frame_grid([a, b, diff], columns=1, scale=3), p,
                                                 every=max(1, a.shape[1] // 8)),
        "sparsity.png": lambda p: plot_sparsity(
            {int(k): v["sparsity"] for k, v in lite["summary"].per_step().items()},
            _per_layer_per_step(lite["summary"]), p,
            f"liteattn, threshold {report['threshold']:g}, first {report['dense_steps']} steps dense: "
            "tiles skipped per step"),
    }
    if lite["masks"]:
        block_m, block_n = lite["tiles"]
        files["skip_masks.png"] = lambda p: plot_skip_masks(
            lite["masks"], p, (tokens_per_frame / block_m, tokens_per_frame / block_n),
            f"skip masks after the last step ({MASK_CONTEXT} pass): light = computed, dark = skipped")
    written = []
    for name, write in files.items():
        write(out / name)
        written.append(name)
    (out / "summary.txt").write_text(str(lite["summary"]) + "\n")
    written.append("summary.txt")
    report["files"] = written + ["report.json"]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return report["files"]


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def run(args) -> int:
    import torch

    from .testbed import describe_prompt, encode_prompt, load_testbed
    from .testbed.metrics import psnr, ssim
    try:  # fail early, with a clear message, when diffusers is missing
        importlib.import_module(".integrations.diffusers", __package__)
    except ImportError as err:
        print(f"liteattn demo needs diffusers >= 0.42 (pip install 'liteattn[diffusers]'): {err}", file=sys.stderr)
        return 2

    device, size, frames, steps = _options(args)
    tokens = encode_prompt(args.prompt)[None]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    testbed = load_testbed(device, dtype)
    tokens_per_video = testbed.tokens_per_video(frames)
    print(f"liteattn demo: '{describe_prompt(tokens[0])}', {frames} frames of {testbed.video['size']}px = "
          f"{tokens_per_video} tokens, {steps} steps, guidance {args.guidance:g}, seed {args.seed}, "
          f"{device} {str(dtype).replace('torch.', '')}")

    dense = _generate(testbed, tokens, frames, steps, args, device, sparse=False)
    lite = _generate(testbed, tokens, frames, steps, args, device, sparse=True)

    dense_attn = (dense["summary"].attention_ms or 0.0) / 1000
    lite_attn = (lite["summary"].attention_ms or 0.0) / 1000
    per_step = {int(k): v["sparsity"] for k, v in lite["summary"].per_step().items()}
    last = per_step[max(per_step)] if per_step else 0.0
    quality = {"psnr_db": _finite(psnr(lite["video"], dense["video"])),
               "ssim": ssim(lite["video"], dense["video"]), "lpips": None, "lpips_note": LPIPS_NOTE}
    tokens_per_frame = tokens_per_video // (frames // testbed.transformer.config.patch_size[0])
    report = {
        "prompt": describe_prompt(tokens[0]), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "backend": "triton" if device.type == "cuda" else "torch (reference; no speed-up on a CPU)",
        "size": size, "frames": frames, "frame_size": testbed.video["size"], "tokens_per_video": tokens_per_video,
        "tiles": list(lite["tiles"] or ()), "steps": steps, "guidance": args.guidance, "seed": args.seed,
        "threshold": args.threshold, "dense_steps": args.dense_steps,
        "dense": {"wall_s": dense["wall_s"], "attention_s": dense_attn},
        "liteattn": {"wall_s": lite["wall_s"], "attention_s": lite_attn, "sparsity_mean": lite["summary"].sparsity,
                     "sparsity_last_step": last, "sparsity_per_step": [per_step[k] for k in sorted(per_step)],
                     "sparsity_per_layer": {k: v["sparsity"] for k, v in lite["summary"].per_layer().items()},
                     "fallbacks": lite["summary"].fallbacks},
        "speedup": {"wall": dense["wall_s"] / lite["wall_s"],
                    "attention": dense_attn / lite_attn if lite_attn else None},
        "quality_vs_dense": quality,
        "model": dict(testbed.info, layers=len(testbed.transformer.blocks),
                      heads=testbed.transformer.config.num_attention_heads,
                      head_dim=testbed.transformer.config.attention_head_dim),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_outputs(out, dense, lite, report, tokens_per_frame)
    _print_report(report, out, files)
    return 0


def _print_report(r: dict, out: Path, files: list[str]) -> None:
    d, l, q = r["dense"], r["liteattn"], r["quality_vs_dense"]
    share = lambda a, w: f"{100 * a / w:.0f}% of wall" if w else "-"  # noqa: E731
    psnr_text = q["psnr_db"] if isinstance(q["psnr_db"], str) else f"{q['psnr_db']:.1f}"
    print(f"dense    : wall {d['wall_s']:7.2f} s, attention {d['attention_s']:7.2f} s ({share(d['attention_s'], d['wall_s'])})")
    print(f"liteattn : wall {l['wall_s']:7.2f} s, attention {l['attention_s']:7.2f} s "
          f"({share(l['attention_s'], l['wall_s'])}); threshold {r['threshold']:g}")
    print(f"skipped  : {100 * l['sparsity_mean']:.1f}% of tiles over the run, {100 * l['sparsity_last_step']:.1f}% "
          "at the last step; per step: " + " ".join(f"{100 * s:.0f}" for s in l["sparsity_per_step"]))
    attn_speedup = r["speedup"]["attention"]
    print(f"speed-up : wall {r['speedup']['wall']:.2f}x, attention "
          f"{'-' if attn_speedup is None else f'{attn_speedup:.2f}x'}"
          + ("" if r["device"].startswith("cuda") else
             "  (CPU: liteattn runs its PyTorch reference, which does not save time; run on a GPU for speed)"))
    print(f"quality  : PSNR {psnr_text} dB, SSIM {q['ssim']:.4f} vs dense; {q['lpips_note']}")
    if l["fallbacks"]:
        print(f"note     : dense fallbacks {l['fallbacks']}")
    print(f"wrote    : {', '.join(str(out / f) for f in files)}")
