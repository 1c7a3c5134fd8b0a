"""liteattn under diffusers' context parallelism: Ulysses, ring, and both at once (unified).

Why diffusers' own machinery and no communication here: with ``transformer.enable_parallelism(...)`` diffusers
(>= 0.42) splits the sequence across ranks (the model's ``_cp_plan`` hooks), and inside each attention call its
``_templated_context_parallel_attention`` moves the tensors: Ulysses exchanges sequence for heads (all-to-all),
ring all-gathers K/V and calls the backend once per K/V chunk, merging the partial outputs by their log-sum-exp,
and unified does the Ulysses exchange inside each ring group and then the ring. A backend takes part by handing
that function a ``forward_op``, as diffusers' flash, cuDNN and Sage backends do. liteattn's :func:`attend` does
exactly that; it never moves a tensor between ranks itself.

Why one skip state per *part*: a skip state belongs to one attention problem (fixed queries, keys and heads) that
recurs from step to step. Under context parallelism one layer call of a rank is one or more such problems, each a
``forward_op`` call, identified by a :class:`Part`:

- Ulysses: one call over the whole sequence with the rank's ``H / degree`` heads. The state is the one-process
  state of those heads, so the skip decisions are the one-process decisions, head for head.
- Ring: one call per K/V chunk, in diffusers' order (the rank's own chunk first, then the next rank's, ...); the
  call number within the layer call gives the chunk. Each (query block, chunk) pair keeps its own lists.
- Unified: both; the part is (the rank's heads, its query block, the chunk).

The part states live beside the CFG contexts' states, in ``LayerRuntime.contexts`` under ``(context, part)``
keys, so they are created, reset at each new generation and reuse their buffers exactly as the contexts' own. A
call's record (its step, mode and skipped fraction) goes to its context, as without parallelism; the skipped
fraction is that of this rank's parts, so each rank's ``summary()`` covers its own heads or query block.

Skipping under ring (what equality with one process is possible). liteattn's rule compares a key tile with the
running row maximum of the tiles visited before it *in the same call*, and never marks the first tile a call
visits. A chunk call starts its running maximum afresh, so within chunk ``c`` the maximum covers chunk ``c``'s
tiles only, where one process has also seen every tile of the chunks before it. Hence, with chunk and query-block
boundaries on tile boundaries:

- the chunk holding the first keys (chunk 0) makes exactly the one-process decisions for those tiles, at every
  step, whatever rank asks and in whatever order the chunks come;
- a later chunk's running maximum can only be lower at the first skipping step, so it marks a subset of the
  tiles one process marks there (its first tile is never marked). After that the lists differ, and so may later
  decisions; the bound of the rule is the same (a marked tile's scores were ``2**threshold`` below a maximum of
  its own row);
- no chunk's list ever empties: its first tile is kept, so every row has a finite log-sum-exp in every chunk
  (for finite inputs), which diffusers' merge needs.

Why the log-sum-exp handed to the merge is guarded anyway: a row can still have nothing in a chunk (every score
``-inf``, or a list emptied by a seeded state): liteattn then gives zeros and a log-sum-exp of ``-inf``, as SDPA
does. diffusers' merge gives such a chunk zero weight when an earlier chunk had mass, but its running log-sum-exp
update is NaN when that running value is ``-inf`` (``-inf - logsigmoid(-inf)``), i.e. when the empty chunk is
the first (a NaN that reaches the output with a third chunk, or with two empty ones). :class:`LseGuard` keeps the
running value finite without changing the result: a row empty so far hands over ``0``, the row's first real
chunk then hands over a value that dominates it completely, and from there on each chunk's log-sum-exp is handed
over shifted by the same per-row constant, which the merge's weights do not see. A row with mass in the first
chunk (every row liteattn's own states produce) is handed its log-sum-exp unchanged, bit for bit.

What runs dense instead (through the model's original backend, with the same parallel configuration, counted in
``summary().fallbacks``): calls with an attention mask (diffusers passes ring calls the unsliced mask),
``skip_rule="per_call"``, a calibration ``steer`` (both measure one process's calls), and ring with
``ring_anything`` when must-do ranges apply (uneven blocks leave the token offsets of a chunk unknown). Dense
steps also run the original backend: under ring that backend must return a log-sum-exp (``_native_cudnn``,
``flash``, ``sage``, ...), as it must without liteattn. Context-parallel forwards are not captured in CUDA graphs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..state import merge_ranges

__all__ = ["LseGuard", "Part", "attend", "fallback_reason", "local_ranges", "parts_of"]

# What a row's first real chunk hands to diffusers' merge after empty chunks that handed over 0: e^-88 is below
# float32's smallest subnormal relative to 1, so the sigmoid weight of the real chunk is exactly 1 and the fake
# mass of the empty ones vanishes; 88 is exact in bf16 and fp16, and far from overflowing anything.
PIN = 88.0


@dataclass(frozen=True)
class Part:
    """The slice of one layer's attention that one ``forward_op`` call computes on this rank.

    ``heads``: ``(rank, degree)`` in the Ulysses group; the rank holds the rank-th of ``degree`` head groups
    (``(0, 1)`` without Ulysses). ``queries``: ``(rank, degree)`` in the ring group; the rank's block of query
    tokens (``(0, 1)`` without ring). ``chunk``: the ring rank whose block of keys and values the call attends to.
    """

    heads: tuple[int, int]
    queries: tuple[int, int]
    chunk: int


def parts_of(parallel_config) -> list[Part]:
    """The parts one layer call computes on this rank, in diffusers' call order."""
    cp = parallel_config.context_parallel_config
    heads = (int(cp._ulysses_local_rank), int(cp.ulysses_degree))
    rank, degree = int(cp._ring_local_rank), int(cp.ring_degree)
    return [Part(heads, (rank, degree), (rank + i) % degree) for i in range(degree)]


def must_do_ranges(runtime, tokens: int) -> list[tuple[int, int]]:
    """The layer's must-do token ranges in a sequence of ``tokens`` tokens (no key padding under parallelism)."""
    return runtime._must_do(tokens, tokens)


def fallback_reason(runtime, parallel_config, attn_mask) -> str | None:
    """Why ``runtime`` must run this context-parallel call through the original backend, or None.

    Reasons (each counted in ``summary().fallbacks``): ``"context_parallel"`` for a parallel configuration without
    context parallelism in it; ``"context_parallel_mask"``, ``"context_parallel_per_call"``,
    ``"context_parallel_steer"`` and ``"context_parallel_must_do"`` as the module docstring says.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return "context_parallel"
    if attn_mask is not None:
        return "context_parallel_mask"
    if runtime.config.skip_rule != "carry":
        return "context_parallel_per_call"
    if runtime.steer is not None:
        return "context_parallel_steer"
    if cp.ring_degree > 1 and cp.ring_anything:
        text = runtime.text_position == "end" and runtime.config.text_tokens == "must_do" and runtime._text_len
        if runtime.config.must_do or text:
            return "context_parallel_must_do"
    return None


def local_ranges(ranges: list[tuple[int, int]], part: Part, seq_q: int, seq_k: int) -> list[tuple[int, int]]:
    """Must-do ranges of the whole sequence in the coordinates of one part's queries and keys.

    A part attends the query block ``part.queries[0]`` to the key block ``part.chunk`` (both the whole sequence
    without ring). liteattn takes one list of ranges for both sides, so the list is the union of the ranges seen
    from the queries and from the keys: it protects every tile either side needs, and more only off the diagonal
    of a ring (a conservative choice: fewer tiles skipped, never a must-do tile).
    """
    if not ranges:
        return []
    local = []
    for offset, length in ((part.queries[0] * seq_q, seq_q), (part.chunk * seq_k, seq_k)):
        for start, end in ranges:
            lo, hi = max(start - offset, 0), min(end - offset, length, seq_k)
            if lo < hi:
                local.append((lo, hi))
    return merge_ranges(local)


class LseGuard:
    """Makes what one layer call hands to diffusers' ring merge safe when a row has nothing in a chunk.

    Call it with each chunk's log-sum-exp ``(B, S, H)`` in the merge's order; it returns the value to hand over
    (the module docstring says why and how). Rows with mass in the first chunk get their values unchanged.
    """

    def __init__(self) -> None:
        self._empty_so_far: torch.Tensor | None = None  # rows whose handed-over running value is the placeholder 0
        self._shift: torch.Tensor | None = None  # per row: handed-over value = true log-sum-exp - shift

    def __call__(self, lse: torch.Tensor) -> torch.Tensor:
        empty = lse == -math.inf
        if self._empty_so_far is None:
            self._empty_so_far, self._shift = empty, torch.zeros_like(lse)
            return torch.where(empty, torch.zeros_like(lse), lse)
        first_mass = self._empty_so_far & ~empty
        self._shift = torch.where(first_mass, lse - PIN, self._shift)
        handed = torch.where(self._empty_so_far, torch.where(empty, lse, torch.full_like(lse, PIN)),
                             lse - self._shift)
        self._empty_so_far = self._empty_so_far & empty
        return handed


def _no_backward(ctx, grad_out, *args, **kwargs):
    """liteattn's context-parallel path is for inference: the skip state is a forward-only decision."""
    raise NotImplementedError("liteattn: context-parallel attention has no backward pass (liteattn is for "
                              "inference); run training without liteattn.apply")


def attend(runtime, info, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
           enable_gqa: bool, parallel_config) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One context-parallel call of ``runtime``'s layer: ``(out, threshold, skipped fraction)``.

    ``query``, ``key``, ``value`` are this rank's BSHD shards as the processor passes them; the output is this
    rank's shard of the attention output. The skipped fraction (a device tensor, no sync) is over this rank's
    parts, weighted by their tile counts.
    """
    if runtime.log is not None:
        # Raised inside the capture: ForwardGraphs then runs this forward eagerly from now on, with one warning.
        raise NotImplementedError("context-parallel attention calls are not captured in CUDA graphs (diffusers' "
                                  "collectives run inside them)")
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention, _wait_tensor

    cp = parallel_config.context_parallel_config
    tokens = query.shape[1] * cp.ring_degree * cp.ulysses_degree  # the whole sequence: the plan splits it evenly
    threshold = runtime.threshold_at(info.step, tokens)
    ranges = must_do_ranges(runtime, tokens)
    parts = parts_of(parallel_config)
    guard = LseGuard() if len(parts) > 1 else None
    used = []

    def forward_op(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                   return_lse=False, _save_ctx=True, _parallel_config=None):
        """diffusers' forward op: BSHD in, BSHD out (and the log-sum-exp ``(B, S_q, H)``)."""
        part = parts[len(used) % len(parts)]
        # Ring hands over chunks of an all-gather still in flight (functional collectives' AsyncCollectiveTensor):
        # torch ops wait on them by themselves, but a Triton kernel reads their data pointers, so wait here.
        q, k, v = (_wait_tensor(x) for x in (q, k, v))
        attention = runtime.state((info.context, part), info.generation).attention
        attention.set_threshold(threshold)
        result = attention(q, k, v, scale=scale, return_lse=return_lse,
                           must_do=local_ranges(ranges, part, q.shape[1], k.shape[1]))
        used.append(attention)
        if not return_lse:
            return result
        out, lse = result
        lse = lse.transpose(1, 2).contiguous()
        return out, (guard(lse) if guard is not None else lse)

    out = _templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, enable_gqa, False,
                                                forward_op=forward_op, backward_op=_no_backward,
                                                _parallel_config=parallel_config)
    weights = [math.prod(a.state.shape) for a in used]
    skipped = sum(a._history[-1] * w for a, w in zip(used, weights)) / float(sum(weights))
    return out, threshold, skipped
