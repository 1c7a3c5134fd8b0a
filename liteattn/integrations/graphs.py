"""CUDA graphs of whole transformer forwards with liteattn inside (``apply(..., cuda_graph=True)``).

Why: a video DiT's forward launches hundreds of small kernels from Python,
and liteattn adds its own Python per attention call (hooks, checks, the
launch). Once skipping makes attention fast, the GPU waits for the host, and
the time saved on the GPU is not saved on the clock. A CUDA graph replays a
captured forward with one launch.

Why replaying is exact with the carried skip state: a graph repeats the
captured kernels on the captured addresses. liteattn's state is
double-buffered (a call reads one pair of buffers and writes the other), and
a new generation refills the last generation's buffers in place
(:meth:`~liteattn.LiteAttention.reset`), so the same few pairs of addresses
serve every step of every generation. One graph is kept per *key*: CFG
context, kind of step ("dense" for the first ``dense_steps``, "fresh" for
the first skipping step, which starts from full lists, then "list" with the
step's parity, which says which buffer is read), threshold (with a calibration
profile: the step range, which fixes every layer's threshold), and the shapes,
dtypes and strides of the forward's inputs. Before each replay every
skipping layer's state must sit in the buffers the graph reads; otherwise the
forward runs eagerly, unchanged.

What Python did during the capture is undone and then redone by every replay
from the log the layers kept (:class:`~liteattn.integrations.layer.LoggedCall`):
the call records, each layer's history (a copy of the sparsity the graph
computed), its step counter and the state object pointing at the buffers just
written. So ``summary()`` and ``handle.attention(...)`` read the same as
without graphs.

A key is captured the second time it is seen: the first time runs eagerly,
which compiles and autotunes every kernel outside the capture. A forward that
cannot be captured (one that syncs the device, say) runs eagerly from then on,
with one warning.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from .layer import CallRecord, ContextState, ForwardInfo, LayerRuntime, LoggedCall, count_fallback

__all__ = ["ForwardGraphs"]

_FAILED = object()


@dataclass
class _Captured:
    """One captured forward: its graph, static inputs and output, and the log of its attention calls."""

    graph: object
    leaves: list  # the forward's flattened inputs, tensors replaced by the static copies the graph reads
    spec: object
    output: object
    calls: list[LoggedCall] = field(default_factory=list)


class _CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls :class:`ForwardGraphs` makes (a test can pass another)."""

    def __init__(self, pool) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self, fn: Callable[[], object]) -> object:
        with torch.cuda.graph(self._graph, pool=self._pool, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self._graph.replay()


class ForwardGraphs:
    """The CUDA graphs of one patched transformer (see the module docstring).

    Args:
        runtimes: the patch's layers, by name.
        config: the patch's :class:`~liteattn.integrations.LiteAttentionConfig`.
        fallbacks: the patch's counter of dense fallbacks.
        make_graph: ``make_graph(pool)`` returns an object with ``capture(fn)`` and ``replay()``; default CUDA graphs
            sharing one memory pool (a replay's outputs are copied out at once, so graphs may share it).
    """

    def __init__(self, runtimes: dict[str, LayerRuntime], config, fallbacks: Counter,
                 make_graph: Callable | None = None) -> None:
        self.runtimes = runtimes
        self.config = config
        self.fallbacks = fallbacks
        self._make_graph = make_graph
        self._pool = None
        self._graphs: dict[tuple, object] = {}
        self._seen: Counter = Counter()
        self.replays = 0

    # -- when a forward can be replayed -------------------------------------------------
    def key(self, info: ForwardInfo, args: tuple, kwargs: dict) -> tuple | None:
        """The forward's graph key, or None when it must run eagerly (grad enabled, no CUDA tensor input, an
        input that is neither a tensor nor a hashable constant)."""
        if torch.is_grad_enabled():
            return None
        leaves, spec = pytree.tree_flatten((args, kwargs))
        signature, on_cuda = [], False
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                on_cuda = on_cuda or leaf.is_cuda
                signature.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                signature.append(leaf)
            else:
                return None
        if not on_cuda and self._make_graph is None:
            return None
        step, config = info.step, self.config
        first = config.first_skipping_step
        if config.is_dense_step(step):
            phase = ("dense",)
        elif step == first:
            phase = ("fresh", config.step_kind(step))
        else:
            phase = ("list", (step - first) % 2, config.step_kind(step))
        # Tensors made in inference mode cannot be written outside it: a graph's static inputs belong to one mode.
        return (info.context, phase, torch.is_inference_mode_enabled(), str(spec), tuple(signature))

    def run(self, info: ForwardInfo, forward: Callable, args: tuple, kwargs: dict):
        """The forward's output through its graph (capturing it on the second sighting), or eagerly."""
        key = self.key(info, args, kwargs)
        if key is None:
            return forward(*args, **kwargs)
        captured = self._graphs.get(key)
        if captured is None:
            self._seen[key] += 1
            if self._seen[key] < 2:
                return forward(*args, **kwargs)
            captured = self._graphs[key] = self._capture(info, forward, args, kwargs)
        if captured is _FAILED or not self._ready(captured, info):
            return forward(*args, **kwargs)
        return self._replay(captured, info, args, kwargs)

    def _ready(self, captured: _Captured, info: ForwardInfo) -> bool:
        """Whether every skipping layer's state sits in the buffers the graph reads (after a generation reset)."""
        for call in captured.calls:
            if call.mode != "sparse":
                continue
            attention = call.runtime.state(info.context, info.generation).attention
            current = (attention._spent if attention.state is None else None) if call.fresh else attention.state
            if not _same_buffers(current, call.before):
                return False
        return True

    # -- capture and replay ------------------------------------------------------------
    def _capture(self, info: ForwardInfo, forward: Callable, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static, spec)
        if self._make_graph is None and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = (self._make_graph or _CudaGraph)(self._pool)
        saved = self._save()
        log: list[LoggedCall] = []
        for runtime in self.runtimes.values():
            runtime.log = log
        try:
            output = graph.capture(lambda: forward(*static_args, **static_kwargs))
        except Exception as err:  # noqa: BLE001 - any capture failure means: run this forward eagerly
            warnings.warn(f"liteattn: a transformer forward ({info.context}, step {info.step}) could not be captured "
                          f"in a CUDA graph and runs eagerly ({type(err).__name__}: {err})", stacklevel=4)
            return _FAILED
        finally:
            for runtime in self.runtimes.values():
                runtime.log = None
            self._restore(saved)  # the capture ran no kernel: its Python side effects are redone by each replay
        return _Captured(graph, static, spec, output, log)

    def _replay(self, captured: _Captured, info: ForwardInfo, args: tuple, kwargs: dict):
        leaves = pytree.tree_leaves((args, kwargs))
        for static, leaf in zip(captured.leaves, leaves):
            if isinstance(leaf, torch.Tensor) and static is not leaf:
                static.copy_(leaf)
        captured.graph.replay()
        self.replays += 1
        for call in captured.calls:
            self._redo(call, info)
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)

    def _redo(self, call: LoggedCall, info: ForwardInfo) -> None:
        """The Python side of one attention call of a replayed forward (as :meth:`LayerRuntime.attend` did it)."""
        state: ContextState = call.runtime.state(info.context, info.generation)
        history_index = None
        if call.mode == "sparse":
            attention = state.attention
            attention.set_threshold(call.threshold)
            attention._history.append(call.sparsity.clone())
            attention._spent = None
            after = copy.copy(call.after)
            after.calls = (attention.state.calls if attention.state is not None else 0) + 1
            attention.state = after
            attention.step += 1
            history_index = attention.step - 1
        elif call.mode == "fallback":
            count_fallback(self.fallbacks, call.runtime.name, call.reason)
        state.records.append(CallRecord(info.step, call.mode, history_index, None))

    # -- undoing a capture's Python side effects --------------------------------------
    def _save(self):
        saved = []
        for runtime in self.runtimes.values():
            contexts = {}
            for name, state in runtime.contexts.items():
                a = state.attention
                contexts[name] = (state, state.generation, len(state.records), a.state, a._spent, a.step,
                                  len(a._history), list(a._thresholds))
            saved.append((runtime, contexts))
        return saved, Counter(self.fallbacks)

    def _restore(self, saved) -> None:
        layers, fallbacks = saved
        for runtime, contexts in layers:
            for name in [n for n in runtime.contexts if n not in contexts]:
                del runtime.contexts[name]
            for name, (state, generation, records, current, spent, step, history, thresholds) in contexts.items():
                runtime.contexts[name] = state
                state.generation = generation
                del state.records[records:]
                a = state.attention
                a.state, a._spent, a.step, a._thresholds = current, spent, step, thresholds
                del a._history[history:]
        self.fallbacks.clear()
        self.fallbacks.update(fallbacks)


def _same_buffers(state, reference) -> bool:
    """Whether two skip states use the same (current, spare) buffers, in the same roles."""
    if state is None or reference is None:
        return False
    mine = (state.kv_num_blocks, state.kv_indices) + (state._spare or (None, None))
    theirs = (reference.kv_num_blocks, reference.kv_indices) + (reference._spare or (None, None))
    return all(a is not None and b is not None and a.data_ptr() == b.data_ptr() for a, b in zip(mine, theirs))
