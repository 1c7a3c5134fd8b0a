"""One zero-argument callable per method, over one shape's inputs.

Why callables built ahead of time: everything that is set-up and not
attention (building a skip state or a BlockMask, choosing an SDPA backend)
happens here, outside the timed region; the callable does exactly what a
model's attention layer would do on every step.

liteattn is called through its public API (:func:`liteattn.lite_attention`),
so its per-call Python overhead is part of the time, as it is for users.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..attention import lite_attention
from ..kernels import default_block_sizes
from ..state import SkipState, num_tiles
from .registry import Shape

__all__ = ["DETECT_THRESHOLD", "LAYOUT_NOTES", "Inputs", "compare", "flex", "flex_block_mask", "liteattn_dense",
           "liteattn_detect", "liteattn_sparse", "make_inputs", "sdpa"]

# Far below any score a real tile can have relative to the running max (scores are O(10) in log2 units),
# so detection runs in full but marks nothing: the time measured is the detection overhead alone.
DETECT_THRESHOLD = -1e4

LAYOUT_NOTES = {
    "shared": "q/k/v allocated once as contiguous (B, S, H, D); liteattn reads that layout, SDPA and flex get "
              "the same memory viewed as (B, H, S, D) (a transpose, no copy), as a model that calls both would",
    "native": "each method gets contiguous tensors in its own convention: (B, S, H, D) for liteattn, "
              "(B, H, S, D) for SDPA and flex (same values, separate copies)",
}


@dataclass
class Inputs:
    """q, k, v for one shape, in liteattn's layout (``q``...) and SDPA's (``qh``...)."""

    shape: Shape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qh: torch.Tensor
    kh: torch.Tensor
    vh: torch.Tensor
    layout: str
    block: tuple[int, int]

    @property
    def tiles(self) -> tuple[int, int, int, int]:
        """``(B, H, QT, KT)`` of liteattn's default tiles, the grid every mask is built on."""
        s = self.shape
        return s.batch, s.heads, num_tiles(s.seq_len, self.block[0]), num_tiles(s.seq_len, self.block[1])


def make_inputs(shape: Shape, layout: str, device: torch.device | str, seed: int,
                dtype: torch.dtype = torch.bfloat16) -> Inputs:
    """Random normal q, k, v (never zeros: they can run faster than real data and hide indexing bugs)."""
    if layout not in LAYOUT_NOTES:
        raise ValueError(f"layout: expected one of {list(LAYOUT_NOTES)}, got {layout!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape.bshd, generator=gen, device=device, dtype=dtype) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if layout == "native":
        qh, kh, vh = (x.contiguous() for x in (qh, kh, vh))
    return Inputs(shape, q, k, v, qh, kh, vh, layout, default_block_sizes(shape.head_dim))


def sdpa(inputs: Inputs, backend: str) -> Callable[[], torch.Tensor]:
    """SDPA forced to one backend (``"cudnn"`` or ``"flash"``): no silent fallback to another kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    if backend not in choice:
        raise ValueError(f"backend: expected one of {list(choice)}, got {backend!r}")
    kernel = choice[backend]

    def call() -> torch.Tensor:
        with sdpa_kernel([kernel]):
            return torch.nn.functional.scaled_dot_product_attention(inputs.qh, inputs.kh, inputs.vh)

    return call


def liteattn_dense(inputs: Inputs, qk_dtype: str | None = None, pv_dtype: str | None = None
                   ) -> Callable[[], torch.Tensor]:
    """Every tile, no detection (``enabled=False``): liteattn as a plain dense attention (``qk_dtype="int8"``: with
    8-bit Q.K^T, its rounding pass included; ``pv_dtype="fp8"``: P.V in fp8 too, V's rounding included)."""
    def call() -> torch.Tensor:
        return lite_attention(inputs.q, inputs.k, inputs.v, enabled=False, qk_dtype=qk_dtype, pv_dtype=pv_dtype)[0]

    return call


def liteattn_detect(inputs: Inputs, fresh: bool = True) -> tuple[Callable[[], torch.Tensor], Callable[[], int]]:
    """Skipping on, nothing skipped, a threshold that marks nothing.

    Returns the call and a function giving how many tiles the last call
    marked, which must be 0 for the time to mean "detection overhead".
    Every call reads the same full state and writes its spare buffers, so
    repeated calls do identical work. ``fresh=True`` is the first step of a
    generation (a new state); ``fresh=False`` is a later step whose lists are
    still full. Both run the kernel's list walk with detection.
    """
    b, h, qt, kt = inputs.tiles
    s = inputs.shape.seq_len
    if fresh:
        full = SkipState.full(b, h, s, s, *inputs.block, device=inputs.q.device)
    else:
        every = torch.ones(b, h, qt, kt, dtype=torch.bool, device=inputs.q.device)
        full = SkipState.from_dense(every, s, s, *inputs.block)
    total = int(full.kv_num_blocks.sum(dtype=torch.int64))
    last: dict[str, SkipState] = {}

    def call() -> torch.Tensor:
        out, last["next"] = lite_attention(inputs.q, inputs.k, inputs.v, full, threshold=DETECT_THRESHOLD)
        return out

    def marked() -> int:
        if "next" not in last:
            raise RuntimeError("liteattn-detect: marked() called before the first call")
        return total - int(last["next"].kv_num_blocks.sum(dtype=torch.int64))

    return call, marked


def liteattn_sparse(inputs: Inputs, mask: torch.Tensor, qk_dtype: str | None = None,
                    pv_dtype: str | None = None) -> tuple[Callable[[], torch.Tensor], SkipState]:
    """A state pre-seeded from ``mask`` and ``threshold=-inf``: exactly the mask's tiles are skipped.

    With ``-inf`` nothing is marked and the state is not rewritten, so every
    call computes the same tiles.
    """
    s = inputs.shape.seq_len
    state = SkipState.from_dense(mask, s, s, *inputs.block)

    def call() -> torch.Tensor:
        return lite_attention(inputs.q, inputs.k, inputs.v, state, threshold=float("-inf"), qk_dtype=qk_dtype,
                              pv_dtype=pv_dtype)[0]

    return call, state


def flex_block_mask(mask: torch.Tensor, seq_len: int, block: tuple[int, int]):
    """A FlexAttention ``BlockMask`` computing exactly the True tiles of ``mask``.

    The tiles go in as *full* blocks (no ``mask_mod`` evaluated inside them):
    like liteattn, flex then computes whole tiles, its fastest path. The
    index lists are liteattn's own (:meth:`SkipState.from_dense`), widened to
    the int32 flex expects.
    """
    from torch.nn.attention.flex_attention import BlockMask

    state = SkipState.from_dense(mask, seq_len, seq_len, *block)
    counts, indices = state.kv_num_blocks.to(torch.int32), state.kv_indices.to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
                                    BLOCK_SIZE=tuple(block), seq_lengths=(seq_len, seq_len))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """``torch.compile(flex_attention)`` once per process: without compiling, flex is a slow reference."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(inputs: Inputs, mask: torch.Tensor, *, compiled: bool = True) -> Callable[[], torch.Tensor]:
    """Compiled ``flex_attention`` over the same tiles as ``mask``, in SDPA's (B, H, S, D) convention.

    Flex's own kernel tile must divide the mask's tile. When its default does
    not (e.g. its 128-row kernel tile against liteattn's 64-row tiles at
    head_dim 64), the kernel tile is set to the mask's tile (at most 128) and
    the returned callable's ``note`` says so. Compilation happens here, once.
    """
    block_mask = flex_block_mask(mask, inputs.shape.seq_len, inputs.block)
    if not compiled:  # eager: the unfused reference implementation (it ignores the block structure)
        from torch.nn.attention.flex_attention import flex_attention

        return lambda: flex_attention(inputs.qh, inputs.kh, inputs.vh, block_mask=block_mask)
    fn = _compiled_flex()
    options: dict = {}

    def call() -> torch.Tensor:
        return fn(inputs.qh, inputs.kh, inputs.vh, block_mask=block_mask, kernel_options=options or None)

    call.note = ""
    try:
        call()
    except Exception as exc:
        if "divisible by BLOCK_M and BLOCK_N" not in str(exc):
            raise
        options.update(BLOCK_M=min(inputs.block[0], 128), BLOCK_N=min(inputs.block[1], 128))
        call.note = (f"flex kernel tile set to BLOCK_M={options['BLOCK_M']}, BLOCK_N={options['BLOCK_N']}: its "
                     f"default does not divide the {inputs.block[0]}x{inputs.block[1]} mask tile")
        call()
    return call


def compare(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """``(max |a - r|, ||a - r|| / ||r||, max |r|)`` in float32; both in the same layout."""
    if actual.shape != reference.shape:
        raise ValueError(f"actual: shape {tuple(actual.shape)} differs from reference {tuple(reference.shape)}")
    a, r = actual.float(), reference.float()
    diff = a - r
    return diff.abs().max().item(), (diff.norm() / r.norm()).item(), r.abs().max().item()
