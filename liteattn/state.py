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
import weakref
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

    A state built from tensors (``SkipState(kv_num_blocks, kv_indices, ...)``),
    from a mask (:meth:`from_dense`) or loaded (:meth:`from_state_dict`, or
    unpickled) is checked once, when it is built: counts in ``[0, KT]``, listed
    indices in ``[0, KT)`` without repeats, the dtypes, both tensors on one
    device holding values (not ``meta``). The kernel trusts the lists it reads
    (an index out of range would read another head's memory), and a state the
    library writes is valid by construction, so the calls themselves check
    nothing and never sync the device for it.

    States are values: do not edit a state's tensors in place, build a new
    state from the edited tensors (the constructor, :meth:`from_dense`). The
    library only writes a state's spare pair and returns the result as a new
    state; what it knows about a state (it was checked; it is fresh, below) is
    not re-derived from the tensors, so an in-place edit can go unseen.
    ``H`` is the number of *query* heads: GQA/MQA groups share K/V tiles but
    every query head keeps its own skip set.

    Visiting order is part of the semantics: the first tile visited is never
    marked, and a tile's score is measured against the running row maximum of
    the tiles visited before it. A fresh state visits tiles in ascending order
    and marking preserves the order of the survivors. A *full* row (every key
    tile active) is always visited in ascending order, whatever its list holds.
    A *fresh* state (:meth:`full`, :meth:`refill_`, and their :meth:`clone` /
    :meth:`to` copies; :meth:`is_fresh`) has every list full and ascending, so a
    call on it with nothing to mark runs the kernel's *full walk*: every key
    tile by position, no list read, like dense attention. Every other state
    runs the *list walk*, which visits the same tiles in the same order on
    full lists (the two specializations may round differently).

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
    # Set by the library's own builders (full, clone, to, advanced, ...), whose lists are valid by construction:
    # they skip the content check, which reads the whole state (and syncs a GPU).
    _trusted: bool = field(default=False, repr=False)
    # Set by full() and refill_() (and kept by clone() and to()): every list is [0, 1, ..., KT-1], known without
    # reading the tensors (a device sync). Not an argument, so a state built from tensors, or with
    # dataclasses.replace, never is; cleared when a call is about to write the state's buffers (next_buffers()).
    _fresh: bool = field(default=False, init=False, repr=False)
    # The state whose buffers are this state's spare pair (set by advanced(); weak: a chain of states must not
    # keep every earlier state object alive).
    _spare_owner: weakref.ref | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "seq_len_q", "seq_len_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SkipState: {name}: expected a positive int, got {value!r}")
        if isinstance(self.calls, bool) or not isinstance(self.calls, int) or self.calls < 0:
            raise ValueError(f"SkipState: calls: expected an int >= 0, got {self.calls!r}")
        for name, dtype in (("kv_num_blocks", torch.int32), ("kv_indices", torch.int16)):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"SkipState: {name}: expected a torch.Tensor of {dtype}, got {type(value).__name__}")
            if value.dtype != dtype:
                raise ValueError(f"SkipState: {name}: expected {dtype}, got {value.dtype} (convert with .to({dtype}))")
        if self.kv_num_blocks.device != self.kv_indices.device:
            raise ValueError(f"SkipState: kv_num_blocks and kv_indices: expected one device, got "
                             f"{self.kv_num_blocks.device} and {self.kv_indices.device}")
        if self.kv_indices.device.type == "meta":
            raise ValueError("SkipState: kv_num_blocks, kv_indices: tensors on the 'meta' device hold no values; "
                             "build the state on the device of q, k, v")
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
        if not self._trusted:
            self.validate()
        self._trusted = False  # a copy made with dataclasses.replace is checked again

    def validate(self) -> "SkipState":
        """Check the lists: every count in ``[0, KT]``, the first ``count`` indices of every list in ``[0, KT)``
        and distinct. Raises ``ValueError`` naming the first bad entry; returns the state.

        Why it matters: the kernel reads exactly the listed tiles, so an index past ``KT`` would read memory of
        another head (the PyTorch path clamped it silently to the last tile), a repeated index would count a
        tile twice, and a count out of range would walk past the list. Reads the whole state once (a device
        sync on a GPU); the library's calls never need it.
        """
        if torch.compiler.is_compiling():  # data-dependent: checked where the state was built, not while tracing
            return self
        kt = self.kv_indices.shape[-1]
        counts = self.kv_num_blocks
        bad = (counts < 0) | (counts > kt)
        if bool(bad.any()):
            pos = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"SkipState: kv_num_blocks{list(pos)} = {int(counts[pos])}: expected a count in "
                             f"[0, KT={kt}]")
        listed = torch.arange(kt, device=counts.device) < counts[..., None].long()
        idx = self.kv_indices.long()
        bad = listed & ((idx < 0) | (idx >= kt))
        if bool(bad.any()):
            pos = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"SkipState: kv_indices{list(pos)} = {int(idx[pos])}: expected a key-tile index in "
                             f"[0, KT={kt}) (the entries before kv_num_blocks{list(pos[:3])} = "
                             f"{int(counts[pos[:3]])} are the list)")
        hits = torch.zeros(*idx.shape[:3], kt + 1, dtype=torch.int32, device=idx.device)
        hits.scatter_add_(-1, torch.where(listed, idx, kt), listed.to(torch.int32))
        repeated = hits[..., :kt] > 1
        if bool(repeated.any()):
            *row, tile = torch.nonzero(repeated)[0].tolist()
            raise ValueError(f"SkipState: kv_indices{row}: key tile {tile} is listed {int(hits[(*row, tile)])} "
                             f"times among the first {int(counts[tuple(row)])} entries; each active tile once")
        return self

    # ------------------------------------------------------------------ saving and loading
    def state_dict(self) -> dict:
        """The state as plain tensors and ints, for ``torch.save`` (``torch.load`` reads it back with its default
        ``weights_only=True``); :meth:`from_state_dict` rebuilds and checks it."""
        return {"kv_num_blocks": self.kv_num_blocks, "kv_indices": self.kv_indices, "seq_len_q": self.seq_len_q,
                "seq_len_k": self.seq_len_k, "block_m": self.block_m, "block_n": self.block_n,
                "calls": self.calls}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SkipState":
        """A state from :meth:`state_dict`'s output (e.g. loaded with ``torch.load``), checked like any state
        built from tensors."""
        if not isinstance(state, dict):
            raise ValueError(f"state: expected the dict of SkipState.state_dict(), got {type(state).__name__}")
        keys = ("kv_num_blocks", "kv_indices", "seq_len_q", "seq_len_k", "block_m", "block_n")
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"state: missing {missing}; expected the dict of SkipState.state_dict()")
        return cls(*(state[key] for key in keys), calls=state.get("calls", 0))

    def __getstate__(self) -> dict:
        return self.state_dict()

    def __setstate__(self, state: dict) -> None:
        # Unpickling rebuilds through the constructor, so a pickled state is checked like a hand-built one.
        self.__init__(*(state[key] for key in ("kv_num_blocks", "kv_indices", "seq_len_q", "seq_len_k", "block_m",
                                               "block_n")), calls=state.get("calls", 0))

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
        return cls(counts, indices, seq_len_q, seq_len_k, block_m, block_n, _trusted=True)._marked_fresh()

    @classmethod
    def from_dense(
        cls, active: torch.Tensor, seq_len_q: int, seq_len_k: int, block_m: int, block_n: int
    ) -> "SkipState":
        """Build from a boolean tile mask ``(B, H, QT, KT)``, True = computed.

        Active tiles are visited in ascending index order.
        """
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.dim() != 4:
            got = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, torch.Tensor) else type(active).__name__
            raise ValueError(f"from_dense: expected a bool (B, H, QT, KT) mask, got {got}")
        if active.device.type == "meta":
            raise ValueError("from_dense: a mask on the 'meta' device holds no values")
        kt = active.shape[-1]
        _check_key_tiles(kt, seq_len_k, block_n)
        counts = active.sum(-1, dtype=torch.int32)
        # Stable sort puts active tiles first, in ascending order.
        key = (~active).to(torch.int8)
        order = torch.sort(key, dim=-1, stable=True).indices.to(torch.int16)
        indices = torch.where(
            torch.arange(kt, device=active.device) < counts[..., None].long(), order, torch.zeros_like(order)
        ).contiguous()
        return cls(counts.contiguous(), indices, seq_len_q, seq_len_k, block_m, block_n, _trusted=True)

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

    @property
    def sparsity(self) -> "Sparsity":
        """Fraction of (query tile, key tile) pairs that are skipped, a float (as the repr shows it); calling it,
        ``state.sparsity()``, gives the same value, as it did when this was a method. Syncs the device."""
        b, h, qt, kt = self.shape
        total = b * h * qt * kt
        return Sparsity(1.0 - float(self.kv_num_blocks.sum(dtype=torch.int64)) / total if total else 0.0)

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
                         self.block_m, self.block_n, self.calls, _trusted=True)
        return copy._marked_fresh() if self.is_fresh() else copy

    def to(self, device: torch.device | str) -> "SkipState":
        """A copy on ``device``; the original is untouched."""
        moved = SkipState(self.kv_num_blocks.to(device, copy=True), self.kv_indices.to(device, copy=True),
                          self.seq_len_q, self.seq_len_k, self.block_m, self.block_n, self.calls, _trusted=True)
        return moved._marked_fresh() if self.is_fresh() else moved

    def _marked_fresh(self) -> "SkipState":
        # Not while torch.compile traces: a state made in a compiled region is walked as a list (same result).
        if not torch.compiler.is_compiling():
            self._fresh = True
        return self

    def is_fresh(self) -> bool:
        """True for a state from :meth:`full` or :meth:`refill_` (or a copy of one) whose buffers no call has
        written since: every list full and ascending. Such a state is walked in full when nothing can
        be marked (see the class docstring). False while ``torch.compile`` traces, so that a compiled graph does
        not depend on which state object it was traced with (the list walk gives the same result)."""
        return self._fresh and not torch.compiler.is_compiling()

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
        return self._marked_fresh()

    # ------------------------------------------------------------------ double buffering
    def next_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The spare (counts, indices) pair the next call writes into.

        Asked for by a call that is about to write them: the state whose buffers they are (the one this state
        advanced from) stops being fresh here, so a later call on it reads its lists.
        """
        # Not while torch.compile traces (is_fresh() is False there anyway): Dynamo replays the write through the
        # weak reference at run time, when the owner may have been collected.
        if self._spare_owner is not None and not torch.compiler.is_compiling():
            owner = self._spare_owner()
            if owner is not None:
                owner._fresh = False
        if self._spare is None:
            self._spare = (torch.empty_like(self.kv_num_blocks), torch.empty_like(self.kv_indices))
        return self._spare

    def advanced(self, counts: torch.Tensor, indices: torch.Tensor) -> "SkipState":
        """The state after a call that wrote ``(counts, indices)``.

        The returned state keeps this state's buffers as its spare, so this
        object must not be used again after the returned one is passed to
        another call (take a :meth:`clone` to keep it): that call writes this
        state's buffers (this state then stops being fresh).
        """
        nxt = SkipState(counts, indices, self.seq_len_q, self.seq_len_k, self.block_m, self.block_n,
                        self.calls + 1, _spare=(self.kv_num_blocks, self.kv_indices), _trusted=True)
        nxt._spare_owner = weakref.ref(self)
        return nxt

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
                f"sparsity={self.sparsity:.3f}, device={self.device})")

    def __str__(self) -> str:
        return repr(self) + "\n" + self.to_string()


class Sparsity(float):
    """A skipped fraction that can also be called (``state.sparsity()`` returns it), so code written when
    :attr:`SkipState.sparsity` was a method keeps working."""

    def __call__(self) -> float:
        return float(self)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-touching token ranges ``(start, end)`` covering the same tokens (must-do
    ranges gathered from several sources: configuration, text tokens, a context-parallel rank's shard)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


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
