"""Wan2.1-14B-shaped transformer forwards at 720p x 81 frames: dense vs liteattn.

Why a few random layers of the real shape: attention cost depends on the
sequence length, heads and head_dim, not on trained weights, and two of the
forty 14B blocks fit on one GPU with their 75,600-token activations. Random
weights give little natural sparsity, so ``--force-sparsity s`` seeds every
layer's skip state with a random fraction ``s`` of skipped tiles (threshold
-inf keeps it fixed) to measure time at a chosen sparsity.

Modes (each on a fresh patch of the same model):
  stock     the model as diffusers ships it (total time per step only)
  dense     every call through the model's own backend, timed by liteattn's hooks
  liteattn  liteattn with --threshold
  forced    liteattn with a seeded sparsity (with --force-sparsity)

Each step is one conditional forward inside ``cache_context("cond",
step_index=i)``, as WanPipeline calls it. Times: CUDA events; attention time
is the sum over the patched layers.

    python lab/benchmarks/wan14b_shape.py --layers 2 --steps 6 --force-sparsity 0.5 --out wan14b.json
    python lab/benchmarks/wan14b_shape.py --tiny --out tiny.json   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

WAN_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
LATENT_720P_81F = (1, 16, 21, 90, 160)  # (B, C, frames, H/8, W/8): 21 * 45 * 80 = 75,600 tokens
TEXT_TOKENS = 512

TINY = dict(WAN_14B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=32, rope_max_seq_len=32)
TINY_LATENT = (1, 16, 3, 8, 8)  # 48 tokens
TINY_TEXT_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="transformer blocks to build (default 2 of the real 40)")
    p.add_argument("--steps", type=int, default=6, help="timed denoising steps per mode (default 6)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first (compilation, autotuning)")
    p.add_argument("--threshold", type=float, default=-10.0, help="liteattn threshold, log2 units (default -10)")
    p.add_argument("--force-sparsity", type=float, default=None, metavar="S",
                   help="also time liteattn with a seeded skipped fraction S in [0, 1)")
    p.add_argument("--block-size", type=int, nargs=2, default=None, metavar=("BM", "BN"),
                   help="liteattn tile sizes (default per head_dim)")
    p.add_argument("--modes", nargs="+", default=["stock", "dense", "liteattn", "forced"],
                   choices=["stock", "dense", "liteattn", "forced"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke test of this script)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.layers < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--layers and --steps must be >= 1, --warmup >= 0")
    if args.force_sparsity is not None and not 0.0 <= args.force_sparsity < 1.0:
        p.error(f"--force-sparsity: expected a fraction in [0, 1), got {args.force_sparsity}")
    if args.force_sparsity is None:
        args.modes = [m for m in args.modes if m != "forced"]
    if args.tiny and args.block_size is None:
        args.block_size = (16, 16)  # several tiles in the tiny model's 48 tokens
    return args


def build(args):
    """The model and its inputs: real shape in bf16 on CUDA, or the tiny one in fp32 on CPU."""
    from diffusers import WanTransformer3DModel

    config, latent, text = (TINY, TINY_LATENT, TINY_TEXT_TOKENS) if args.tiny else (WAN_14B, LATENT_720P_81F,
                                                                                      TEXT_TOKENS)
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(num_layers=args.layers, **config)
    # As from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in float32 stay float32.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not keep & set(name.split(".")):
            param.data = param.data.to(dtype)
    model = model.to(device).eval()
    gen = torch.Generator(device).manual_seed(args.seed)
    hidden = torch.randn(latent, generator=gen, device=device, dtype=dtype)
    prompt = torch.randn(latent[0], text, config["text_dim"], generator=gen, device=device, dtype=dtype)
    return model, hidden, prompt


def _clock(device: str):
    """start() -> token, stop(token) -> ms; CUDA events on a GPU."""
    if device == "cuda":
        def start():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def stop(begin):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)
    else:
        def start():
            return time.perf_counter()

        def stop(begin):
            return (time.perf_counter() - begin) * 1000.0
    return start, stop


def seed_states(handle, model, hidden, sparsity: float, block_size, seed: int) -> None:
    """Give every patched layer's "warmup" and "cond" states a random skipped fraction ``sparsity``.

    The diagonal tile of each query tile stays active, so every row has keys. The warm-up forwards get a state
    of the same kind, so that they compile the kernel specialization the timed steps run.
    """
    from liteattn import SkipState
    from liteattn.kernels import default_block_sizes
    from liteattn.state import num_tiles

    cfg = model.config
    _, _, frames, height, width = hidden.shape
    pt, ph, pw = cfg.patch_size
    seq = (frames // pt) * (height // ph) * (width // pw)
    bm, bn = block_size or default_block_sizes(cfg.attention_head_dim)
    qt, kt = num_tiles(seq, bm), num_tiles(seq, bn)
    gen = torch.Generator(hidden.device).manual_seed(seed)
    for layer in handle.layers:
        active = torch.rand(hidden.shape[0], cfg.num_attention_heads, qt, kt, generator=gen,
                            device=hidden.device) >= sparsity
        diagonal = (torch.arange(qt, device=hidden.device) * bm // bn).clamp(max=kt - 1)
        active[..., torch.arange(qt, device=hidden.device), diagonal] = True
        for context in ("warmup", "cond"):
            handle.attention(layer, context=context).state = SkipState.from_dense(active, seq, seq, bm, bn)


def run_mode(mode: str, model, hidden, prompt, args) -> dict:
    """Time ``args.steps`` forwards in one mode; returns per-step times and sparsities."""
    import liteattn.integrations as li

    device = hidden.device.type
    start, stop = _clock(device)
    handle = None
    if mode == "dense":
        handle = li.apply(model, dense_steps=args.warmup + args.steps, timing=True, block_size=args.block_size)
    elif mode == "liteattn":
        handle = li.apply(model, threshold=args.threshold, timing=True, block_size=args.block_size)
    elif mode == "forced":
        handle = li.apply(model, threshold=-math.inf, timing=True, block_size=args.block_size)
        seed_states(handle, model, hidden, args.force_sparsity, args.block_size, args.seed)
    try:
        step_ms = []
        with torch.no_grad():
            for i in range(args.warmup + args.steps):
                timestep = torch.full((hidden.shape[0],), 1000.0 * (1 - i / (args.warmup + args.steps)),
                                      device=hidden.device)
                # Warm-up forwards run in their own context: they leave the timed states fresh.
                context = "warmup" if i < args.warmup else "cond"
                begin = start()
                with model.cache_context(context, step_index=i):
                    model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=prompt, return_dict=False)
                if i >= args.warmup:
                    step_ms.append(stop(begin))
        result = {"step_ms": step_ms, "mean_step_ms": sum(step_ms) / len(step_ms)}
        if handle is not None:
            summary = handle.summary()
            per_step = [row for _, row in sorted(_cond_steps(summary).items())]
            result["attention_ms"] = [row["attention_ms"] for row in per_step]
            result["sparsity"] = [row["sparsity"] for row in per_step]
            result["mean_attention_ms"] = sum(result["attention_ms"]) / len(per_step)
            result["fallbacks"] = summary.fallbacks
        return result
    finally:
        if handle is not None:
            handle.remove()


def _cond_steps(summary) -> dict[int, dict]:
    """Per-step attention time (sum over layers) and sparsity (mean) of the "cond" context."""
    steps: dict[int, list] = {}
    for call in summary.calls:
        if call.context == "cond":
            steps.setdefault(call.step, []).append(call)
    return {step: {"attention_ms": sum(c.attention_ms for c in calls),
                   "sparsity": sum(c.sparsity for c in calls) / len(calls)} for step, calls in steps.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("wan14b_shape: no CUDA GPU here; this benchmark needs one (use --tiny for a CPU smoke run).")
        return 0
    import diffusers

    model, hidden, prompt = build(args)
    seq = math.prod(hidden.shape[2:]) // math.prod(model.config.patch_size)
    report = {
        "device": torch.cuda.get_device_name() if hidden.is_cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": "tiny" if args.tiny else "Wan2.1-14B shape", "layers": args.layers, "tokens": seq,
        "latent": list(hidden.shape), "dtype": str(hidden.dtype), "steps": args.steps, "warmup": args.warmup,
        "threshold": args.threshold, "force_sparsity": args.force_sparsity, "block_size": args.block_size,
        "modes": {},
    }
    for mode in args.modes:
        result = run_mode(mode, model, hidden, prompt, args)
        report["modes"][mode] = result
        attention = f", attention {result['mean_attention_ms']:.1f} ms" if "mean_attention_ms" in result else ""
        sparsity = f", sparsity {sum(result['sparsity']) / len(result['sparsity']):.1%}" if "sparsity" in result else ""
        print(f"{mode:>9}: step {result['mean_step_ms']:.1f} ms{attention}{sparsity}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
