"""What ``liteattn demo``, ``eval`` and ``calibrate`` share: the testbed's sizes, option checks, and the set-up of a run.

Why one module: the three commands take the same device, size and output options and
must refuse a bad one the same way, before any work (``check_args``), with a
``ValueError`` that names the option.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

__all__ = ["SHIPPED_PROFILE", "SIZES", "TestbedRun", "add_run_arguments", "check_out", "check_positive",
           "check_size_options", "parse_device", "prepare", "profile_covers", "profile_option"]

# ``--profile shipped``: the testbed's calibration profile that comes with liteattn (the CPU size).
SHIPPED_PROFILE = "shipped"

# Per size: frames, frame size in pixels and denoising steps. small: a CPU's ~1 minute; large: the GPU default.
SIZES = {"small": {"frames": 8, "pixels": 32, "steps": 20}, "large": {"frames": 32, "pixels": 64, "steps": 30}}


def add_run_arguments(parser) -> None:
    """The options every testbed command takes: ``--device``, ``--size``, ``--steps``, ``--frames``, ``--pixels``."""
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ... (default: cuda if available)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="small: 8 frames of 32px, 20 steps; large: 32 frames of 64px, 30 steps (default: small "
                             "on a CPU, large on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: per size)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default: per size)")
    parser.add_argument("--pixels", type=int, default=None, help="frame height and width, even (default: per size)")


def parse_device(text: str):
    """``--device``: 'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {text!r} asked for, but no CUDA device is available; use --device cpu")
    return device


def check_out(path: str, option: str = "--out") -> Path:
    """The output folder, refused up front when it cannot be a folder (a file is in the way)."""
    out = Path(path)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option}: expected a folder to write into, but {str(parent)!r} is a file")
            break
    return out


def add_precision_arguments(parser, subject: str) -> None:
    """``--qk-dtype`` and ``--pv-dtype``: the 8-bit modes of ``subject`` (what runs through liteattn)."""
    parser.add_argument("--qk-dtype", choices=["int8"], default=None,
                        help=f"{subject} computes Q.K^T from 8-bit q and k (default: as they are)")
    parser.add_argument("--pv-dtype", choices=["fp8"], default=None,
                        help=f"with --qk-dtype int8: {subject} computes P.V from P and V in fp8 (a Hopper GPU or "
                             "the CPU; default: 16 bits)")


def check_pv_dtype(args) -> None:
    """fp8 P.V comes with 8-bit Q.K^T (:func:`liteattn.lite_attention`)."""
    if args.pv_dtype is not None and args.qk_dtype is None:
        raise ValueError(f"--pv-dtype: fp8 P.V comes with 8-bit Q.K^T; expected --qk-dtype int8 with --pv-dtype "
                         f"{args.pv_dtype}")


def check_positive(name: str, value: int | None, low: int = 1) -> None:
    """An int option (None: not given) must be at least ``low``."""
    if value is not None and value < low:
        raise ValueError(f"{name}: expected at least {low}, got {value}")


def profile_option(text: str):
    """``--profile``'s calibration profile: a file, or :data:`SHIPPED_PROFILE` for the testbed's (``ValueError``
    naming the option for a missing or malformed one)."""
    from .calibration import TESTBED_PROFILE
    from .profile import Profile

    if text == SHIPPED_PROFILE and not TESTBED_PROFILE.is_file():
        raise ValueError(f"--profile: {SHIPPED_PROFILE!r}: this installation has no shipped testbed profile")
    with _as_profile_option():
        return Profile.load(TESTBED_PROFILE if text == SHIPPED_PROFILE else text)


def profile_covers(profile, tokens: int) -> None:
    """Refuse, before any generation, a ``--profile`` whose token rule does not cover a run of ``tokens`` tokens."""
    with _as_profile_option():
        profile.adjusted(-1.0, tokens)


@contextlib.contextmanager
def _as_profile_option():
    """A profile's ``ValueError`` (``profile: ...``) as the option's (``--profile: ...``)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"--profile: {str(err).removeprefix('profile: ')}") from None


def check_size_options(args) -> None:
    """``--device``, ``--steps``, ``--frames``, ``--pixels`` and ``--out`` as the testbed commands take them."""
    parse_device(args.device)
    check_positive("--steps", args.steps)
    check_positive("--frames", args.frames)
    check_positive("--pixels", args.pixels, 8)
    if args.pixels is not None and args.pixels % 2:
        raise ValueError(f"--pixels: expected an even number (2x2-pixel patches), got {args.pixels}")
    check_out(args.out)


class TestbedRun:
    """A checked command's device, size, output folder and loaded testbed (bf16 on a GPU, float32 on a CPU)."""

    def __init__(self, args) -> None:
        import torch

        from .testbed import load_testbed

        self.device = parse_device(args.device)
        self.size = args.size or ("large" if self.device.type == "cuda" else "small")
        preset = SIZES[self.size]
        self.frames = preset["frames"] if args.frames is None else args.frames
        self.pixels = preset["pixels"] if args.pixels is None else args.pixels
        self.steps = preset["steps"] if args.steps is None else args.steps
        self.out = check_out(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.testbed = load_testbed(self.device, self.dtype)


def prepare(args, command: str) -> TestbedRun | str:
    """The run's set-up, or the message to print when diffusers is missing (checked first: it takes seconds)."""
    try:
        importlib.import_module("liteattn.integrations.diffusers")
    except ImportError as err:
        return f"liteattn {command} needs diffusers >= 0.42 (pip install 'liteattn[diffusers]'): {err}"
    return TestbedRun(args)
