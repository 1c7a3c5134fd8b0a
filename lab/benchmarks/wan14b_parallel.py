"""Wan2.1-14B-shaped transformer under diffusers' context parallelism: dense vs liteattn, one GPU vs two.

The shape is wan14b_shape.py's (beside this script), as are the modes; what is new is the parallel part.

What it measures: the time of one denoising step (a conditional forward of a few real-shaped blocks at 720p x 81
frames, 75,600 tokens) and liteattn's skipped fraction, on one GPU and split over the GPUs of ``torchrun`` with
Ulysses and with ring attention (``transformer.enable_parallelism``), each time with the model's own attention
("dense") and with liteattn. Random weights give little natural sparsity, so ``--force-sparsity s`` also times
liteattn on skip states seeded with a skipped fraction ``s`` (kept fixed by a threshold that marks nothing).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 lab/benchmarks/wan14b_parallel.py --force-sparsity 0.5 \\
        --out wan14b-parallel.json

NVLink multicast (NVLS) stays off (``NCCL_NVLS_ENABLE=0``; the script sets it when unset): nothing here needs it,
and on shared multi-GPU hosts a program using it can leave the GPUs unusable for others.

Runs, each on a freshly built model with the same weights:

- one GPU: rank 0 alone (the other ranks wait), without parallelism;
- for each of ``--parallel`` (``ulysses``, ``ring``; ``unified`` needs 4 processes): every rank, with
  ``ContextParallelConfig(ulysses_degree=N)`` / ``(ring_degree=N)`` / ``(ring_degree=2, ulysses_degree=N/2)``.

Modes: ``stock`` (diffusers alone), ``dense`` (liteattn's hooks, every step through the model's own backend),
``liteattn`` (``--threshold``), ``forced`` (seeded sparsity). The dense backend (``--dense-backend``, default
``_native_cudnn``) must return the log-sum-exp for ring, as diffusers' ring merge needs it; PyTorch's SDPA
("native") does not. Step times are CUDA events, the slowest rank's per step; sparsity is the mean over ranks
(each rank skips within its own heads or query block). Warm-up forwards (compilation, autotuning) are not timed.
No run uses CUDA graphs: liteattn does not capture context-parallel forwards, so the one-GPU runs go without too.

    python lab/benchmarks/wan14b_parallel.py --tiny --parallel   # CPU smoke run of the one-process part
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys

import torch
import torch.distributed as dist

from wan14b_shape import LATENT_720P_81F, TEXT_TOKENS, WAN_14B, _clock  # same folder: the script's directory is on sys.path

TINY = dict(WAN_14B, num_attention_heads=4, attention_head_dim=16, text_dim=32, ffn_dim=32, rope_max_seq_len=32)
TINY_LATENT = (1, 16, 4, 8, 8)  # 64 tokens: 2 tiles of 16 per rank with 2 ranks
TINY_TEXT_TOKENS = 16

MODES = ("stock", "dense", "liteattn", "forced")
PARALLEL = ("ulysses", "ring", "unified")
NEVER_MARKS = -1e30  # a finite threshold that marks nothing: seeded states stay as seeded, through liteattn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="transformer blocks to build (default 2 of the real 40)")
    p.add_argument("--steps", type=int, default=6, help="timed denoising steps per run (default 6)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first (compilation, autotuning)")
    p.add_argument("--threshold", type=float, default=-10.0, help="liteattn threshold, log2 units (default -10)")
    p.add_argument("--force-sparsity", type=float, default=None, metavar="S",
                   help="also time liteattn with a seeded skipped fraction S in [0, 1)")
    p.add_argument("--block-size", type=int, nargs=2, default=None, metavar=("BM", "BN"),
                   help="liteattn tile sizes (default per head_dim)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--parallel", nargs="*", default=["ulysses", "ring"], choices=PARALLEL,
                   help="context-parallel layouts to time on every rank (default: ulysses ring)")
    p.add_argument("--no-single", action="store_true", help="skip the one-GPU runs")
    p.add_argument("--dense-backend", default=None,
                   help="the model's own attention backend (default _native_cudnn on CUDA, native on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke test of this script)")
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    args = p.parse_args(argv)
    if args.layers < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--layers, --steps and --warmup must be >= 1 (forced sparsity is seeded after the warm-up)")
    if args.force_sparsity is not None and not 0.0 <= args.force_sparsity < 1.0:
        p.error(f"--force-sparsity: expected a fraction in [0, 1), got {args.force_sparsity}")
    if args.force_sparsity is None:
        args.modes = [m for m in args.modes if m != "forced"]
    if args.tiny and args.block_size is None:
        args.block_size = (16, 16)  # several tiles in the tiny model's 64 tokens
    return args


def parallel_config(layout: str, world: int):
    """diffusers' ``ContextParallelConfig`` for ``layout`` over ``world`` ranks, or a ValueError."""
    from diffusers import ContextParallelConfig

    if layout == "ulysses":
        return ContextParallelConfig(ulysses_degree=world)
    if layout == "ring":
        return ContextParallelConfig(ring_degree=world)
    if world % 2 or world < 4:
        raise ValueError(f"--parallel unified: expected an even number of processes >= 4, got {world}")
    return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2)


def build(args, device: torch.device):
    """The model and its inputs: real shape in bf16 on CUDA, or the tiny one in fp32 on the CPU."""
    from diffusers import WanTransformer3DModel

    config, latent, text = (TINY, TINY_LATENT, TINY_TEXT_TOKENS) if args.tiny else (WAN_14B, LATENT_720P_81F,
                                                                                      TEXT_TOKENS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(num_layers=args.layers, **config)
    # As from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in float32 stay float32.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if not keep & set(name.split(".")):
            param.data = param.data.to(dtype)
    model = model.to(device).eval()
    gen = torch.Generator("cpu").manual_seed(args.seed)  # the same inputs on every rank and device
    hidden = torch.randn(latent, generator=gen).to(device, dtype)
    prompt = torch.randn(latent[0], text, config["text_dim"], generator=gen).to(device, dtype)
    return model, hidden, prompt


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers 0.42 places a rank on ``rank % torch.accelerator.device_count()``, which is 0 without an
    accelerator: on a CPU (the smoke run) it counts one device while parallelism is enabled."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def seed_states(handle, sparsity: float, seed: int, device: torch.device) -> None:
    """Replace every "cond" skip state of the patched layers (one per context-parallel part, or the context's own)
    with a random one skipping a fraction ``sparsity`` of each row's tiles; the first tile of each row stays."""
    from liteattn import SkipState

    gen = torch.Generator("cpu").manual_seed(seed)
    for runtime in handle.layer_runtimes().values():
        for key, context_state in runtime.contexts.items():
            attention = context_state.attention
            if (key if isinstance(key, str) else key[0]) != "cond" or attention.state is None:
                continue
            state = attention.state
            active = torch.rand(state.shape, generator=gen) >= sparsity
            active[..., 0] = True
            attention.state = SkipState.from_dense(active.to(device), state.seq_len_q, state.seq_len_k,
                                                   state.block_m, state.block_n)


def run_mode(mode: str, model, hidden, prompt, args, group) -> dict:
    """Time ``args.steps`` forwards in one mode on this rank; with ``group``, reduce over its ranks."""
    import liteattn.integrations as li

    start, stop = _clock(hidden.device.type)
    steps = args.warmup + args.steps
    handle = None
    if mode == "dense":
        handle = li.apply(model, dense_steps=steps, timing=True, block_size=args.block_size)
    elif mode == "liteattn":
        handle = li.apply(model, threshold=args.threshold, timing=True, block_size=args.block_size)
    elif mode == "forced":
        handle = li.apply(model, threshold=NEVER_MARKS, timing=True, block_size=args.block_size)
    try:
        step_ms = []
        with torch.no_grad():
            for i in range(steps):
                if mode == "forced" and i == args.warmup:  # the states exist (and are compiled for) by now
                    seed_states(handle, args.force_sparsity, args.seed, hidden.device)
                timestep = torch.full((hidden.shape[0],), 1000.0 * (1 - i / steps), device=hidden.device)
                begin = start()
                with model.cache_context("cond", step_index=i):
                    model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=prompt, return_dict=False)
                if i >= args.warmup:
                    step_ms.append(stop(begin))
        result = {"step_ms": _reduce(step_ms, dist.ReduceOp.MAX, group)}
        if handle is not None:
            summary = handle.summary()
            rows = [row for step, row in sorted(summary.per_step().items()) if step >= args.warmup]
            result["sparsity"] = _reduce([row["sparsity"] for row in rows], dist.ReduceOp.SUM, group, mean=True)
            result["attention_ms"] = _reduce([row["attention_ms"] or 0.0 for row in rows], dist.ReduceOp.MAX,
                                             group)
            result["fallbacks"] = summary.fallbacks
        result["mean_step_ms"] = sum(result["step_ms"]) / len(result["step_ms"])
        return result
    finally:
        if handle is not None:
            handle.remove()


def _reduce(values: list[float], op, group, mean: bool = False) -> list[float]:
    """``values`` reduced element-wise over ``group`` (unchanged without one)."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=op, group=group)
    if mean:
        t /= dist.get_world_size(group)
    return t.tolist()


def run_layout(layout: str | None, args, device: torch.device, rank: int, world: int) -> dict:
    """Every mode on a fresh model: without parallelism (``layout`` None) or with it on every rank."""
    model, hidden, prompt = build(args, device)
    backend = args.dense_backend or ("_native_cudnn" if device.type == "cuda" else "native")
    model.set_attention_backend(backend)
    group = None
    if layout is not None:
        with _cpu_device_count():
            model.enable_parallelism(config=parallel_config(layout, world))
        group = dist.group.WORLD
    seq = math.prod(hidden.shape[2:]) // math.prod(model.config.patch_size)
    report = {"processes": 1 if layout is None else world, "parallel": layout, "dense_backend": backend,
              "tokens": seq, "modes": {}, "skipped": {}}
    for mode in args.modes:
        if layout in ("ring", "unified") and mode in ("stock", "dense") and backend == "native":
            report["skipped"][mode] = "diffusers' ring needs a backend that returns the log-sum-exp; native does not"
            continue
        result = report["modes"][mode] = run_mode(mode, model, hidden, prompt, args, group)
        if rank == 0:
            sparsity = f", sparsity {sum(result['sparsity']) / len(result['sparsity']):.1%}" if "sparsity" in \
                result else ""
            print(f"{layout or 'one GPU':>8} {mode:>9}: step {result['mean_step_ms']:.1f} ms{sparsity}", flush=True)
    del model
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    import diffusers

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before the process group exists (see the docstring)
    owns_group = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The other ranks wait at a barrier while rank 0 times the one-GPU runs: minutes, not NCCL's default 10.
        dist.init_process_group("gloo" if args.tiny else "nccl", timeout=datetime.timedelta(minutes=60))
        owns_group = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.tiny:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("wan14b_parallel: no CUDA GPU here; this benchmark needs one per process (use --tiny for a CPU "
              "smoke run).")
        return 0
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    try:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "model": "tiny" if args.tiny else "Wan2.1-14B shape", "layers": args.layers,
            "steps": args.steps, "warmup": args.warmup, "threshold": args.threshold,
            "force_sparsity": args.force_sparsity, "block_size": args.block_size,
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "runs": [],
        }
        if not args.no_single:
            if rank == 0:
                report["runs"].append(run_layout(None, args, device, rank, world))
            if world > 1:
                dist.barrier()
        if world > 1:
            for layout in args.parallel:
                report["runs"].append(run_layout(layout, args, device, rank, world))
        elif args.parallel and rank == 0:
            print(f"wan14b_parallel: one process: the {args.parallel} runs need torchrun --nproc-per-node 2 (or more)")
        if args.out and rank == 0:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.out}")
        return 0
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
