"""Train the testbed: ``python -m liteattn.testbed.train --out DIR --minutes M``.

Rectified flow: ``x_t = (1 - t) x0 + t noise`` with logit-normal ``t``, the
transformer predicts the velocity ``noise - x0``; AdamW, bf16 autocast on a
GPU, an exponential moving average of the weights (what gets saved), and the
prompt dropped 10% of the time so classifier-free guidance works.

Why a time budget rather than a step count: the model is trained on a borrowed
GPU for a fixed number of minutes; the learning rate follows a cosine over
that time, so the run ends annealed whatever the machine's speed.

Why several sizes: the same weights run the CPU demo (8 frames of 32x32
pixels, 2,048 tokens) and the GPU demo (32 frames of 64x64, 32,768 tokens, where
attention is most of a step's time, as in real video models). Each step draws
one *bucket* (frames, size, batch) in turn, every bucket holding about the same
number of tokens, so every size stays in distribution. Fresh videos are drawn
every step (the generator is seeded by the step), so there is no dataset and
no overfitting.

Writes into DIR: ``weights/`` (fp16 safetensors + config.json, refreshed every
few minutes), ``train_log.txt``, ``loss.png``, ``samples.gif``, ``samples.png``
(generated rows, real rows last) and ``attention.png``.
"""
from __future__ import annotations

import argparse
import copy
import math
import queue
import threading
import time
from pathlib import Path

import torch

from .data import MAX_SHAPES, describe_prompt, generate_videos, random_prompts

__all__ = ["DEFAULT_BUCKETS", "main", "parse_buckets", "train"]

# frames x size x batch: about 131k tokens each; the GPU demo's size, the CPU demo's, and two between.
DEFAULT_BUCKETS = "32x64x4,8x32x64,16x64x8,32x64x4,16x32x32"


class _Prefetcher:
    """Draws the next batches in a background thread while the GPU trains on the current one."""

    def __init__(self, make_batch, start_step: int, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._make, self._step, self._stop = make_batch, start_step, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            item = self._make(self._step)
            self._step += 1
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self):
        return self._queue.get()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def _lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then a cosine from ``peak`` to 10% of it over the time budget."""
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(args) -> Path:
    from .attention_maps import capture_attention, plot_attention
    from .media import frame_grid, save_gif, save_strip
    from .model import build_testbed, load_testbed
    from .sampler import sample_video

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    overrides = {k: v for k, v in (("num_layers", args.layers), ("num_attention_heads", args.heads),
                                   ("ffn_dim", args.ffn_dim)) if v is not None}
    buckets = parse_buckets(args.buckets)
    video = {"size": args.size, "frames": args.frames, "channels": 3}
    if args.init:
        # Continue training saved weights (the prompt encoder gets this version's slot count).
        testbed = load_testbed("cpu", torch.float32, path=args.init, slots=MAX_SHAPES)
        testbed.video = video
        testbed.transformer.requires_grad_(True)
        testbed.prompt_encoder.requires_grad_(True)
    else:
        testbed = build_testbed(overrides, video)
    testbed.to(device=device)
    modules = torch.nn.ModuleList([testbed.transformer, testbed.prompt_encoder]).train()
    params = [p for p in modules.parameters() if p.requires_grad]
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=device.type == "cuda")
    n_params = sum(p.numel() for p in params)
    log_file = (out / "train_log.txt").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"device={device} params={n_params / 1e6:.2f}M config={dict(testbed.transformer.config)}")
    log(f"args={vars(args)}")
    for frames, size, batch in buckets:
        log(f"bucket: {batch} x {frames} frames of {size}px = {batch * testbed.tokens_per_video(frames, size)} tokens "
            f"({testbed.tokens_per_video(frames, size)} per video)")

    def make_batch(step: int):
        frames, size, batch = buckets[step % len(buckets)]
        video, prompts = generate_videos(batch, frames, size, seed=args.seed * 1_000_003 + step, device=device)
        drop = torch.rand(batch, generator=torch.Generator().manual_seed(step)) < args.cfg_dropout
        return video, torch.where(drop[:, None], 0, prompts)

    prefetch = _Prefetcher(make_batch, 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget = args.minutes * 60.0
    start = last_save = time.perf_counter()
    step, losses, history = 0, [], []
    try:
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= budget or (args.max_steps and step >= args.max_steps):
                break
            x0, prompts = prefetch.next()
            b = x0.shape[0]
            t = torch.sigmoid(torch.randn(b, device=device) * args.t_std + args.t_mean)
            noise = torch.randn_like(x0)
            tb = t.view(b, 1, 1, 1, 1)
            xt = (1 - tb) * x0 + tb * noise
            with autocast:
                pred = testbed.transformer(xt, 1000.0 * t, testbed.prompt_encoder(prompts.to(device)),
                                           return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = _lr_at(step, elapsed / budget, args.lr, args.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
            losses.append(loss.detach())
            step += 1
            if step % args.log_every == 0:
                mean = torch.stack(losses).mean().item()
                history.append((step, elapsed, mean))
                losses = []
                log(f"step {step:6d}  {elapsed:7.1f}s  loss {mean:.4f}  grad {float(grad_norm):.3f}  lr {lr:.2e}")
            if time.perf_counter() - last_save > args.save_every * 60:
                _save(ema, testbed, out, step, history)
                last_save = time.perf_counter()
    finally:
        prefetch.close()
    log(f"trained {step} steps in {time.perf_counter() - start:.1f}s")
    final = _save(ema, testbed, out, step, history)
    log(f"saved EMA weights to {final}")

    # Evaluate the EMA weights: samples at the largest and the smallest bucket size, attention map, loss curve.
    testbed.transformer.load_state_dict(ema[0].state_dict())
    testbed.prompt_encoder.load_state_dict(ema[1].state_dict())
    testbed.transformer.eval()
    prompts = random_prompts(args.samples, torch.Generator().manual_seed(1234))
    for i in range(args.samples):
        log(f"sample {i}: {describe_prompt(prompts[i])}")
    largest = max(buckets, key=lambda b: testbed.tokens_per_video(b[0], b[1]))
    smallest = min(buckets, key=lambda b: testbed.tokens_per_video(b[0], b[1]))
    for tag, (frames, size, _) in (("", largest), ("_small", smallest)):
        with torch.no_grad(), autocast:
            fake = sample_video(testbed, prompts, frames=frames, size=size, steps=args.sample_steps,
                                guidance=args.guidance, seed=args.seed, show_progress=False)
        real, _ = generate_videos(args.samples, frames, size, seed=4321, device=device, prompts=prompts)
        scale = max(1, 128 // size)
        save_gif(frame_grid(list(fake) + list(real), columns=args.samples, scale=scale), out / f"samples{tag}.gif")
        save_strip(frame_grid(list(fake[: min(4, args.samples)]) + list(real[: min(4, args.samples)]), columns=1,
                              scale=scale), out / f"samples{tag}.png", every=max(1, frames // 8))
        if tag == "":
            with torch.no_grad(), autocast:
                stats = capture_attention(testbed, real[:1], prompts[:1], layer=len(testbed.transformer.blocks) // 2)
            plot_attention(stats, out / "attention.png")
    _plot_loss(history, out / "loss.png")
    log("wrote samples.gif, samples.png, samples_small.gif, samples_small.png, attention.png, loss.png")
    log_file.close()
    return final


def _save(ema, testbed, out: Path, step: int, history) -> Path:
    from .model import Testbed, save_testbed

    snapshot = Testbed(ema[0], ema[1], testbed.video)
    last = round(history[-1][2], 5) if history else None
    steps = testbed.info.get("steps", 0) + step  # counts the steps of a run continued with --init
    return save_testbed(snapshot, out / "weights", info={"steps": steps, "final_loss": last})


def _plot_loss(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps, _, values = zip(*history)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m liteattn.testbed.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--minutes", type=float, required=True, help="training time budget")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--buckets", default=DEFAULT_BUCKETS,
                   help="comma-separated FRAMESxSIZExBATCH training sizes, one per step in turn "
                        f"(default: {DEFAULT_BUCKETS})")
    p.add_argument("--frames", type=int, default=32, help="default frames of the saved model's generations")
    p.add_argument("--size", type=int, default=64, help="default frame size of the saved model's generations")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--t-mean", type=float, default=0.0, help="logit-normal mean of t")
    p.add_argument("--t-std", type=float, default=1.0, help="logit-normal std of t")
    p.add_argument("--init", default=None, help="folder of saved weights to continue training from")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (quick checks)")
    p.add_argument("--heads", type=int, default=None, help="override num_attention_heads")
    p.add_argument("--ffn-dim", type=int, default=None, help="override ffn_dim")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=float, default=2.0, help="minutes between weight snapshots")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    return p


def parse_buckets(text: str) -> list[tuple[int, int, int]]:
    """``"32x64x4,8x32x64"`` -> ``[(32, 64, 4), (8, 32, 64)]`` (frames, size, batch)."""
    buckets = []
    for item in str(text).split(","):
        try:
            frames, size, batch = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--buckets: expected FRAMESxSIZExBATCH items like '32x64x4', got {item!r}") from None
        if frames < 1 or batch < 1 or size < 8 or size % 2:
            raise ValueError(f"--buckets: {item!r} needs frames >= 1, batch >= 1 and an even size >= 8")
        buckets.append((frames, size, batch))
    return buckets


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.minutes <= 0:
        raise ValueError(f"--minutes: expected a positive number, got {args.minutes}")
    if args.size % 2 or args.size < 8:
        raise ValueError(f"--size: expected an even number of pixels >= 8, got {args.size}")
    if args.frames < 1:
        raise ValueError(f"--frames: expected >= 1, got {args.frames}")
    parse_buckets(args.buckets)
    train(args)


if __name__ == "__main__":
    main()
