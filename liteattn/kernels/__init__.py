"""GPU kernels. Import is lazy-safe: :data:`TRITON_AVAILABLE` says whether they can run.

- :mod:`.dispatch`: which kernel and which settings a call uses (:class:`~.dispatch.KernelSpec`), and the launch;
- :mod:`.portable`: the portable Triton kernel (any GPU Triton supports, and its CPU interpreter);
- :mod:`.sm90`: the warp-specialized persistent kernel for Hopper, in Gluon (:mod:`._gluon`: Triton-version names);
- :mod:`.common`: the call's typed arguments and what every launch shares;
- :mod:`.op`: the ``torch.library`` custom op; :mod:`.config`: tile sizes per head_dim.
"""
from .config import SUPPORTED_HEAD_DIMS, default_block_sizes

try:  # Triton is optional on CPU-only machines and unavailable on macOS/Windows.
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the platform
    TRITON_AVAILABLE = False

__all__ = ["SUPPORTED_HEAD_DIMS", "TRITON_AVAILABLE", "default_block_sizes"]
