"""Run the LiteAttention node in a real ComfyUI, headless, against liteattn's testbed.

    python tools/comfyui_check.py --comfyui PATH/TO/ComfyUI [--json report.json] [--device cuda] ...

ComfyUI is imported at run time from the source folder given with --comfyui
(ComfyUI is GPL-3.0; none of it is part of this repository). Its Python
requirements must be installed in the running environment, with liteattn and
diffusers (the testbed is a diffusers model). On a CPU-only torch, where no
matching torchvision wheel exists, an empty ``torchvision`` module is put in
``sys.modules`` first: ComfyUI imports ``torchvision.transforms`` at import time
for a model (Cosmos) this check never builds.

The node is loaded the way ComfyUI loads any custom node (``nodes.load_custom_node``
on this repository's ``comfyui_liteattn`` folder, which also parses its
``pyproject.toml``), and every run applies it through its node class.

The testbed (liteattn/testbed: a diffusers ``WanTransformer3DModel`` in pixel
space, with a prompt encoder) is loaded as a ComfyUI Wan 2.1 model: an explicit
unet config (ComfyUI's detection assumes head_dim 128), diffusers' state-dict
names renamed to ComfyUI's, and a latent format with the testbed's channels and
no scaling. Geometry, prompt slots and channels are read from the loaded
testbed; the video size is an argument (default: small enough for a CPU).

Checks, printed and written to --json; the exit status is 1 when one fails (3 when
ComfyUI cannot be imported):

1. loading: ComfyUI's own sampling against the testbed's diffusers sampler,
   same noise and sigmas (Euler, CFG): max |difference| (shows the port is faithful).
2. dense: the node at its never-skip threshold is ComfyUI's own attention, bit
   for bit; at the next threshold up, which marks nothing here, liteattn
   computes every tile and agrees with ComfyUI's attention.
3. sparsity: the node's skipped fraction per (block, CFG branch, step) against
   ``liteattn.apply`` on the diffusers testbed with the same seed and settings
   (``--qk-dtype int8``: both with 8-bit scores; checks 4 and 5 reuse this model).
4. repeat: a second generation with the same patched model: identical video and sparsity.
5. split CFG: ComfyUI made to run cond and uncond as separate calls: same sparsity (and video within the
   tolerance; with 8-bit scores within the sparse run's distance from dense, since a one-ulp input difference can
   move a rounding step).
6. experts: two patched models as Wan 2.2's high- and low-noise experts behind
   two KSamplerAdvanced nodes: each counts steps from 0, the second starts
   from a fresh skip state, and at a threshold that marks nothing the pair
   equals one stock KSampler.
7. node glue: the input MODEL untouched; another attention override and
   another block patch set before the node still run; a second node replaces
   the first one's settings; a non-Wan model, a missing or malformed profile file and a valid
   calibration profile are refused (the last because it binds to diffusers layer names).

Wall time of each sampling run is recorded. On a GPU (--device cuda, bfloat16,
liteattn's Triton kernel) the checks allow for bfloat16 rounding, and a last
step times whole sampling runs without and with the node once everything is
warm; a larger video shows the speed-up (e.g. --frames 32 --size 64 --steps 30:
32,768 tokens, as Wan2.1-1.3B at 480p).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NODE_FOLDER = REPO / "comfyui_liteattn"
# A finite threshold that marks nothing on the testbed: every tile goes through liteattn (the node's minimum,
# NEVER_SKIP, runs the model's own attention instead).
MARKS_NOTHING = -99.0
CANNOT_IMPORT = 3  # the exit status when ComfyUI (or one of its requirements) cannot be imported
DEFAULT_PROMPT = "yellow striped circle, red square, blue triangle"
# The testbed's tuned setting (liteattn demo): its attention is flatter than a large model's.
DEFAULT_THRESHOLD = -1.5
DEFAULT_DENSE_STEPS = 3
# diffusers' Wan names -> ComfyUI's (comfy/ldm/wan/model.py), as substrings of the state-dict keys.
RENAMES = (
    ("attn1.to_q.", "self_attn.q."), ("attn1.to_k.", "self_attn.k."), ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."), ("attn1.norm_", "self_attn.norm_"),
    ("attn2.to_q.", "cross_attn.q."), ("attn2.to_k.", "cross_attn.k."), ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."), ("attn2.norm_", "cross_attn.norm_"),
    ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."), (".norm2.", ".norm3."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."), ("proj_out.", "head.head."),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfyui", required=True, help="a ComfyUI source folder (holding comfy/ and nodes.py)")
    parser.add_argument("--device", default="cpu", help="'cpu' (float32) or 'cuda' (bfloat16); default cpu")
    parser.add_argument("--frames", type=int, default=8, help="video frames (default 8)")
    parser.add_argument("--size", type=int, default=32, help="video height and width in pixels (default 32)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"the node's threshold for the sparse runs (default {DEFAULT_THRESHOLD:g})")
    parser.add_argument("--dense-steps", type=int, default=DEFAULT_DENSE_STEPS,
                        help=f"the node's dense_steps for the sparse runs (default {DEFAULT_DENSE_STEPS})")
    parser.add_argument("--qk-dtype", default="16-bit", choices=["16-bit", "int8"],
                        help="the node's qk_dtype for the sparse runs, and liteattn.apply's (default 16-bit)")
    parser.add_argument("--pv-dtype", default="16-bit", choices=["16-bit", "fp8"],
                        help="the node's pv_dtype for the sparse runs (with --qk-dtype int8), and liteattn.apply's "
                             "(default 16-bit)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"shapes, 'COLOUR [TEXTURE] KIND, ...' "
                                                                 f"(default {DEFAULT_PROMPT!r})")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max |difference| allowed between ComfyUI runs that must agree (default 1e-4 in float32 "
                             "on a CPU; 3e-2 in bfloat16 on a GPU, a first guess not yet measured)")
    parser.add_argument("--json", default=None, help="write the report here")


def check_args(args) -> None:
    comfyui = Path(args.comfyui).expanduser()
    if not (comfyui / "comfy" / "ldm" / "wan" / "model.py").is_file() or not (comfyui / "nodes.py").is_file():
        raise ValueError(f"--comfyui: expected a ComfyUI source folder (with comfy/ldm/wan/model.py and nodes.py), "
                         f"got {args.comfyui}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'cpu' or 'cuda', got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' asked for, but torch sees no CUDA device")
    for name in ("frames", "size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if not 0 <= args.dense_steps < args.steps:
        raise ValueError(f"--dense-steps: expected 0 <= dense steps < --steps ({args.steps}), got {args.dense_steps}")
    if not args.threshold < 0:
        raise ValueError(f"--threshold: expected a negative number (log2 units), got {args.threshold}")
    if not args.steps >= 2:
        raise ValueError(f"--steps: expected at least 2 (the experts check splits them), got {args.steps}")
    if args.tolerance is not None and not args.tolerance > 0:
        raise ValueError(f"--tolerance: expected a positive number, got {args.tolerance}")


# ---------------------------------------------------------------------------- ComfyUI, the testbed as a Wan model
def import_comfyui(path: Path, device: str) -> types.SimpleNamespace:
    """ComfyUI's modules, imported from ``path`` the way its main.py would set them up (``--cpu`` on a CPU)."""
    sys.path.insert(0, str(path.resolve()))
    names = ["comfy.latent_formats", "comfy.model_management", "comfy.model_patcher", "comfy.sample",
             "comfy.samplers", "comfy.supported_models", "comfy.utils", "comfyui_version", "nodes"]
    stubbed = {}
    try:
        import torchvision  # noqa: F401
    except Exception:  # a CPU torch without a matching torchvision: see the module docstring
        # transformers and diffusers note once, on import, whether torchvision exists: before the stub.
        for library in ("transformers", "diffusers"):
            importlib.import_module(library)
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stubbed = {"torchvision": stub, "torchvision.transforms": stub.transforms}
        sys.modules.update(stubbed)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = device == "cpu"
        return types.SimpleNamespace(**{name.replace(".", "_"): importlib.import_module(name) for name in names})
    finally:
        for name in stubbed:  # only ComfyUI's import needed it
            sys.modules.pop(name, None)


def comfy_unet_config(transformer_config) -> dict:
    """ComfyUI's WanModel arguments for a diffusers WanTransformer3DModel config."""
    heads, head_dim = transformer_config["num_attention_heads"], transformer_config["attention_head_dim"]
    return {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": tuple(transformer_config["patch_size"]),
        "in_dim": transformer_config["in_channels"], "out_dim": transformer_config["out_channels"],
        "dim": heads * head_dim, "num_heads": heads, "ffn_dim": transformer_config["ffn_dim"],
        "freq_dim": transformer_config["freq_dim"], "text_dim": transformer_config["text_dim"],
        "num_layers": transformer_config["num_layers"], "window_size": (-1, -1),
        "qk_norm": transformer_config["qk_norm"] is not None, "cross_attn_norm": transformer_config["cross_attn_norm"],
        "eps": transformer_config["eps"],
    }


def comfy_state_dict(state_dict: dict) -> dict:
    """diffusers' Wan state dict under ComfyUI's names."""
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            key = "head.modulation"
        elif key.startswith("blocks.") and key.endswith(".scale_shift_table"):
            key = key[:-len("scale_shift_table")] + "modulation"
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def load_testbed_model(comfy, testbed, dtype: torch.dtype):
    """The testbed transformer as a ComfyUI MODEL (a ModelPatcher around a WAN21 model)."""
    latent_format = type("TestbedLatentFormat", (comfy.comfy_latent_formats.LatentFormat,), {
        "latent_channels": testbed.video["channels"], "latent_dimensions": 3, "scale_factor": 1.0})
    model_config_class = type("TestbedWan", (comfy.comfy_supported_models.WAN21_T2V,), {
        "latent_format": latent_format, "sampling_settings": {"shift": 1.0}})
    model_config = model_config_class(comfy_unet_config(testbed.transformer.config))
    model_config.set_inference_dtype(dtype, None)
    state_dict = comfy_state_dict({k: v.detach().clone() for k, v in testbed.transformer.state_dict().items()})
    model = model_config.get_model(state_dict, "")
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the testbed does not map onto ComfyUI's WanModel: missing {missing}, "
                           f"unexpected {unexpected}")
    device = comfy.comfy_model_management.get_torch_device()
    return comfy.comfy_model_patcher.ModelPatcher(model, load_device=device,
                                                  offload_device=comfy.comfy_model_management.unet_offload_device())


def load_node(comfy):
    """The LiteAttention node class, loaded by ComfyUI's custom-node loader from this repository's folder."""
    if not asyncio.run(comfy.nodes.load_custom_node(str(NODE_FOLDER))):
        raise RuntimeError(f"ComfyUI could not load the custom node folder {NODE_FOLDER} (see its log above)")
    return comfy.nodes.NODE_CLASS_MAPPINGS["LiteAttention"]


def node_metadata() -> dict:
    """What ComfyUI (and its registry tooling) reads from the node folder's pyproject.toml."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_FOLDER))
    return {"name": config.project.name, "version": config.project.version,
            "dependencies": config.project.dependencies, "display_name": config.tool_comfy.display_name}


def prompt_tokens(testbed, text: str) -> torch.Tensor:
    """``(1, slots)`` tokens for ``text``, for as many shape slots as the loaded prompt encoder has."""
    from liteattn.testbed import encode_prompt

    tokens = encode_prompt(text)
    slots = testbed.prompt_encoder.slot.shape[0]
    if bool(tokens[slots:].any()):
        raise ValueError(f"--prompt: expected at most {slots} shapes (the testbed's prompt slots), got {text!r}")
    return torch.nn.functional.pad(tokens[:slots], (0, max(0, slots - tokens.shape[0])))[None]


# ---------------------------------------------------------------------------- runs
class Runner:
    """Sampling runs of ComfyUI models and of the diffusers testbed, with the same noise, sigmas and prompt."""

    def __init__(self, comfy, testbed, args):
        from liteattn.testbed.sampler import timesteps

        self.comfy, self.testbed, self.args = comfy, testbed, args
        self.tokens = prompt_tokens(testbed, args.prompt)
        self.shape = (1, testbed.video["channels"], args.frames, args.size, args.size)
        self.noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(args.seed))  # sample_video's
        self.sigmas = timesteps(args.steps)
        positive, negative = testbed.encode(self.tokens), testbed.encode(testbed.null_prompt(1))
        self.positive = [[positive.cpu().float(), {}]]
        self.negative = [[negative.cpu().float(), {}]]
        self.seconds: dict[str, float] = {}

    def _timed(self, name: str, fn):
        if self.args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.args.device == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] = time.perf_counter() - start
        print(f"  {name}: {self.seconds[name]:.1f} s", flush=True)
        return out

    def comfy_sample(self, name: str, model, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """SamplerCustom's path: Euler over the testbed sampler's sigmas (or ``sigmas``), CFG."""
        comfy = self.comfy
        sampler = comfy.comfy_samplers.sampler_object("euler")
        sigmas = self.sigmas if sigmas is None else sigmas
        return self._timed(name, lambda: comfy.comfy_sample.sample_custom(
            model, self.noise.clone(), self.args.guidance, sampler, sigmas.clone(), self.positive,
            self.negative, torch.zeros(self.shape), disable_pbar=True, seed=self.args.seed).float().clamp(-1, 1))

    def ksampler(self, name: str, model, start: int | None = None, end: int | None = None, latent=None,
                 add_noise: bool = True, leftover_noise: bool = False) -> torch.Tensor:
        """The KSamplerAdvanced node (Euler, simple scheduler)."""
        latent = {"samples": torch.zeros(self.shape)} if latent is None else {"samples": latent}
        node = self.comfy.nodes.KSamplerAdvanced()
        steps = self.args.steps
        return self._timed(name, lambda: node.sample(
            model, "enable" if add_noise else "disable", self.args.seed, steps, self.args.guidance, "euler",
            "simple", self.positive, self.negative, latent, 0 if start is None else start,
            steps if end is None else end, "enable" if leftover_noise else "disable")[0]["samples"].float())

    def diffusers_sample(self, name: str, **apply_kw):
        """The testbed's own sampler; with ``apply_kw``, under ``liteattn.apply``. Returns (video, summary)."""
        import liteattn
        from liteattn.testbed.sampler import sample_video

        handle = liteattn.apply(self.testbed.transformer, **apply_kw) if apply_kw else None
        try:
            video = self._timed(name, lambda: sample_video(
                self.testbed, self.tokens, frames=self.args.frames, size=self.args.size, steps=self.args.steps,
                guidance=self.args.guidance, seed=self.args.seed, show_progress=False))
            return video.cpu().float(), handle.summary() if handle else None
        finally:
            if handle is not None:
                handle.remove()


def check_node_glue(comfy, node, base, runner: Runner) -> dict:
    """What the node leaves on the MODEL: the input untouched, other patches chained, a second node replacing the first."""
    from liteattn.calibration import TESTBED_PROFILE
    from liteattn.integrations.comfyui import BlockIndexPatch, LiteAttentionOverride
    from liteattn.testbed.sampler import timesteps

    calls = {"override": 0, "block0": 0}

    def other_override(func, *args, **kwargs):  # another node's attention patch (e.g. a SageAttention one)
        calls["override"] += 1
        return func(*args, **kwargs)

    def other_block_patch(args, extra):  # another node's replace patch on block 0
        calls["block0"] += 1
        return extra["original_block"](args)

    other = base.clone()
    other.model_options["transformer_options"]["optimized_attention_override"] = other_override
    other.set_model_patch_replace(other_block_patch, "dit", "double_block", 0)
    patched = node.patch(other, -1.5, 0, "")[0]
    twice = node.patch(patched, -2.0, 1, "")[0]
    options = twice.model_options["transformer_options"]
    override = options["optimized_attention_override"]
    block0 = options["patches_replace"]["dit"][("double_block", 0)]
    runner.comfy_sample("comfyui node over other patches", twice, sigmas=timesteps(2))  # a short run
    blocks = len(base.get_model_object("diffusion_model").blocks)
    refusals = {}
    not_wan = base.clone()
    not_wan.add_object_patch("diffusion_model", torch.nn.Linear(1, 1))
    for label, model, profile, error in (("not_wan", not_wan, "", ValueError),
                                         ("missing_profile", base, "no/such/profile.json", ValueError),
                                         ("not_a_profile", base, __file__, ValueError),
                                         ("valid_profile", base, str(TESTBED_PROFILE), NotImplementedError)):
        try:
            node.patch(model, -1.5, 0, profile)
            refusals[label] = "accepted"
        except error as exc:
            refusals[label] = str(exc)
    result = {
        "input_model_untouched": "optimized_attention_override" not in base.model_options["transformer_options"]
                                 and "patches_replace" not in base.model_options["transformer_options"],
        "second_node_replaces_first": isinstance(override, LiteAttentionOverride)
                                      and override.previous is other_override and override.config.threshold == -2.0,
        "block_patch_chained_once": isinstance(block0, BlockIndexPatch) and block0.previous is other_block_patch,
        "other_override_calls": calls["override"], "other_block_patch_calls": calls["block0"],
        "liteattn_calls": len(override.summary().calls), "refusals": refusals,
    }
    # Two steps: the other block patch runs at least once per step, the other override at least for each block's
    # cross-attention at each step, liteattn records every (step, branch, block).
    result["ok"] = (result["input_model_untouched"] and result["second_node_replaces_first"]
                    and result["block_patch_chained_once"] and calls["block0"] >= 2 and calls["override"] >= 2 * blocks
                    and result["liteattn_calls"] == 2 * 2 * blocks and all(v != "accepted" for v in refusals.values()))
    return result


def timing(runner: Runner, stock, patched, rounds: int = 2) -> dict:
    """Wall time of a whole sampling run without and with the node, alternated; the best of ``rounds`` each."""
    seconds = {"stock": [], "node": []}
    for index in range(rounds):
        for label, model in (("stock", stock), ("node", patched)):
            name = f"timing {index}: {label}"
            runner.comfy_sample(name, model)
            seconds[label].append(runner.seconds[name])
    best = {label: min(values) for label, values in seconds.items()}
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    return {"stock_seconds": best["stock"], "node_seconds": best["node"], "speedup": best["stock"] / best["node"],
            "node_sparsity": override.summary().sparsity, "rounds": rounds}


def one_cond_per_call(comfy, args: dict) -> list:
    """A ``sampler_calc_cond_batch_function`` running each conditioning in its own model call, cond first.

    What ComfyUI does when it estimates that cond and uncond do not fit in
    memory together; each call keeps its conditioning's place in the list, so
    ``cond_or_uncond`` still names its branch.
    """
    conds = args["conds"]
    return [comfy.comfy_samplers.calc_cond_batch(args["model"], [c if j == i else None for j, c in enumerate(conds)],
                                                 args["input"], args["sigma"], args["model_options"])[i]
            for i in range(len(conds))]


def per_call_sparsity(summary) -> dict[tuple[int, str, int], float]:
    """``{(block, branch, step): skipped fraction}``; layer names are ``blocks.<i>`` (ComfyUI) or ``blocks.<i>.attn1``."""
    return {(int(c.layer.split(".")[1]), c.context, c.step): c.sparsity for c in summary.calls}


def per_step(summary) -> list[float]:
    return [round(row["sparsity"], 6) for row in summary.per_step().values()]


def compare_sparsity(ours: dict, theirs: dict) -> dict:
    keys = sorted(set(ours) | set(theirs))
    diffs = [abs(ours.get(k, math.nan) - theirs.get(k, math.nan)) for k in keys]
    return {"calls": len(keys), "missing": sum(k not in ours or k not in theirs for k in keys),
            "unequal": sum(not d == 0.0 for d in diffs),
            "max_abs_difference": max((d for d in diffs if not math.isnan(d)), default=0.0)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ---------------------------------------------------------------------------- the checks
def run(args) -> int:
    check_args(args)
    comfyui = Path(args.comfyui).expanduser().resolve()
    try:
        comfy = import_comfyui(comfyui, args.device)
    except ImportError as exc:
        print(f"cannot import ComfyUI from {comfyui}: {exc} (install its requirements in this Python; see the "
              "module docstring)", file=sys.stderr)
        return CANNOT_IMPORT
    from liteattn.integrations.comfyui import NEVER_SKIP, pv_dtype_from_input, qk_dtype_from_input
    from liteattn.testbed import load_testbed

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.tolerance is None:
        args.tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.manual_seed(args.seed)
    testbed = load_testbed(args.device, dtype)
    node = load_node(comfy)()
    runner = Runner(comfy, testbed, args)
    base = load_testbed_model(comfy, testbed, dtype)
    report = {
        "comfyui": {"version": comfy.comfyui_version.__version__, "commit": _git_commit(comfyui)},
        "node_metadata": node_metadata(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("comfyui", "json")},
        "testbed": {"tokens": testbed.tokens_per_video(args.frames, args.size), "prompt_slots": runner.tokens.shape[1],
                    "layers": testbed.transformer.config.num_layers, "info": testbed.info},
        "torch": torch.__version__, "checks": {},
    }
    checks = report["checks"]
    print(f"ComfyUI {report['comfyui']['version']} ({report['comfyui']['commit']}), device {args.device}, "
          f"{report['testbed']['tokens']} tokens, {args.steps} steps", flush=True)

    def patch(model, threshold, dense_steps, qk_dtype="16-bit", pv_dtype="16-bit"):
        return node.patch(model, threshold, dense_steps, "", qk_dtype, pv_dtype)[0]

    # 1. loading: ComfyUI's own Wan against the diffusers testbed.
    stock = runner.comfy_sample("comfyui stock", base)
    reference, _ = runner.diffusers_sample("diffusers dense")
    checks["loading"] = {"max_abs_difference_vs_diffusers": max_diff(stock, reference)}
    # Two implementations of the same model: ~1e-5 apart in float32, further in bfloat16 (a sanity bound there).
    checks["loading"]["ok"] = checks["loading"]["max_abs_difference_vs_diffusers"] < (
        1e-3 if dtype == torch.float32 else 0.25)

    # 2. dense: the never-skip threshold is ComfyUI's own attention, bit for bit; the next one up (2**-99 of a
    # row's max, which marks nothing here) walks every tile through liteattn and must agree with it.
    never_out = runner.comfy_sample("comfyui node never-skip", patch(base, NEVER_SKIP, 0))
    nothing = patch(base, MARKS_NOTHING, 0)
    dense_out = runner.comfy_sample(f"comfyui node at {MARKS_NOTHING:g}", nothing)
    nothing_summary = nothing.model_options["transformer_options"]["optimized_attention_override"].summary()
    checks["dense"] = {"never_skip_identical_to_comfyui": bool(torch.equal(never_out, stock)),
                       "threshold": MARKS_NOTHING, "max_abs_difference_vs_comfyui": max_diff(dense_out, stock),
                       "liteattn_calls": sum(c.mode == "sparse" for c in nothing_summary.calls),
                       "sparsity": nothing_summary.sparsity, "fallbacks": dict(nothing_summary.fallbacks)}
    checks["dense"]["ok"] = (checks["dense"]["never_skip_identical_to_comfyui"]
                             and checks["dense"]["max_abs_difference_vs_comfyui"] <= args.tolerance
                             and checks["dense"]["liteattn_calls"] > 0 and checks["dense"]["sparsity"] == 0
                             and not checks["dense"]["fallbacks"])

    # 3. sparsity: the node against liteattn.apply, same seed and settings.
    sparse = patch(base, args.threshold, args.dense_steps, args.qk_dtype, args.pv_dtype)
    override = sparse.model_options["transformer_options"]["optimized_attention_override"]
    first = runner.comfy_sample("comfyui node sparse", sparse)
    first_summary = override.summary()
    applied, applied_summary = runner.diffusers_sample("diffusers liteattn.apply", threshold=args.threshold,
                                                       dense_steps=args.dense_steps,
                                                       qk_dtype=qk_dtype_from_input(args.qk_dtype),
                                                       pv_dtype=pv_dtype_from_input(args.pv_dtype))
    checks["sparsity"] = dict(compare_sparsity(per_call_sparsity(first_summary), per_call_sparsity(applied_summary)),
                              per_step_node=per_step(first_summary), per_step_apply=per_step(applied_summary),
                              node_sparsity=first_summary.sparsity, apply_sparsity=applied_summary.sparsity,
                              max_abs_difference_video=max_diff(first, applied),
                              max_abs_difference_vs_dense=max_diff(first, stock),
                              fallbacks=dict(first_summary.fallbacks))
    # In float32 the two implementations' attention inputs differ by ~1e-6, and no tile decision flips; in bfloat16
    # their rounding differs enough to flip a few, so there the per-step fractions must agree within 2 %.
    step_gap = max(abs(a - b) for a, b in zip(checks["sparsity"]["per_step_node"], checks["sparsity"]["per_step_apply"]))
    checks["sparsity"]["max_per_step_difference"] = step_gap
    checks["sparsity"]["ok"] = ((checks["sparsity"]["unequal"] == 0 if dtype == torch.float32 else step_gap <= 0.02)
                                and checks["sparsity"]["missing"] == 0
                                and first_summary.sparsity > 0 and not first_summary.fallbacks)

    # 4. repeat: a second generation with the same patched model.
    second = runner.comfy_sample("comfyui node sparse again", sparse)
    second_summary = override.summary()
    checks["repeat"] = {"identical_video": bool(torch.equal(first, second)),
                        "identical_sparsity": per_call_sparsity(first_summary) == per_call_sparsity(second_summary),
                        "generations": override.generations.generation}
    checks["repeat"]["ok"] = checks["repeat"]["identical_video"] and checks["repeat"]["identical_sparsity"]

    # 5. split CFG: ComfyUI batches cond and uncond only when it thinks memory allows; here it may not.
    split_model = sparse.clone()  # shares the override, as every clone of a patched model does
    split_model.set_model_sampler_calc_cond_batch_function(functools.partial(one_cond_per_call, comfy))
    split = runner.comfy_sample("comfyui node sparse, split CFG", split_model)
    split_summary = override.summary()
    # With 8-bit scores an input one ulp apart (batched and split matmuls round differently) can move a rounding
    # step, so the two runs may differ by as much as 8-bit rounding moves the video, but no more; decisions equal.
    # fp8 P.V rounds every weight of P, more than int8 scores move them: there each run may be as far from the
    # other's trajectory as from the dense one, twice the batched run's distance to it (through the dense video).
    split_bound = args.tolerance
    if args.qk_dtype != "16-bit":
        spread = 2 if args.pv_dtype != "16-bit" else 1
        split_bound = max(args.tolerance, spread * checks["sparsity"]["max_abs_difference_vs_dense"])
    checks["split_cfg"] = dict(compare_sparsity(per_call_sparsity(split_summary), per_call_sparsity(first_summary)),
                               max_abs_difference_vs_batched=max_diff(split, first), bound=split_bound)
    checks["split_cfg"]["ok"] = (checks["split_cfg"]["unequal"] == 0 and checks["split_cfg"]["missing"] == 0
                                 and checks["split_cfg"]["max_abs_difference_vs_batched"] <= split_bound)

    # 6. Wan 2.2's two experts behind two KSamplerAdvanced nodes (same weights here; what matters is the split).
    half = args.steps // 2
    experts = {}
    for label, threshold, dense_steps in (("marks-nothing", MARKS_NOTHING, 0), ("sparse", args.threshold, 0)):
        high, low = patch(base, threshold, dense_steps), patch(load_testbed_model(comfy, testbed, dtype),
                                                               threshold, dense_steps)
        latent = runner.ksampler(f"expert high ({label})", high, end=half, leftover_noise=True)
        video = runner.ksampler(f"expert low ({label})", low, start=half, latent=latent, add_noise=False)
        summaries = [m.model_options["transformer_options"]["optimized_attention_override"].summary()
                     for m in (high, low)]
        experts[label] = (video, summaries)
    full = runner.ksampler("ksampler stock", base)
    high_summary, low_summary = experts["sparse"][1]
    checks["experts"] = {
        "steps_high": sorted({c.step for c in high_summary.calls}),
        "steps_low": sorted({c.step for c in low_summary.calls}),
        "per_step_high": per_step(high_summary), "per_step_low": per_step(low_summary),
        "marks_nothing_max_abs_difference_vs_one_ksampler": max_diff(experts["marks-nothing"][0], full),
    }
    checks["experts"]["ok"] = (checks["experts"]["steps_high"] == list(range(half))
                               and checks["experts"]["steps_low"] == list(range(args.steps - half))
                               and checks["experts"]["per_step_low"][0] == 0.0
                               and checks["experts"]["marks_nothing_max_abs_difference_vs_one_ksampler"]
                               <= args.tolerance)

    # 7. the node on ComfyUI's ModelPatcher: chains, replaces itself, refuses what it cannot patch.
    checks["node_glue"] = check_node_glue(comfy, node, base, runner)

    if args.device == "cuda":  # speed, once everything is compiled and warm
        report["timing"] = timing(runner, base, sparse)
    report["seconds"] = runner.seconds
    report["ok"] = all(check["ok"] for check in checks.values())
    print(json.dumps(checks, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("all checks passed" if report["ok"] else
          "FAILED: " + ", ".join(name for name, check in checks.items() if not check["ok"]))
    return 0 if report["ok"] else 1


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        if str(exc).startswith("--"):
            parser.error(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
