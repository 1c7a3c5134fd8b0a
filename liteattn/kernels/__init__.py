"""GPU kernels (Triton). Import is lazy-safe: :data:`TRITON_AVAILABLE` says whether they can run."""
from .config import SUPPORTED_HEAD_DIMS, default_block_sizes

try:  # Triton is optional on CPU-only machines and unavailable on macOS/Windows.
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the platform
    TRITON_AVAILABLE = False

__all__ = ["SUPPORTED_HEAD_DIMS", "TRITON_AVAILABLE", "default_block_sizes"]
