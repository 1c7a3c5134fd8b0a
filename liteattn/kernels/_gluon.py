"""Which Triton releases the Gluon (Hopper) kernels are built with, and the Gluon names that differ between them.

Why a module of its own: Gluon is Triton's experimental dialect and its API moves between releases. Triton 3.7
renamed the CTA barrier (``gl.thread_barrier`` became ``gl.barrier``) and 3.8 the TMA copies
(``tma.async_copy_global_to_shared`` became ``tma.async_load`` and ``tma.async_copy_shared_to_global``
``tma.async_store``; 3.9 keeps the old names only to raise an error). The kernels call the names bound here, resolved once at import from what the installed Triton has, so
one source builds with every release in :data:`TESTED` and the kernels carry no version tests of their own.

A Triton outside :data:`TESTED` is not trusted with the Gluon kernels (their barrier and memory-ordering
arguments were checked in the code each tested release generates): calls then run the portable Triton kernel,
which has the same tile semantics, after one warning (:func:`liteattn.kernels.dispatch.lite_attention_fwd`).
"""
from __future__ import annotations

import re

import triton

# The oldest and the newest Triton release the Gluon kernels are compiled and checked with (major, minor).
# pyproject.toml's bounds on triton and .ci/run's two environments say the same.
TESTED = ((3, 6), (3, 9))


def triton_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of a Triton version string (the installed one by default); ``(0, 0)`` if unreadable,
    e.g. a source build with a custom tag."""
    match = re.match(r"(\d+)\.(\d+)", triton.__version__ if version is None else version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def tested(version: str | None = None) -> bool:
    """Whether a Triton version (the installed one by default) is one the Gluon kernels are tested with."""
    return TESTED[0] <= triton_version(version) <= TESTED[1]


try:
    from triton.experimental.gluon import language as _gl
    from triton.experimental.gluon.language.nvidia.hopper import tma as _tma
except ImportError:  # pragma: no cover - a Triton without Gluon's Hopper module: the kernels are not imported
    _gl = _tma = None

if _tma is not None:
    # Global memory -> shared memory tile copy, completing on an mbarrier; and the shared -> global store.
    tma_load = getattr(_tma, "async_load", None) or _tma.async_copy_global_to_shared
    tma_store = getattr(_tma, "async_store", None) or _tma.async_copy_shared_to_global
    # A barrier over the threads of the CTA (outside warp-specialized regions: all its warps).
    cta_barrier = getattr(_gl, "barrier", None) or _gl.thread_barrier
