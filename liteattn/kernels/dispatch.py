"""Which kernel runs a call, and with which settings: the one place that decides.

A call's kernel specialization is a :class:`KernelSpec`, an immutable value resolved once per (device, dtype,
head_dim, tiles, walk, skip rule, QK precision) by :func:`resolve`:

- **sm90** (:mod:`.sm90`): the warp-specialized persistent Gluon kernel, on an NVIDIA sm90 GPU (H100, H200) for
  fp16/bf16 at head_dim 64 or 128 with the skip state's tiles 128 query rows by 64 or 128 keys, when the installed
  Triton is one it is tested with (:data:`._gluon.TESTED`). Its settings are the measured ones of the rules below.
- **triton** (:mod:`.portable`): the portable Triton kernel, everywhere else (other GPUs, other head_dims and tiles,
  the CPU interpreter, 8-bit Q.K^T), with TMA tile copies from sm90 on; and on Hopper where the Gluon kernel cannot be used (an
  untested Triton, one warning; a Gluon build that fails, one warning, then every later call).

:func:`lite_attention_fwd` launches a :class:`~.common.KernelCall` with its resolved spec, or with a spec passed
explicitly (development scripts and tests compare kernel variants that way: ``dataclasses.replace(spec, ...)``;
nothing in the package changes a call's kernel behind its back). Per call only what depends on the call's own
sizes is decided: whether a head's query tiles are claimed longest list first (:func:`longest_first`) and whether
the last key tile is ragged.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton

from . import portable
from .common import (FULL_WALK, WALKS, KernelCall, device_capability, interpreting, l2_bytes, launch_order, prepare,
                     tma_ready)
from .quant import QK8, quantize_qk, quantize_v

__all__ = ["BACKENDS", "WORK_ORDERS", "KernelSpec", "lite_attention_fwd", "longest_first", "portable_spec", "resolve",
           "sm90_module", "sm90_stages", "spec_for", "target_of"]

BACKENDS = ("triton", "sm90")
# How a kernel orders a head's query tiles: in index order; longest list first (a stable argsort of the counts per
# call); or longest first only where one head's K and V take more than half the L2 (the sm90 kernel's rule below).
INDEX_ORDER = "index"
LONGEST_FIRST = "longest-first"
LONGEST_FIRST_PAST_HALF_L2 = "longest-first-past-half-l2"
WORK_ORDERS = (INDEX_ORDER, LONGEST_FIRST, LONGEST_FIRST_PAST_HALF_L2)

# Fields only the sm90 kernel reads, and the values a "triton" spec must leave them at.
_SM90_ONLY = MappingProxyType({"stages": None, "regs": None, "max_regs": None, "pingpong": False, "tree_max": False,
                               "lane_sums": False, "max_programs": None})


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialization: everything but the call's tensors and sizes that decides the code that runs.

    Args:
        backend: ``"sm90"`` (:mod:`.sm90`) or ``"triton"`` (:mod:`.portable`).
        block_m, block_n: the skip state's query and key tile sizes (the kernels never choose them: they are the
            state's granularity, :func:`liteattn.kernels.default_block_sizes`).
        walk: ``"list"`` (read each query tile's active list) or ``"full"`` (every key tile by position, no list
            read; only for full ascending lists, and never writing a next state): :data:`.common.FULL_WALK`.
        work_order: :data:`INDEX_ORDER`, :data:`LONGEST_FIRST` or :data:`LONGEST_FIRST_PAST_HALF_L2`.
        tma: K/V tiles copied by TMA (the Triton kernel's device-side descriptors; the sm90 kernel always does).
        upcast: fp32 dot operands, for bf16 in Triton's CPU interpreter (whose bf16 dots are wrong).
        stages: sm90: the depth of the K/V ring in shared memory (:func:`sm90_stages`). The Triton kernel's
            pipeline depth is autotuned instead (:func:`.portable.autotune_configs`).
        regs: sm90: ``setmaxnreg`` registers per thread of (the producer, each consumer).
        max_regs: sm90: registers per thread over the whole program (Triton's ``maxnreg``).
        pingpong: sm90: the two consumers take turns issuing their tensor-core work.
        tree_max: sm90: row maxima folded as a tree, not as one chain.
        lane_sums: sm90: each lane keeps its share of a row's softmax sum; the lanes are added once per query tile.
        max_programs: sm90: at most this many persistent programs (None: one per SM). Tests lower it to put many
            work items through one program.
        fp_fusion: multiply-adds fused into FMAs, as every kernel version was measured with. Passed explicitly:
            Triton 3.9 warns that its default (fused) changes to unfused in 3.10, which would change the kernels'
            code and rounding.
        per_call: skip-softmax (:attr:`.common.KernelCall.per_call`): the full walk, a negligible tile left out of
            the call itself, nothing carried. The sm90 kernel then takes 64-row query tiles, one per consumer.
        qk8: Q.K^T from int8 Q and K (:attr:`.common.KernelCall.qk8`), rounded before the launch
            (:func:`.quant.quantize_qk`); not with ``per_call``.
    """

    backend: str
    block_m: int
    block_n: int
    walk: str
    work_order: str
    tma: bool = False
    upcast: bool = False
    stages: int | None = None
    regs: tuple[int, int] | None = None
    max_regs: int | None = None
    pingpong: bool = False
    tree_max: bool = False
    lane_sums: bool = False
    max_programs: int | None = None
    fp_fusion: bool = True
    per_call: bool = False
    qk8: bool = False
    pv8: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.walk not in WALKS:
            raise ValueError(f"walk: expected one of {WALKS}, got {self.walk!r}")
        if self.work_order not in WORK_ORDERS:
            raise ValueError(f"work_order: expected one of {WORK_ORDERS}, got {self.work_order!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ValueError(f"{name}: expected an int >= 16, got {value!r}")
        if not isinstance(self.per_call, bool) or (self.per_call and self.walk != FULL_WALK):
            raise ValueError(f"per_call: expected a bool, True only with the full walk (skip-softmax visits every "
                             f"key tile), got per_call={self.per_call!r}, walk={self.walk!r}")
        if not isinstance(self.qk8, bool) or (self.qk8 and self.per_call):
            raise ValueError(f"qk8: expected a bool, True only without per_call (skip-softmax computes Q.K^T in 16 "
                             f"bits), got qk8={self.qk8!r}, per_call={self.per_call!r}")
        if not isinstance(self.pv8, bool) or (self.pv8 and (not self.qk8 or self.backend != "sm90")):
            raise ValueError(f"pv8: expected a bool, True only for the sm90 kernel with qk8, got pv8={self.pv8!r}, "
                             f"qk8={self.qk8!r}, backend={self.backend!r}")
        if self.backend == "triton":
            for name, neutral in _SM90_ONLY.items():
                if getattr(self, name) != neutral:
                    raise ValueError(f"{name}: only the sm90 backend reads it; a 'triton' spec leaves it at "
                                     f"{neutral!r}, got {getattr(self, name)!r}")
            return
        if not self.tma or self.upcast:
            raise ValueError(f"tma, upcast: the sm90 kernel copies tiles by TMA and computes on the GPU; expected "
                             f"tma=True, upcast=False, got tma={self.tma!r}, upcast={self.upcast!r}")
        if self.block_m != _sm90_block_m(self.per_call) or self.block_n not in (64, 128):
            raise ValueError(f"block_m, block_n: the sm90 kernel takes {_sm90_block_m(self.per_call)} x 64 or "
                             f"{_sm90_block_m(self.per_call)} x 128 tiles{' with per_call' if self.per_call else ''} "
                             f"(two 64-row consumers per work item), got {self.block_m} x {self.block_n}")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 2:
            raise ValueError(f"stages: expected an int >= 2 (the K/V ring), got {self.stages!r}")
        regs = self.regs
        if not (isinstance(regs, tuple) and len(regs) == 2 and all(isinstance(r, int) and r % 8 == 0 and
                                                                   24 <= r <= 256 for r in regs)):
            raise ValueError(f"regs: expected (producer, consumer) registers, multiples of 8 in [24, 256], got "
                             f"{regs!r}")
        if isinstance(self.max_regs, bool) or not isinstance(self.max_regs, int) or not 24 <= self.max_regs <= 255:
            raise ValueError(f"max_regs: expected registers per thread in [24, 255], got {self.max_regs!r}")
        if self.max_programs is not None and (isinstance(self.max_programs, bool) or
                                              not isinstance(self.max_programs, int) or self.max_programs < 1):
            raise ValueError(f"max_programs: expected None (one per SM) or an int >= 1, got {self.max_programs!r}")


# ---------------------------------------------------------------------------------------------------- the rules
def _sm90_block_m(per_call: bool) -> int:
    """The sm90 kernel's query tile: 128 rows, two 64-row consumers; with ``per_call`` each consumer's 64 rows are a
    query tile of their own, since its skip decision is its own (a shared one would cost a handoff per tile)."""
    return 64 if per_call else 128


def sm90_stages(block_m: int, block_n: int, head_dim: int, smem_budget: int = 220 * 1024, max_stages: int = 4,
                qk8: bool = False, pv8: bool = False) -> int:
    """K/V ring depth of the sm90 kernel: as many stages as fit in ``smem_budget`` bytes beside its two Q buffers,
    at least 2 and at most ``max_stages``. A program takes a whole SM (one per SM), so it may use the whole shared
    memory: 2 stages at 128 x 128 tiles and head_dim 128 (a third would need 256 KiB with the two Q buffers, more
    than an SM has), 4 at head_dim 64 (5 would fit; not measured). With ``qk8`` Q and K tiles take one byte per
    value and the output is staged in a buffer of its own: 3 stages at 128 x 128 tiles and head_dim 128; 4 with V
    in one byte as well (``pv8``)."""
    qk_bytes = 1 if qk8 else 2
    fixed = 2 * block_m * head_dim * qk_bytes + (block_m * head_dim * 2 if qk8 else 0)
    return max(2, min(max_stages, (smem_budget - fixed) // (block_n * head_dim * (qk_bytes + (1 if pv8 else 2)))))


def _sm90_applies(target: tuple, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                  per_call: bool = False) -> bool:
    """The Gluon kernel's scope: an NVIDIA sm90 GPU, fp16/bf16, head_dim 64 or 128, 128 x 64 or 128 x 128 tiles
    (two 64-row consumers per query tile; 64-row tiles with ``per_call``). Anything else runs the portable kernel,
    which has the same semantics."""
    return (target == ("cuda", (9, 0)) and dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128)
            and block_m == _sm90_block_m(per_call) and block_n in (64, 128))


def _sm90_spec(head_dim: int, block_m: int, block_n: int, walk: str, per_call: bool = False,
               qk8: bool = False, pv8: bool = False) -> KernelSpec:
    """The sm90 kernel's settings, each as measured on an H200 (lab/kernel-notes.md, the version in brackets)."""
    full = walk == FULL_WALK
    return KernelSpec(
        "sm90", block_m, block_n, walk,
        # Claim a head's query tiles longest list first where one head's K and V take more than half the L2 (v10,
        # v14): there the programs of a head must sweep its K/V together for the tiles to come from L2; equal
        # lists keep them in step, lists of different lengths let them drift apart, and sorted, the items in
        # flight have nearly equal lengths again. 5-9 % faster at HunyuanVideo (61 MB per head), about 5 % at Wan
        # 14B (39 MB), but 1-6 % slower at Wan 1.3B (17 MB) at s = 0.9, where the argsort's kernels and the
        # dependent load of the order cost more than L2 misses. The full walk has no lists to sort.
        work_order=INDEX_ORDER if full else LONGEST_FIRST_PAST_HALF_L2,
        tma=True,
        stages=sm90_stages(block_m, block_n, head_dim, qk8=qk8, pv8=pv8),
        # setmaxnreg (producer, consumer): the producer also compacts the finished items; the consumers get what
        # the producer's warpgroup gives up, 168 + (168 - producer) / 2. Measured: (40, 232); (24, 240) compiles
        # without spills too and was no faster (v9, v11).
        regs=(40, 232),
        # One program per SM: the register file (64 K) is split between its 3 warpgroups' threads.
        max_regs=168,
        # Taking turns pays above head_dim 64 only: there a tile's products take half as long and the handoff
        # costs more than the overlap saves (v11: without it detection cost 1.5-2.5 % less and sparse calls ran
        # 1-1.6 % faster, dense equal).
        pingpong=head_dim > 64,
        # A tree of row maxima: the full walk at head_dim 64 ran 1.7-2.4 % faster, head_dim 128 4-6 % slower,
        # list walks at head_dim 64 4.5-10 % slower (v13).
        tree_max=head_dim <= 64 and full and not per_call,  # skip-softmax's decision takes a NaN-keeping max
        # Lane sums: detection 2.3 % faster at head_dim 64 and sparse calls there and at Wan 1.3B up to 2.4 %,
        # equal within 1 % at Wan 14B and HunyuanVideo; the full walk no faster at head_dim 64 and 9-11 % slower at
        # HunyuanVideo with the same tile loop apart from the 8 instructions it removes (v16).
        lane_sums=not full,
        per_call=per_call,
        qk8=qk8,
        pv8=pv8,
    )


def portable_spec(spec: KernelSpec) -> KernelSpec:
    """The portable kernel's spec for the call ``spec`` was resolved for: ``spec`` itself if it is one, else the
    fallback of an sm90 spec (same tiles and walk, TMA copies: an sm90 GPU has them). Query tiles are launched
    longest list first in list walks, since the hardware schedules a grid's programs in launch order: the longest
    go first and the short ones fill the tail."""
    if spec.backend == "triton":
        return spec
    return KernelSpec("triton", spec.block_m, spec.block_n, spec.walk,
                      work_order=INDEX_ORDER if spec.walk == FULL_WALK else LONGEST_FIRST, tma=True,
                      fp_fusion=spec.fp_fusion, per_call=spec.per_call, qk8=spec.qk8)


def target_of(device: torch.device) -> tuple:
    """What a kernel is built for on ``device``: ``("interpreter", None)`` in Triton's CPU interpreter,
    ``("cuda", (major, minor))`` on an NVIDIA GPU, ``("hip", None)`` on an AMD one, else ``(device.type, None)``."""
    if interpreting():
        return ("interpreter", None)
    if device.type != "cuda":
        return (device.type, None)
    if torch.version.hip is not None:
        return ("hip", None)
    return ("cuda", device_capability(device))


@functools.lru_cache(maxsize=None)
def resolve(target: tuple, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int, walk: str,
            per_call: bool = False, qk8: bool = False, pv8: bool = False) -> KernelSpec:
    """The spec of every call on ``target`` (:func:`target_of`) with this dtype, head_dim, tiles and walk (and the
    skip-softmax rule with ``per_call``, 8-bit Q.K^T with ``qk8``, fp8 P.V with ``pv8``).

    Cached: a call pays one dictionary lookup. The sm90 kernel is chosen where it applies and this Triton can
    build it (:func:`sm90_module`, which warns once where it cannot); everything else runs the portable kernel.
    """
    if walk not in WALKS:
        raise ValueError(f"walk: expected one of {WALKS}, got {walk!r}")
    if _sm90_applies(target, dtype, head_dim, block_m, block_n, per_call) and sm90_module() is not None:
        return _sm90_spec(head_dim, block_m, block_n, walk, per_call, qk8, pv8)
    if pv8:
        raise ValueError(f"pv_dtype='fp8': P.V in fp8 runs in the Hopper kernel (an sm90 GPU, fp16/bf16, head_dim 64 "
                         f"or 128, 128-row query tiles, 64- or 128-key tiles with a Triton that builds it) and in "
                         f"the PyTorch reference; this call (target {target}, {dtype}, head_dim {head_dim}, tiles "
                         f"{block_m} x {block_n}) runs the portable kernel: use pv_dtype=None or backend='torch'")
    platform, capability = target
    return KernelSpec("triton", block_m, block_n, walk,
                      work_order=INDEX_ORDER if walk == FULL_WALK else LONGEST_FIRST,
                      tma=platform == "cuda" and capability[0] >= 9,
                      upcast=platform == "interpreter" and dtype == torch.bfloat16, per_call=per_call, qk8=qk8)


def spec_for(call: KernelCall) -> KernelSpec:
    """:func:`resolve` for a call."""
    return resolve(target_of(call.q.device), call.q.dtype, call.q.shape[-1], call.block_m, call.block_n, call.walk,
                   call.per_call, call.qk8, call.pv8)


def longest_first(spec: KernelSpec, call: KernelCall) -> bool:
    """Whether this call claims each head's query tiles longest list first (``spec.work_order`` applied to the
    call's keys: K and V of one head against half the L2)."""
    if spec.work_order != LONGEST_FIRST_PAST_HALF_L2:
        return spec.work_order == LONGEST_FIRST
    k = call.k
    return 2 * k.shape[2] * k.shape[3] * k.element_size() > l2_bytes(k.device) // 2


# ---------------------------------------------------------------------------------------------------- the launch
@functools.lru_cache(maxsize=None)
def sm90_module():
    """The Gluon kernel's module, or None (after one warning) where this Triton is not one it is tested with
    (:data:`liteattn.kernels._gluon.TESTED`) or lacks Gluon's Hopper API. Asked only for calls the sm90 kernel
    would run, so other GPUs, which run the portable kernel by design, see no warning."""
    from . import _gluon

    if not _gluon.tested():
        lo, hi = (".".join(map(str, v)) for v in _gluon.TESTED)
        _warn_portable(f"Triton {triton.__version__} is outside the releases it is tested with ({lo} to {hi}.x)")
        return None
    try:
        from . import sm90
    except ImportError as exc:  # a Triton build without Gluon's Hopper API or host-side tensor descriptors
        _warn_portable(f"this Triton build has no Gluon Hopper API ({exc})")
        return None
    return sm90


def _warn_portable(reason: str) -> None:
    warnings.warn(f"liteattn: the Hopper (sm90) kernel is not used: {reason}; running the portable Triton kernel "
                  "instead (same results, slower on Hopper)", RuntimeWarning, stacklevel=5)


# (Triton version, 8-bit QK, fp8 P.V) whose Gluon build of the sm90 kernel failed in this process: later such calls
# go straight to the portable kernel instead of failing to compile again on every call; a release that cannot build
# the integer or fp8 products still runs the kernels without them. A record of what happened, not a setting.
_GLUON_BUILD_FAILED: dict[tuple[str, bool, bool], str] = {}


def _is_build_error(exc: BaseException) -> bool:
    """A failure to compile (Triton's front end, its passes, ptxas), which leaves every buffer untouched; an error
    of the launch itself (a CUDA error) is not one and is raised."""
    from triton.compiler.errors import CompilationError

    if isinstance(exc, CompilationError):
        return True
    return type(exc).__module__.startswith("triton.") and "CUDA" not in str(exc)


def _launch_sm90(launch, qk8: bool, pv8: bool = False) -> bool:
    """Run a Gluon launch; False where this Triton cannot build the kernel (one warning per process and mode; the
    caller then runs the portable kernel on the untouched buffers, or with ``pv8``, which only this kernel computes,
    refuses the call)."""
    try:
        launch()
    except Exception as exc:  # noqa: BLE001 - narrowed by _is_build_error, everything else is raised
        if not _is_build_error(exc):
            raise
        # Triton's compile errors start with the source location and excerpt; the reason is the last line.
        reason = ([line.strip() for line in str(exc).splitlines() if line.strip()] or [""])[-1][:300]
        _GLUON_BUILD_FAILED[(triton.__version__, qk8, pv8)] = f"{type(exc).__name__}: {reason}"
        if not pv8:
            _warn_portable(f"Triton {triton.__version__} failed to build it{' with 8-bit QK' if qk8 else ''} "
                           f"({type(exc).__name__}: {reason})")
        return False
    return True


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _checked(spec: KernelSpec, call: KernelCall) -> KernelSpec:
    if not isinstance(spec, KernelSpec):
        raise ValueError(f"spec: expected a KernelSpec or None, got {type(spec).__name__}")
    if (spec.block_m, spec.block_n, spec.walk, spec.per_call) != (call.block_m, call.block_n, call.walk,
                                                                   call.per_call):
        raise ValueError(f"spec: built for tiles ({spec.block_m}, {spec.block_n}), the {spec.walk} walk and "
                         f"per_call={spec.per_call}, but the call has tiles ({call.block_m}, {call.block_n}), the "
                         f"{call.walk} walk and per_call={call.per_call}")
    if (spec.qk8, spec.pv8) != (call.qk8, call.pv8):
        raise ValueError(f"spec: built with qk8={spec.qk8}, pv8={spec.pv8}, but the call has qk8={call.qk8}, "
                         f"pv8={call.pv8}")
    return spec


def lite_attention_fwd(call: KernelCall, spec: KernelSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one call: ``(out, lse)``, ``out`` with q's strides (BHSD view), ``lse`` ``(B, H, S_q)`` float32 or
    empty without ``call.return_lse``; the next lists written into ``call``'s spare pair when ``write_state``.

    ``spec``: None runs the call's resolved spec (:func:`spec_for`); a given one (internal: development scripts and
    tests) must match the call's tiles and walk. An sm90 spec that cannot run here (this Triton failed to build the
    Gluon kernel before, or an output TMA cannot address) runs :func:`portable_spec` instead, except with ``pv8``:
    the portable kernel has no fp8 P.V, and a call that asked for it is refused (ValueError), not computed in 16
    bits under its name.
    """
    spec = spec_for(call) if spec is None else _checked(spec, call)
    buffers = prepare(call)
    rounded = None
    if spec.qk8:
        v8 = quantize_v(buffers.v, spec.block_n) if spec.pv8 else None
        rounded = quantize_qk(buffers.q, buffers.k, spec.block_m, spec.block_n, v8)
    if spec.tma:
        triton.set_allocator(_tma_allocator)  # the portable kernel's device-side descriptors need scratch memory
    if spec.backend == "sm90":
        module = sm90_module() if (triton.__version__, spec.qk8, spec.pv8) not in _GLUON_BUILD_FAILED else None
        # A dense tensor torch allocates is always TMA-ready at the sm90 kernel's head_dims; the check keeps a
        # hand-made stride from reaching a tensor map.
        if module is not None and tma_ready(buffers.out):
            order = launch_order(call, longest_first(spec, call))
            if _launch_sm90(lambda: module.launch(spec, call, buffers, order, rounded), spec.qk8, spec.pv8):
                if rounded is not None:  # the query tiles the Hopper kernel left to 16 bits (non-finite tokens)
                    fallback = portable_spec(spec)
                    portable.launch(fallback, call, buffers, launch_order(call, longest_first(fallback, call)),
                                    rounded, only_sixteen=True)
                return _unsmoothed(call, buffers, rounded)
        if spec.pv8:
            why = _GLUON_BUILD_FAILED.get((triton.__version__, spec.qk8, spec.pv8))
            why = (f"Triton {triton.__version__} failed to build it ({why})" if why is not None
                   else "the output cannot take the kernel's TMA store")
            raise ValueError(f"pv_dtype='fp8': P.V in fp8 runs in the Hopper kernel only, which cannot run this call: "
                             f"{why}; use pv_dtype=None")
        spec = portable_spec(spec)
    portable.launch(spec, call, buffers, launch_order(call, longest_first(spec, call)), rounded)
    return _unsmoothed(call, buffers, rounded)


def _unsmoothed(call: KernelCall, buffers, rounded: QK8 | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``, the LSE given back what smoothing K took from each row's scores (:mod:`.quant`)."""
    if rounded is not None and call.return_lse:
        buffers.lse.add_(rounded.shift, alpha=call.scale)
    return buffers.out, buffers.lse

