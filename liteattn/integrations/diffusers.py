"""liteattn in diffusers video pipelines: the patch behind :func:`liteattn.integrations.apply`.

How the pieces meet (diffusers >= 0.42):

1. A dispatcher backend named ``"liteattn"`` is registered in diffusers'
   attention registry. Its name is an ``AttentionBackendName`` instance that is
   *not* added to the enum's members, so nothing global changes: the
   environment variable, ``attention_backend()`` and ``set_attention_backend``
   never select it. The registry is private API, hence the version guard.
2. Only the chosen self-attention modules get
   ``processor._attention_backend = liteattn``; cross-attention keeps its
   processor untouched. (``ModelMixin.set_attention_backend`` is not used: it
   also changes the process-wide default backend.)
3. A root ``ModelHook`` on the transformer reads the CFG context from
   diffusers' ``cache_context`` (through a ``StateManager``), counts steps and
   detects new generations. A hook on each patched module publishes that
   module's :class:`~liteattn.integrations.layer.LayerRuntime` to the backend
   for the duration of its forward: the dispatcher passes no layer identity.
4. Under context parallelism (``transformer.enable_parallelism(...)``, before
   or after ``apply``) a call comes with its parallel configuration and runs
   through diffusers' own Ulysses / ring functions with liteattn's forward op
   (:mod:`liteattn.integrations.parallel`).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass

import diffusers
import torch
from torch import nn

from . import timing
from .config import LiteAttentionConfig, describe_threshold
from .families import Family, family_of, select_layers
from .graphs import ForwardGraphs
from .layer import ForwardInfo, KeyPaddingMasks, LayerRuntime
from .report import AttentionCall, ForwardCall, Summary

MIN_DIFFUSERS = (0, 42)


def _check_diffusers() -> None:
    version = tuple(int(x) for x in re.findall(r"\d+", diffusers.__version__)[:2])
    if version < MIN_DIFFUSERS:
        raise ImportError(f"liteattn.integrations needs diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))} "
                          f"(its attention dispatcher and cache contexts); found {diffusers.__version__}")


_check_diffusers()

from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager  # noqa: E402
from diffusers.models import attention_dispatch as _dispatch  # noqa: E402

__all__ = ["LiteAttentionHandle", "apply", "new_generation", "remove", "summary"]

ROOT_HOOK = "liteattn_root"
LAYER_HOOK = "liteattn_layer"
PATCH_ATTR = "_liteattn_patch"
DEFAULT_CONTEXT = "default"  # the context of transformer calls made outside any cache_context

_active = threading.local()  # .layer: the LayerRuntime whose module is running, or None
_backend_name = None


# ---------------------------------------------------------------------------- dispatcher backend
def _liteattn_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, _parallel_config=None):
    """The dispatcher entry: route to the running patched layer (BSHD in and out)."""
    layer = getattr(_active, "layer", None)
    if layer is None:  # a routed processor called outside its module's forward: stock behaviour
        return _dispatch.dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                               parallel_config=_parallel_config)
    return layer.attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config)


def _backend():
    """The ``"liteattn"`` backend name, registered on first use."""
    global _backend_name
    if _backend_name is None:
        enum_cls, registry = _dispatch.AttentionBackendName, _dispatch._AttentionBackendRegistry
        if not all(hasattr(registry, a) for a in ("register", "_backends", "_supported_arg_names")):
            raise ImportError(f"liteattn.integrations: diffusers {diffusers.__version__} has no attention "
                              "backend registry it can extend")
        name = str.__new__(enum_cls, "liteattn")  # an instance, deliberately not an enum member
        name._name_, name._value_ = "LITEATTN", "liteattn"
        # Context parallelism is supported (liteattn.integrations.parallel): enable_parallelism() checks this.
        registry.register(name, supports_context_parallel=True)(_liteattn_backend)
        _backend_name = name
    return _backend_name


# ---------------------------------------------------------------------------- hooks
class _StepState(BaseState):
    """Step tracking of one transformer in one context."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.generation: int | None = None
        self.epoch: int | None = None
        self.calls = 0  # forwards since the generation started
        self.last_index: int | None = None
        self.last_timestep: float | None = None


class _RootHook(ModelHook):
    """Knows each forward's context, denoising step and generation.

    The step is the pipeline's ``CacheContext.step_index`` when it passes one
    (WanPipeline does); otherwise the number of forwards in this context since
    the generation started. A generation starts at the first call, when the
    step index does not increase, when the ``timestep`` goes *up* (denoising
    timesteps decrease), after ``new_generation()``, and after the pipeline
    resets stateful hooks at its end. Reading the timestep syncs the device
    once per forward, only for pipelines that pass no step index.
    """

    _is_stateful = True

    def __init__(self, patch: "_Patch") -> None:
        super().__init__()
        self.patch = patch
        self.steps = StateManager(_StepState)
        names = list(inspect.signature(type(patch.model).forward).parameters)[1:]
        self._timestep_pos = names.index("timestep") if "timestep" in names else None

    def new_forward(self, module, *args, **kwargs):
        outside = self._context() is None
        if outside:
            self.steps.set_context(CacheContext(DEFAULT_CONTEXT))
        try:
            info = self._advance(self._context(), args, kwargs)
            timer = timing.start(self.patch.device) if self.patch.config.timing else None
            self.patch.begin(info)
            try:
                if self.patch.graphs is not None:
                    return self.patch.graphs.run(info, self.fn_ref.original_forward, args, kwargs)
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                self.patch.end(info, timer)
        finally:
            if outside:
                self.steps.set_context(None)

    def reset_state(self, module):
        self.steps.reset()
        return module

    def _context(self) -> CacheContext | None:
        try:
            return self.steps.context
        except ValueError:
            return None

    def _advance(self, context: CacheContext, args, kwargs) -> ForwardInfo:
        state = self.steps.get_state()
        index = context.step_index
        timestep = self._timestep(context, args, kwargs) if index is None else None
        new = state.generation is None or state.epoch != self.patch.epoch
        if index is not None:
            new = new or state.last_index is None or index <= state.last_index
        elif timestep is not None and state.last_timestep is not None:
            new = new or timestep > state.last_timestep
        if new:
            state.generation, state.epoch, state.calls = next(self.patch.generations), self.patch.epoch, 0
        step = index if index is not None else state.calls
        state.calls += 1
        state.last_index, state.last_timestep = index, timestep
        return ForwardInfo(context.name, step, state.generation)

    def _timestep(self, context: CacheContext, args, kwargs) -> float | None:
        t = context.timestep
        if t is None:
            t = kwargs.get("timestep")
        if t is None and self._timestep_pos is not None and len(args) > self._timestep_pos:
            t = args[self._timestep_pos]
        if isinstance(t, torch.Tensor):
            return float(t.max()) if t.numel() else None
        return None if t is None else float(t)


class _LayerHook(ModelHook):
    """Publishes its module's :class:`LayerRuntime` to the backend while the module runs."""

    def __init__(self, patch: "_Patch", runtime: LayerRuntime) -> None:
        super().__init__()
        self.patch = patch
        self.runtime = runtime

    def pre_forward(self, module, *args, **kwargs):
        text_len = None
        if self.runtime.text_position is not None:
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            text_len = text.shape[1] if isinstance(text, torch.Tensor) else None
        self.runtime.enter(self.patch.forward, text_len)
        _active.layer = self.runtime
        return args, kwargs

    def post_forward(self, module, output):
        _active.layer = None
        self.runtime.exit()
        return output


# ---------------------------------------------------------------------------- one transformer
@dataclass
class _HookSite:
    """Where a hook went, and what to undo so the module is as it was."""

    module: nn.Module
    hook_name: str
    had_registry: bool
    had_forward_attr: bool

    @classmethod
    def register(cls, module: nn.Module, hook: ModelHook, hook_name: str) -> "_HookSite":
        site = cls(module, hook_name, hasattr(module, "_diffusers_hook"), "forward" in vars(module))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, hook_name)
        return site

    def unregister(self) -> None:
        registry = self.module._diffusers_hook
        registry.remove_hook(self.hook_name, recurse=False)
        if not registry.hooks:
            if not self.had_forward_attr:
                vars(self.module).pop("forward", None)
            if not self.had_registry:
                del self.module._diffusers_hook


@dataclass
class _SavedProcessor:
    """A patched module's processor as it was: restored exactly by ``remove``."""

    module: nn.Module
    processor: object
    replaced: bool  # the module got a private copy (the processor was shared with unpatched modules)
    had_own_backend: bool
    backend: object

    def restore(self) -> None:
        if self.replaced:
            self.module.processor = self.processor
        elif self.had_own_backend:
            self.processor._attention_backend = self.backend
        else:  # back to the class attribute (pop: a processor shared by two patched modules is restored twice)
            vars(self.processor).pop("_attention_backend", None)


class _Patch:
    """liteattn installed on one transformer."""

    def __init__(self, label: str, model: nn.Module, config: LiteAttentionConfig, family: Family | None,
                 layers: list[tuple[str, nn.Module]]) -> None:
        self.label, self.model, self.config, self.family = label, model, config, family
        self.layer_modules = layers
        self.fallbacks: Counter = Counter()
        self.masks = KeyPaddingMasks()
        self.generations = itertools.count()
        self.epoch = 0
        self.forward: ForwardInfo | None = None
        self.forward_records: dict[str, tuple[int, list[tuple[int, object]]]] = {}
        self.layers: dict[str, LayerRuntime] = {}
        self.graphs: ForwardGraphs | None = None
        self._sites: list[_HookSite] = []
        self._saved: list[_SavedProcessor] = []

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def install(self) -> None:
        backend = _backend()
        chosen = {id(module) for _, module in self.layer_modules}
        shared = Counter(id(m.processor) for m in self.model.modules()
                         if id(m) not in chosen and getattr(m, "processor", None) is not None)
        text_position = self.family.text_position if self.family else None
        # Read before any change: a processor shared by two patched modules must not record liteattn as original.
        originals = {id(m.processor): ("_attention_backend" in vars(m.processor), m.processor._attention_backend)
                     for _, m in self.layer_modules}
        for name, module in self.layer_modules:
            processor = module.processor
            saved = _SavedProcessor(module, processor, shared[id(processor)] > 0, *originals[id(processor)])
            if saved.replaced:
                module.processor = copy.copy(processor)
            module.processor._attention_backend = backend
            self._saved.append(saved)
            dense = functools.partial(_dispatch.dispatch_attention_fn, backend=saved.backend)
            runtime = LayerRuntime(name, self.config, text_position, dense, self.masks, self.fallbacks,
                                   profile_key=self.profile_key(name))
            self.layers[name] = runtime
            self._sites.append(_HookSite.register(module, _LayerHook(self, runtime), LAYER_HOOK))
        self._sites.append(_HookSite.register(self.model, _RootHook(self), ROOT_HOOK))
        _invalidate_registry_caches(self.model)
        self.graphs = ForwardGraphs(self.layers, self.config, self.fallbacks) if self.config.cuda_graph else None
        setattr(self.model, PATCH_ATTR, self)

    def uninstall(self) -> None:
        for site in reversed(self._sites):
            site.unregister()
        for saved in self._saved:
            saved.restore()
        self._sites, self._saved = [], []
        _invalidate_registry_caches(self.model)
        if getattr(self.model, PATCH_ATTR, None) is self:
            delattr(self.model, PATCH_ATTR)

    def profile_key(self, name: str) -> str:
        """A layer's name in a calibration profile and in ``handle.layers``: ``"transformer_2:"`` marks a pipeline's
        second transformer."""
        return name if self.label == "transformer" else f"{self.label}:{name}"

    @property
    def installed(self) -> bool:
        return getattr(self.model, PATCH_ATTR, None) is self

    # -- called by the root hook around each forward --------------------------------
    def begin(self, info: ForwardInfo) -> None:
        self.forward = info
        if self.forward_records.get(info.context, (None,))[0] != info.generation:
            self.forward_records[info.context] = (info.generation, [])

    def end(self, info: ForwardInfo, timer) -> None:
        self.forward = None
        _active.layer = None  # in case a layer raised before its post_forward
        self.masks.clear()
        self.forward_records[info.context][1].append(
            (info.step, timing.stop(timer) if timer is not None else None))

    def summary_rows(self) -> tuple[list[AttentionCall], list[ForwardCall]]:
        calls = []
        for runtime in self.layers.values():
            for context, state in runtime.contexts.items():
                history = state.attention.history
                for r in state.records:
                    sparsity = (history[r.history_index] if r.history_index is not None
                                else float(r.sparsity) if r.sparsity is not None else 0.0)
                    calls.append(AttentionCall(self.label, context, runtime.name, r.step, r.mode, sparsity,
                                               timing.elapsed_ms(r.timer)))
        forwards = [ForwardCall(self.label, context, step, timing.elapsed_ms(timer))
                    for context, (_, records) in self.forward_records.items() for step, timer in records]
        return calls, forwards


def _invalidate_registry_caches(model: nn.Module) -> None:
    """Hooks were added or removed under ``model``: diffusers' cached registry lists are stale."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


# ---------------------------------------------------------------------------- public API
class LiteAttentionHandle:
    """What :func:`apply` returns: the patch of a pipeline's transformer(s)."""

    def __init__(self, patches: list[_Patch], config: LiteAttentionConfig) -> None:
        self._patches = patches
        self.config = config

    @property
    def layers(self) -> list[str]:
        """Patched layer names (``"transformer_2:..."`` for a pipeline's second transformer)."""
        return [name if p.label == "transformer" else f"{p.label}:{name}" for p in self._patches for name in p.layers]

    def summary(self) -> Summary:
        """Sparsity per layer and step (and times with ``timing=True``) of the latest generation."""
        return _summary(self._patches)

    def new_generation(self) -> None:
        """The next forward of every context starts a new generation (fresh skip states)."""
        for patch in self._patches:
            patch.epoch += 1

    def attention(self, layer: str, context: str = DEFAULT_CONTEXT, transformer: str = "transformer"):
        """The :class:`~liteattn.LiteAttention` of ``layer`` in ``context``.

        Its ``state`` may be set (e.g. to a pre-computed
        :class:`~liteattn.SkipState`) before a generation starts: a state
        prepared here is adopted by the next generation instead of being reset.
        """
        patch = next((p for p in self._patches if p.label == transformer), None)
        if patch is None:
            raise ValueError(f"transformer: expected one of {[p.label for p in self._patches]}, got {transformer!r}")
        if layer not in patch.layers:
            raise ValueError(f"layer: {layer!r} is not patched; patched layers: {list(patch.layers)}")
        return patch.layers[layer].state(context).attention

    def patched(self) -> dict[str, tuple[nn.Module, list[str]]]:
        """Per transformer label (``"transformer"``, ``"transformer_2"``), the model and its patched layer names:
        what a calibration profile binds to."""
        return {p.label: (p.model, list(p.layers)) for p in self._patches}

    def layer_runtimes(self) -> dict[str, LayerRuntime]:
        """Every patched layer's :class:`~liteattn.integrations.layer.LayerRuntime`, by the names of :attr:`layers`:
        for tools that steer or observe each call (calibration sets ``runtime.steer``)."""
        return {p.profile_key(name): runtime for p in self._patches for name, runtime in p.layers.items()}

    def remove(self) -> None:
        """Undo the patch (same as :func:`remove` on the patched object)."""
        _uninstall([p for p in self._patches if p.installed], what="this handle")

    def __repr__(self) -> str:
        return (f"LiteAttentionHandle({len(self.layers)} layers in {[p.label for p in self._patches]}, "
                f"threshold={describe_threshold(self.config)}, dense_steps={self.config.first_skipping_step})")


def apply(pipe_or_transformer, threshold=None, *, config: LiteAttentionConfig | None = None,
          **overrides) -> LiteAttentionHandle:
    """See :func:`liteattn.integrations.apply`."""
    config = _resolve_config(threshold, config, overrides)
    targets = _targets(pipe_or_transformer)
    for label, model in targets:
        if getattr(model, PATCH_ATTR, None) is not None:
            raise ValueError(f"pipe_or_transformer: liteattn is already applied to {label} "
                             f"({type(model).__name__}); call liteattn.integrations.remove(...) first")
    plans = []
    for label, model in targets:  # select everything before touching anything
        family = family_of(model)
        plans.append(_Patch(label, model, config, family, select_layers(model, family, config)))
    if config.profile is not None:  # a profile made for another model is refused before anything changes
        config.profile.check_model({p.label: (p.model, [name for name, _ in p.layer_modules]) for p in plans},
                                   config.block_size)
    for patch in plans:
        patch.install()
    return LiteAttentionHandle(plans, config)


def remove(pipe_or_transformer) -> None:
    """See :func:`liteattn.integrations.remove`."""
    _uninstall(_patches_of(pipe_or_transformer), what=type(pipe_or_transformer).__name__)


def new_generation(pipe_or_transformer) -> None:
    """See :func:`liteattn.integrations.new_generation`."""
    for patch in _applied_patches(pipe_or_transformer):
        patch.epoch += 1


def summary(pipe_or_transformer) -> Summary:
    """See :func:`liteattn.integrations.summary`."""
    return _summary(_applied_patches(pipe_or_transformer))


def _resolve_config(threshold, config, overrides) -> LiteAttentionConfig:
    if config is None:
        config = LiteAttentionConfig()
    elif not isinstance(config, LiteAttentionConfig):
        raise ValueError(f"config: expected a LiteAttentionConfig or None, got {type(config).__name__}")
    if threshold is not None:
        overrides["threshold"] = threshold
    fields = {f.name for f in dataclasses.fields(LiteAttentionConfig)}
    for name in overrides:
        if name not in fields:
            raise ValueError(f"{name}: not a LiteAttentionConfig field; expected one of {sorted(fields)}")
    return dataclasses.replace(config, **overrides) if overrides else config


def _targets(obj) -> list[tuple[str, nn.Module]]:
    if isinstance(obj, nn.Module):
        return [("transformer", obj)]
    found = [(attr, getattr(obj, attr, None)) for attr in ("transformer", "transformer_2")]
    found = [(attr, model) for attr, model in found if isinstance(model, nn.Module)]
    if not found:
        raise ValueError("pipe_or_transformer: expected a diffusers pipeline with a .transformer, or a transformer "
                         f"nn.Module, got {type(obj).__name__}")
    return found


def _patches_of(obj) -> list[_Patch]:
    return [p for _, model in _targets(obj) if (p := getattr(model, PATCH_ATTR, None)) is not None]


def _applied_patches(obj) -> list[_Patch]:
    patches = _patches_of(obj)
    if not patches:
        raise ValueError(f"pipe_or_transformer: liteattn is not applied to this {type(obj).__name__}")
    return patches


def _uninstall(patches: list[_Patch], what: str) -> None:
    if not patches:
        warnings.warn(f"liteattn: remove() on {what}, which liteattn is not applied to; nothing to do", stacklevel=3)
    for patch in patches:
        patch.uninstall()


def _summary(patches: list[_Patch]) -> Summary:
    calls, forwards, fallbacks = [], [], Counter()
    for patch in patches:
        patch_calls, patch_forwards = patch.summary_rows()
        calls += patch_calls
        forwards += patch_forwards
        fallbacks.update(patch.fallbacks)
    config = patches[0].config
    tiles = "default" if config.block_size is None else "x".join(map(str, config.block_size))
    header = (f"liteattn: threshold {describe_threshold(config)}, dense_steps {config.first_skipping_step}, "
              f"{'' if config.skip_rule == 'carry' else 'skip rule ' + config.skip_rule + ', '}"
              f"{'' if config.qk_dtype is None else 'qk ' + config.qk_dtype + ', '}"
              f"{'' if config.pv_dtype is None else 'pv ' + config.pv_dtype + ', '}tiles {tiles}, "
              f"backend {config.backend}, {sum(len(p.layers) for p in patches)} patched layers")
    return Summary(calls, forwards, dict(fallbacks), header)
