"""The skip state: which key tiles each query tile still computes.

Why a list of active tiles and not a bitmask: the kernel's cost must fall
linearly with the skipped fraction, so a program should iterate exactly the
tiles it computes. A count plus an index list (FlexAttention's
``kv_num_blocks`` / ``kv_indices``) gives that with one scalar load per tile.

Why two buffers: the kernel reads the current list and writes the next one
in the same pass, and the caller may still want the list it passed (e.g. to
retry a step). So each state owns a spare pair of buffers; a call reads
``(kv_num_blocks, kv_indices)``, writes the spare, and returns a new
:class:`SkipState` whose spare is the old current pair. Calling twice with the
same state is a retry: both calls read the same lists, and the second result
replaces the first (they share the spare pair). Nothing is allocated
per call.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

__all__ = ["SkipState", "num_tiles"]

MAX_KEY_TILES = 32767  # kv_indices are int16


def _check_key_tiles(kt: int, seq_len_k: int, block_n: int) -> None:
    if kt > MAX_KEY_TILES:
        raise ValueError(f"seq_len_k={seq_len_k} with block_n={block_n} gives {kt} key tiles; at most "
                         f"{MAX_KEY_TILES} are supported (kv_indices are int16; use a larger block_n)")


def num_tiles(seq_len: int, block: int) -> int:
    """Number of tiles of ``block`` tokens covering ``seq_len`` (last one ragged)."""
    return (seq_len + block - 1) // block


@dataclass(eq=False)
class SkipState:
    """Active key tiles per (batch, head, query tile), double-buffered.

    Format (BCSR-like, as FlexAttention's ``BlockMask``):

    - ``kv_num_blocks``: int32 ``(B, H, QT)``, how many key tiles are active.
    - ``kv_indices``: int16 ``(B, H, QT, KT)`` (int16 halves the memory of a state,
      which matters with one state per layer and CFG branch: ``KT < 32768``); entries ``[..., :kv_num_blocks]``
      are the active key-tile indices **in visiting order**; entries after the
      count are undefined.

    ``QT = ceil(seq_len_q / block_m)``, ``KT = ceil(seq_len_k / block_n)``.
    ``H`` is the number of *query* heads: GQA/MQA groups share K/V tiles but
    every query head keeps its own skip set.

    Visiting order is part of the semantics: the first tile visited is never
    marked, and a tile's score is measured against the running row maximum of
    the tiles visited before it. A fresh state visits tiles in ascending order
    and marking preserves the order of the survivors. A *full* row (every key
    tile active) is always visited in ascending order, whatever its list holds,
    and a fresh state (:meth:`full`) called with nothing to mark is walked by
    address like dense attention.

    The skip set only grows: a call's next state is its current list minus
    the tiles it marked.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    seq_len_q: int
    seq_len_k: int
    block_m: int
    block_n: int
    calls: int = 0  # how many attention calls produced this state since it was created
    _spare: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # Set by full(): the tensors' version counters at creation. While they are unchanged every list is
    # [0, 1, ..., KT-1], so a call that marks nothing may walk tiles by address like dense attention
    # (known without a device sync). Any in-place edit, and every kernel write, bumps a counter.
    _fresh_versions: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "seq_len_q", "seq_len_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SkipState: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.kv_num_blocks.dtype != torch.int32 or self.kv_indices.dtype != torch.int16:
            raise ValueError("SkipState: kv_num_blocks must be int32 and kv_indices int16, got "
                             f"{self.kv_num_blocks.dtype} and {self.kv_indices.dtype}")
        if self.kv_num_blocks.dim() != 3 or self.kv_indices.dim() != 4:
            raise ValueError(
                "SkipState: expected kv_num_blocks (B, H, QT) and kv_indices (B, H, QT, KT), got "
                f"{tuple(self.kv_num_blocks.shape)} and {tuple(self.kv_indices.shape)}"
            )
        if self.kv_num_blocks.shape[:2] != self.kv_indices.shape[:2]:
            raise ValueError(
                f"SkipState: kv_num_blocks {tuple(self.kv_num_blocks.shape)} and kv_indices "
                f"{tuple(self.kv_indices.shape)} disagree on (B, H)"
            )
        # The kernel indexes both as dense row-major arrays (a head slice of a larger state is copied).
        self.kv_num_blocks = self.kv_num_blocks.contiguous()
        self.kv_indices = self.kv_indices.contiguous()
        qt, kt = num_tiles(self.seq_len_q, self.block_m), num_tiles(self.seq_len_k, self.block_n)
        if self.kv_num_blocks.shape[2] != qt or self.kv_indices.shape[2:] != (qt, kt):
            raise ValueError(
                f"SkipState: seq_len_q={self.seq_len_q}, seq_len_k={self.seq_len_k} with tiles "
                f"({self.block_m}, {self.block_n}) need QT={qt}, KT={kt}; got kv_indices "
                f"{tuple(self.kv_indices.shape)}"
            )

    # ------------------------------------------------------------------ builders
    @classmethod
    def full(
        cls,
        batch: int,
        heads: int,
        seq_len_q: int,
        seq_len_k: int,
        block_m: int,
        block_n: int,
        device: torch.device | str = "cpu",
    ) -> "SkipState":
        """A fresh state: every key tile active, visited in ascending order."""
        for name, value in (("block_m", block_m), ("block_n", block_n), ("seq_len_q", seq_len_q),
                            ("seq_len_k", seq_len_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SkipState.full: {name} must be a positive int, got {value!r}")
        qt, kt = num_tiles(seq_len_q, block_m), num_tiles(seq_len_k, block_n)
        _check_key_tiles(kt, seq_len_k, block_n)
        counts = torch.full((batch, heads, qt), kt, dtype=torch.int32, device=device)
        order = torch.arange(kt, dtype=torch.int16, device=device)
        indices = order.expand(batch, heads, qt, kt).contiguous()
        return cls(counts, indices, seq_len_q, seq_len_k, block_m, block_n)._mark_fresh()

    @classmethod
    def from_dense(
        cls, active: torch.Tensor, seq_len_q: int, seq_len_k: int, block_m: int, block_n: int
    ) -> "SkipState":
        """Build from a boolean tile mask ``(B, H, QT, KT)``, True = computed.

        Active tiles are visited in ascending index order.
        """
        if active.dtype != torch.bool or active.dim() != 4:
            raise ValueError(f"from_dense: expected a bool (B, H, QT, KT) mask, got {active.dtype} {tuple(active.shape)}")
        kt = active.shape[-1]
        _check_key_tiles(kt, seq_len_k, block_n)
        counts = active.sum(-1, dtype=torch.int32)
        # Stable sort puts active tiles first, in ascending order.
        key = (~active).to(torch.int8)
        order = torch.sort(key, dim=-1, stable=True).indices.to(torch.int16)
        indices = torch.where(
            torch.arange(kt, device=active.device) < counts[..., None].long(), order, torch.zeros_like(order)
        ).contiguous()
        return cls(counts.contiguous(), indices, seq_len_q, seq_len_k, block_m, block_n)

    # ------------------------------------------------------------------ inspection
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, QT, KT)``."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to_dense(self) -> torch.Tensor:
        """Boolean ``(B, H, QT, KT)`` mask, True where the tile is still computed."""
        b, h, qt, kt = self.shape
        valid = torch.arange(kt, device=self.device) < self.kv_num_blocks[..., None]
        # Unused list positions scatter into an extra sentinel column, dropped at the end.
        dense = torch.zeros(b, h, qt, kt + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(valid, self.kv_indices, kt).long()
        dense.scatter_(-1, idx, valid)
        return dense[..., :kt]

    def sparsity(self) -> float:
        """Fraction of (query tile, key tile) pairs that are skipped. Syncs the device."""
        b, h, qt, kt = self.shape
        total = b * h * qt * kt
        return 1.0 - float(self.kv_num_blocks.sum(dtype=torch.int64)) / total if total else 0.0

    def sparsity_per_head(self) -> torch.Tensor:
        """Skipped fraction per ``(B, H)``, float32."""
        kt = self.shape[-1]
        return 1.0 - self.kv_num_blocks.float().mean(-1) / kt

    def matches(self, batch: int, heads: int, seq_len_q: int, seq_len_k: int, block_m: int, block_n: int,
                device: torch.device) -> bool:
        """Whether this state was built for these inputs and tiles."""
        return (
            self.shape[:2] == (batch, heads)
            and (self.seq_len_q, self.seq_len_k, self.block_m, self.block_n) == (seq_len_q, seq_len_k, block_m, block_n)
            and self.device == torch.device(device)
        )

    def clone(self) -> "SkipState":
        """An independent copy (its own buffers), e.g. to keep a snapshot."""
        copy = SkipState(self.kv_num_blocks.clone(), self.kv_indices.clone(), self.seq_len_q, self.seq_len_k,
                         self.block_m, self.block_n, self.calls)
        return copy._mark_fresh() if self.is_fresh() else copy

    def to(self, device: torch.device | str) -> "SkipState":
        """A copy on ``device``; the original is untouched."""
        moved = SkipState(self.kv_num_blocks.to(device, copy=True), self.kv_indices.to(device, copy=True),
                          self.seq_len_q, self.seq_len_k, self.block_m, self.block_n, self.calls)
        return moved._mark_fresh() if self.is_fresh() else moved

    def _mark_fresh(self) -> "SkipState":
        # Inference-mode tensors track no versions: such a state is walked as a list (same result), as is
        # any state under torch.compile (is_fresh is False while tracing).
        if torch.compiler.is_compiling():
            return self
        if not (self.kv_num_blocks.is_inference() or self.kv_indices.is_inference()):
            self._fresh_versions = (self.kv_num_blocks._version, self.kv_indices._version)
        return self

    def is_fresh(self) -> bool:
        """True for a state from :meth:`full` that nothing has written since (every list full, ascending)."""
        if self._fresh_versions is None or torch.compiler.is_compiling():
            return False
        return (self.kv_num_blocks._version, self.kv_indices._version) == self._fresh_versions

    def refill_(self) -> "SkipState":
        """Every key tile active again, in ascending order, in this state's own buffers; returns ``self``.

        Why in place: a new generation that reuses the last one's memory keeps its
        addresses, so CUDA graphs captured on them stay valid, and nothing is
        allocated. The spare pair is kept.
        """
        kt = self.shape[-1]
        self.kv_num_blocks.fill_(kt)
        self.kv_indices.copy_(torch.arange(kt, dtype=torch.int16, device=self.device).expand_as(self.kv_indices))
        self.calls = 0
        return self._mark_fresh()

    # ------------------------------------------------------------------ double buffering
    def next_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The spare (counts, indices) pair the next call writes into."""
        if self._spare is None:
            self._spare = (torch.empty_like(self.kv_num_blocks), torch.empty_like(self.kv_indices))
        return self._spare

    def advanced(self, counts: torch.Tensor, indices: torch.Tensor) -> "SkipState":
        """The state after a call that wrote ``(counts, indices)``.

        The returned state keeps this state's buffers as its spare, so this
        object must not be used again after the returned one is passed to
        another call (take a :meth:`clone` to keep it).
        """
        return SkipState(counts, indices, self.seq_len_q, self.seq_len_k, self.block_m, self.block_n,
                         self.calls + 1, _spare=(self.kv_num_blocks, self.kv_indices))

    # ------------------------------------------------------------------ printing
    def to_string(self, grid: tuple[int, int] = (16, 32), batch: int = 0, head: int = 0) -> str:
        """ASCII picture of one head: '#' computed, '.' skipped, '+' partly (when downsampled)."""
        dense = self.to_dense()[batch, head].float()
        qt, kt = dense.shape
        gr, gc = min(grid[0], qt), min(grid[1], kt)
        rows = []
        for i in range(gr):
            r0, r1 = i * qt // gr, max((i + 1) * qt // gr, i * qt // gr + 1)
            line = []
            for j in range(gc):
                c0, c1 = j * kt // gc, max((j + 1) * kt // gc, j * kt // gc + 1)
                frac = dense[r0:r1, c0:c1].mean().item()
                line.append("#" if frac == 1.0 else "." if frac == 0.0 else "+")
            rows.append("".join(line))
        return "\n".join(rows)

    def __repr__(self) -> str:  # cheap: shapes only, plus one sync for sparsity
        b, h, qt, kt = self.shape
        return (f"SkipState(B={b}, H={h}, QT={qt}, KT={kt}, tiles=({self.block_m}, {self.block_n}), "
                f"seq_len=({self.seq_len_q}, {self.seq_len_k}), calls={self.calls}, "
                f"sparsity={self.sparsity():.3f}, device={self.device})")

    def __str__(self) -> str:
        return repr(self) + "\n" + self.to_string()


def tile_protection(ranges: list[tuple[int, int]] | None, seq_len: int, block: int,
                    device: torch.device) -> torch.Tensor:
    """int8 per tile: 1 where the tile overlaps a must-do token range.

    Cached per (ranges, seq_len, block, device): a layer calls this every step with the
    same arguments, and building it means a host-to-device copy. Under ``torch.compile``
    the uncached function is traced instead (the graph holds the result; Dynamo would
    otherwise warn that it ignores the cache).
    """
    key = (tuple(tuple(r) for r in ranges or ()), seq_len, block, torch.device(device))
    if torch.compiler.is_compiling():
        return _tile_protection.__wrapped__(*key)
    return _tile_protection(*key)


@functools.lru_cache(maxsize=256)
def _tile_protection(ranges: tuple[tuple[int, int], ...], seq_len: int, block: int,
                     device: torch.device) -> torch.Tensor:
    prot = torch.zeros(num_tiles(seq_len, block), dtype=torch.int8)
    for start, end in ranges:
        prot[start // block: math.ceil(end / block)] = 1
    return prot.to(device)
