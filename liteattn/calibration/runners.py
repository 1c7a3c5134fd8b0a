"""How a calibration generates outputs: the testbed, a diffusers pipeline, or any callable.

Why an interface this small: a calibration needs only to run its inputs
through the model, dense and with a candidate setting, and to get the final
outputs back as tensors to compare. The patching is the same for every model
(:func:`liteattn.apply` on :attr:`Runner.target`); what differs is how an input
becomes an output: a testbed prompt and noise seed through liteattn's Euler
sampler, or a diffusers pipeline call with a seeded generator.

A runner must be deterministic: the same inputs give the same outputs, so
that a setting's quality is a property of the setting (and a resumed
calibration finds what an interrupted one measured).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Callable, Sequence

import torch

__all__ = ["CallableRunner", "PipelineRunner", "Runner", "TestbedRunner", "as_runner"]


class Runner:
    """The interface: ``target`` (what :func:`liteattn.apply` patches), ``batch_size`` (inputs per
    :meth:`generate` call: the patch's summary covers one generation), :meth:`generate` and :meth:`describe`."""

    target: object = None
    batch_size: int = 1
    value_range: tuple[float, float] | None = None  # the outputs' range, for PSNR/SSIM (None: the dense output's)

    def generate(self, inputs: Sequence, show_progress: bool = False, desc: str = "") -> torch.Tensor:
        """The final outputs of ``inputs`` (at most ``batch_size``), float32 on the CPU, one row per input."""
        raise NotImplementedError

    def describe(self, inputs: Sequence) -> list:
        """The inputs in JSON-ready form (what a profile records and a resumed calibration compares)."""
        return [repr(x) for x in inputs]

    def fingerprint(self) -> dict:
        """What besides the inputs and the model's weights decides the outputs (sizes, steps, guidance, how many
        inputs run at once), JSON-ready."""
        return {"runner": type(self).__name__}

    def score(self, outputs: torch.Tensor, inputs: Sequence) -> list[dict] | None:
        """Per-output quality scores judged on their own (the testbed's evaluator), or None."""
        return None


class TestbedRunner(Runner):
    """liteattn's testbed: inputs are ``(prompt tokens, noise seed)`` pairs; outputs are videos ``(3, F, H, W)``.

    Args:
        testbed: a :class:`liteattn.testbed.Testbed`.
        frames, size, steps, guidance: the video and sampler settings (the CPU size: 8 frames of 32 px, 20 steps).
        batch_size: videos generated at once.
    """

    value_range = (-1.0, 1.0)

    def __init__(self, testbed, frames: int = 8, size: int = 32, steps: int = 20, guidance: float = 4.0,
                 batch_size: int = 8) -> None:
        for name, value in (("frames", frames), ("size", size), ("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.testbed, self.target = testbed, testbed.transformer
        self.frames, self.size, self.steps, self.guidance, self.batch_size = frames, size, steps, guidance, batch_size

    @property
    def tokens(self) -> int:
        return self.testbed.tokens_per_video(self.frames, self.size)

    def generate(self, inputs, show_progress=False, desc="") -> torch.Tensor:
        from ..testbed.sampler import sample_video

        prompts = torch.stack([torch.as_tensor(p) for p, _ in inputs])
        return sample_video(self.testbed, prompts, frames=self.frames, size=self.size, steps=self.steps,
                            guidance=self.guidance, seed=[int(s) for _, s in inputs], show_progress=show_progress,
                            desc=desc or "sampling").cpu()

    def describe(self, inputs) -> list:
        from ..testbed.data import describe_prompt

        return [{"prompt": describe_prompt(p), "seed": int(s)} for p, s in inputs]

    def fingerprint(self) -> dict:
        return {"runner": "testbed", "frames": self.frames, "size": self.size, "steps": self.steps,
                "guidance": self.guidance, "batch_size": self.batch_size, "dtype": str(self.testbed.dtype).replace("torch.", ""),
                "weights": {k: v for k, v in self.testbed.info.items() if isinstance(v, (int, float, str))}}

    def score(self, outputs, inputs) -> list[dict]:
        from ..testbed.evaluator import score_video

        return [{k: v for k, v in score_video(video, prompt).as_dict().items() if k != "details"}
                for video, (prompt, _) in zip(outputs, inputs)]


class PipelineRunner(Runner):
    """A diffusers pipeline: each input is a dict of call arguments with a ``"seed"`` (the generator's).

    Calls ``pipe(**arguments, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")`` and
    takes ``.frames`` (video pipelines) or ``.images``. One input per call: pipelines batch prompts their own way.
    """

    batch_size = 1
    value_range = (0.0, 1.0)  # diffusers' "pt" outputs

    def __init__(self, pipe) -> None:
        if not callable(pipe) or getattr(pipe, "transformer", None) is None:
            raise ValueError(f"pipe_or_transformer: expected a diffusers pipeline with a .transformer, got "
                             f"{type(pipe).__name__}")
        self.pipe, self.target = pipe, pipe

    def generate(self, inputs, show_progress=False, desc="") -> torch.Tensor:
        outputs = []
        for item in inputs:
            if not isinstance(item, dict) or "seed" not in item:
                raise ValueError(f"inputs: expected dicts of pipeline arguments with a 'seed', got {item!r}")
            kwargs = {k: v for k, v in item.items() if k != "seed"}
            if hasattr(self.pipe, "set_progress_bar_config"):
                self.pipe.set_progress_bar_config(disable=not show_progress, desc=desc or None)
            result = self.pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(int(item["seed"])),
                               output_type="pt")
            out = getattr(result, "frames", None)
            out = getattr(result, "images", None) if out is None else out
            if out is None:
                raise ValueError(f"pipe_or_transformer: {type(self.pipe).__name__} returned neither .frames nor "
                                 ".images; pass run= to calibrate")
            outputs.append(torch.as_tensor(out).float().cpu()[0])
        return torch.stack(outputs)

    def describe(self, inputs) -> list:
        return [{k: (v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)) for k, v in item.items()}
                for item in inputs]

    def fingerprint(self) -> dict:
        return {"runner": "pipeline", "pipeline": type(self.pipe).__name__,
                "name_or_path": str(getattr(self.pipe, "name_or_path", None) or "")}


class CallableRunner(Runner):
    """Any model: ``run(inputs) -> tensor`` (one output row per input) generates; ``target`` is patched."""

    def __init__(self, target, run: Callable, batch_size: int = 1) -> None:
        if not callable(run):
            raise ValueError(f"run: expected a callable run(inputs) -> outputs, got {type(run).__name__}")
        self.target, self.run, self.batch_size = target, run, batch_size

    def generate(self, inputs, show_progress=False, desc="") -> torch.Tensor:
        out = self.run(list(inputs))
        if not isinstance(out, torch.Tensor) or out.shape[0] != len(inputs):
            raise ValueError(f"run: expected a tensor with one row per input ({len(inputs)}), got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out.detach().float().cpu()

    def fingerprint(self) -> dict:
        return {"runner": "callable", "run": getattr(self.run, "__qualname__", type(self.run).__name__),
                "code": code_digest(self.run)}


def code_digest(fn) -> str:
    """A digest of what ``fn`` does: its code (bytecode, constants, names; nested functions' too), its argument
    defaults and the values its closure captured; for a ``functools.partial``, its function's and its bound
    arguments; for a callable object, its ``__call__``'s. Why not the name: two lambdas share one, so a journal
    made with one would be resumed with the other; the same function defined again in a new process has the same
    digest. Values other than numbers, strings, None and containers of them count by type only."""
    if isinstance(fn, functools.partial):
        parts = [code_digest(fn.func), _value_text(fn.args), _value_text(fn.keywords)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        call = getattr(type(fn), "__call__", None)
        code = getattr(call, "__code__", None)
        if code is None:
            return type(fn).__qualname__
    parts = [_code_text(code), _value_text(getattr(fn, "__defaults__", None)),
             _value_text(getattr(fn, "__kwdefaults__", None))]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            parts.append(_value_text(cell.cell_contents))
        except ValueError:  # an empty cell
            parts.append("")
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _value_text(value) -> str:
    """A text of ``value`` that is the same in every process: sets sorted (their order follows the string hash
    seed), objects other than plain values by type."""
    if isinstance(value, (int, float, str, bool, bytes, type(None))):
        return repr(value)
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(_value_text(v) for v in value)) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_value_text(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(sorted(f"{_value_text(k)}:{_value_text(v)}" for k, v in value.items())) + "}"
    return type(value).__name__


def _code_text(code) -> str:
    consts = [_code_text(c) if hasattr(c, "co_code") else _value_text(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{consts}|{code.co_names}"


def as_runner(obj, run: Callable | None = None) -> Runner:
    """The runner for ``obj``: a :class:`Runner` as is, a testbed, a pipeline, or a module with ``run``."""
    if isinstance(obj, Runner):
        return obj
    if run is not None:
        return CallableRunner(obj, run)
    from ..testbed.model import Testbed

    if isinstance(obj, Testbed):
        return TestbedRunner(obj)
    if callable(obj) and getattr(obj, "transformer", None) is not None and not isinstance(obj, torch.nn.Module):
        return PipelineRunner(obj)
    raise ValueError(f"pipe_or_transformer: expected a diffusers pipeline, a liteattn testbed or a "
                     f"liteattn.calibration Runner; a bare {type(obj).__name__} needs run=callable(inputs) -> outputs")
