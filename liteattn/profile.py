"""Calibration profiles: the thresholds chosen for one model, in a versioned, readable JSON file.

Why a file bound to the model: a threshold only means something for the
attention it was measured on. The same -1.5 skips 1 % of one model's tiles
and 60 % of another's, and a table of per-layer thresholds applied to a model
with other layers would silently shift every row. So a profile names what it
was calibrated on: each transformer's class, a hash of its configuration, its
self-attention layers, their heads and head_dim, the tile size and the token
count. :func:`liteattn.apply` refuses a profile for another model with a
``ValueError`` that names what differs, and a token count the profile's rule
does not cover is refused at the first attention call.

Why a token rule: calibrating at every resolution is expensive, and a
threshold's effect grows with the number of key tiles a row sums over. The
rule says what the profile does at another token count ``S`` than its own
``S0``:

- ``"exact"``: refuse it;
- ``"same"``: use the thresholds as calibrated;
- ``"log2_shift"``: ``threshold - log2(S / S0)``, capped at
  :data:`MAX_DERIVED_THRESHOLD`: the skipped mass per row stays the same
  when a row sums over ``S / S0`` times as many tiles (ModelOpt's
  ``threshold = scale_factor / seq_k`` in linear units).

What a profile holds beside the table: the budget it was calibrated for, the
sparsity and quality measured on the calibration inputs (and on held-out
inputs when given), and how it was made (inputs, search, date, version), so a
reader can judge it without running it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FORMAT", "MAX_DERIVED_THRESHOLD", "ModelBinding", "Profile", "TOKEN_RULES", "VERSION", "as_profile",
           "config_hash", "load_profile", "model_binding", "write_json_atomic"]

FORMAT = "liteattn-calibration-profile"
VERSION = 1
TOKEN_RULES = ("exact", "same", "log2_shift")
# Thresholds a token rule derives stay at or below this (liteattn takes negative thresholds only; closer to 0 than
# this, a rule would mark nearly every tile that does not raise a row's maximum).
MAX_DERIVED_THRESHOLD = -0.125
SKIP_RULES = ("carry", "per_call")


def config_hash(model) -> str:
    """A hash of a diffusers model's configuration (its public keys), with its class name.

    Private keys (``_name_or_path``, ``_diffusers_version``, ...) are left out:
    they say where the model came from, not what it computes.
    """
    config = getattr(model, "config", None)
    items = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    text = json.dumps({"class": type(model).__name__, "config": items}, sort_keys=True, default=_plain)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _plain(value):
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


@dataclass(frozen=True)
class ModelBinding:
    """What a profile requires of one transformer of the model it was calibrated on."""

    class_name: str
    config_hash: str
    layers: tuple[str, ...]
    heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return {"class": self.class_name, "config_hash": self.config_hash, "layers": list(self.layers),
                "heads": self.heads, "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ModelBinding":
        try:
            return cls(str(data["class"]), str(data["config_hash"]), tuple(str(x) for x in data["layers"]),
                       int(data["heads"]), int(data["head_dim"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"profile: {where}: expected class, config_hash, layers, heads and head_dim "
                             f"({type(err).__name__}: {err})") from None


def _heads(module) -> tuple[int, int]:
    """``(heads, head_dim)`` of a diffusers attention module."""
    heads = int(getattr(module, "heads", 0) or 0)
    to_q = getattr(module, "to_q", None)
    inner = getattr(to_q, "out_features", None) or getattr(module, "inner_dim", None)
    if not heads or not inner:
        raise ValueError(f"pipe_or_transformer: cannot read the heads of attention module {type(module).__name__}")
    return heads, int(inner) // heads


def model_binding(model, layer_names) -> ModelBinding:
    """The binding of ``model`` with its patched self-attention ``layer_names``."""
    modules = dict(model.named_modules())
    shapes = {_heads(modules[name]) for name in layer_names}
    if len(shapes) != 1:
        raise ValueError(f"pipe_or_transformer: the self-attention layers differ in heads/head_dim {sorted(shapes)}; "
                         "a profile binds one shape per transformer")
    heads, head_dim = shapes.pop()
    return ModelBinding(type(model).__name__, config_hash(model), tuple(layer_names), heads, head_dim)


def _threshold_out(t: float):
    return "-inf" if t == -math.inf else t


def _threshold_in(value, where: str) -> float:
    if value == "-inf":
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value < 0 or math.isnan(value):
        raise ValueError(f"profile: {where}: expected a negative number or \"-inf\", got {value!r}")
    return float(value)


@dataclass(frozen=True, eq=False)
class Profile:
    """Per-layer, per-step-range thresholds and the dense first steps for one model.

    Args:
        models: per transformer label (``"transformer"``, ``"transformer_2"``), its :class:`ModelBinding`.
        tiles: ``(block_m, block_n)`` the thresholds were calibrated with.
        tokens: the self-attention sequence length calibrated at.
        token_rule: what other token counts get (see the module docstring).
        steps: denoising steps per generation calibrated for.
        dense_steps: the first steps run the model's own attention.
        range_starts: the first step of each step range; the first is ``dense_steps``. A step uses the last range
            that starts at or before it, so steps past ``steps`` use the last range.
        thresholds: per layer (``"blocks.0.attn1"``; ``"transformer_2:blocks.0.attn1"`` for a second transformer),
            one threshold per range (``-inf``: the layer never marks in that range).
        skip_rule: the rule calibrated for, ``"carry"`` (liteattn) or ``"per_call"`` (skip-softmax).
        name: a short label.
        budget, measured, calibration: what it was calibrated for, what was measured, how it was made (free-form,
            JSON-ready).
    """

    models: dict
    tiles: tuple[int, int]
    tokens: int
    token_rule: str
    steps: int
    dense_steps: int
    range_starts: tuple[int, ...]
    thresholds: dict
    skip_rule: str = "carry"
    name: str = ""
    budget: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models or not all(isinstance(b, ModelBinding) for b in self.models.values()):
            raise ValueError("profile: models: expected at least one ModelBinding by transformer label")
        tiles = tuple(int(x) for x in self.tiles)
        if len(tiles) != 2 or min(tiles) < 1:
            raise ValueError(f"profile: tiles: expected (block_m, block_n), got {self.tiles!r}")
        object.__setattr__(self, "tiles", tiles)
        for name in ("tokens", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"profile: {name}: expected a positive int, got {value!r}")
        if self.token_rule not in TOKEN_RULES:
            raise ValueError(f"profile: token_rule: expected one of {TOKEN_RULES}, got {self.token_rule!r}")
        if self.skip_rule not in SKIP_RULES:
            raise ValueError(f"profile: skip_rule: expected one of {SKIP_RULES}, got {self.skip_rule!r}")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"profile: dense_steps: expected an int >= 0, got {self.dense_steps!r}")
        starts = tuple(int(s) for s in self.range_starts)
        if not starts or starts[0] != self.dense_steps or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"profile: range_starts: expected ascending first steps starting at dense_steps="
                             f"{self.dense_steps}, got {list(self.range_starts)}")
        object.__setattr__(self, "range_starts", starts)
        known = {self.layer_key(label, name) for label, b in self.models.items() for name in b.layers}
        table = {}
        for layer, row in self.thresholds.items():
            if layer not in known:
                raise ValueError(f"profile: thresholds: layer {layer!r} is not one of the bound layers")
            row = tuple(_threshold_in(t, f"thresholds[{layer!r}]") for t in row)
            if len(row) != len(starts):
                raise ValueError(f"profile: thresholds[{layer!r}]: expected {len(starts)} values (one per step "
                                 f"range), got {len(row)}")
            table[layer] = row
        missing = sorted(known - set(table))
        if missing:
            raise ValueError(f"profile: thresholds: no row for layers {missing}")
        object.__setattr__(self, "thresholds", table)

    # -- lookups -------------------------------------------------------------------------
    @staticmethod
    def layer_key(label: str, name: str) -> str:
        """A layer's key in :attr:`thresholds`: its module name, prefixed ``"label:"`` past the first transformer."""
        return name if label == "transformer" else f"{label}:{name}"

    def range_index(self, step: int) -> int:
        """The step range ``step`` falls in (0 for dense steps)."""
        index = 0
        for i, start in enumerate(self.range_starts):
            if step >= start:
                index = i
        return index

    @property
    def never_marks(self) -> bool:
        """Whether every layer's every threshold is -inf (the profile is dense attention)."""
        return all(t == -math.inf for row in self.thresholds.values() for t in row)

    def adjusted(self, threshold: float, tokens: int) -> float:
        """``threshold`` for a sequence of ``tokens`` under the token rule (``ValueError`` where it refuses)."""
        if tokens == self.tokens or threshold == -math.inf or self.token_rule == "same":
            return threshold
        if self.token_rule == "exact":
            raise ValueError(f"profile: calibrated for {self.tokens} tokens and its token rule is 'exact'; this "
                             f"attention call has {tokens} (calibrate at this size, or load the profile and use "
                             "profile.with_token_rule('same' or 'log2_shift'))")
        return min(threshold - math.log2(tokens / self.tokens), MAX_DERIVED_THRESHOLD)

    def layer_schedule(self, layer: str, tokens: int) -> tuple[tuple[int, float], ...]:
        """``((first_step, threshold), ...)`` of ``layer`` at ``tokens`` tokens."""
        row = self.thresholds.get(layer)
        if row is None:
            raise ValueError(f"profile: has no thresholds for layer {layer!r}; it was calibrated for "
                             f"{sorted(self.thresholds)[:4]}{' ...' if len(self.thresholds) > 4 else ''}")
        return tuple((start, self.adjusted(t, tokens)) for start, t in zip(self.range_starts, row))

    def threshold(self, layer: str, step: int, tokens: int | None = None) -> float:
        """``layer``'s threshold at ``step`` (``tokens`` default: the calibrated count); -inf on dense steps."""
        if step < self.dense_steps:
            return -math.inf
        return self.layer_schedule(layer, self.tokens if tokens is None else tokens)[self.range_index(step)][1]

    def with_token_rule(self, rule: str) -> "Profile":
        """The same profile with another token rule."""
        return Profile(**{**self._fields(), "token_rule": rule})

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    # -- binding -------------------------------------------------------------------------
    def check_model(self, targets: dict, block_size: tuple[int, int] | None) -> None:
        """Refuse a model this profile was not calibrated for.

        Args:
            targets: per transformer label, ``(model, patched layer names)``, as :func:`liteattn.apply` selected them.
            block_size: the configuration's tiles (None: liteattn's default for the head_dim).

        Raises:
            ValueError: naming the first thing that differs (transformers, class, configuration, layers, heads,
                head_dim, tiles).
        """
        from .kernels import default_block_sizes

        if set(targets) != set(self.models):
            raise ValueError(f"profile: calibrated for transformers {sorted(self.models)}, applied to "
                             f"{sorted(targets)}")
        for label, (model, names) in targets.items():
            want, got = self.models[label], model_binding(model, names)
            where = f"profile: {label}: calibrated for"
            if got.class_name != want.class_name:
                raise ValueError(f"{where} a {want.class_name}, applied to a {got.class_name}")
            if got.config_hash != want.config_hash:
                raise ValueError(f"{where} a {want.class_name} whose configuration hashes to {want.config_hash}; this "
                                 f"one's hashes to {got.config_hash} (another model, size or variant)")
            if got.layers != want.layers:
                extra, lost = sorted(set(got.layers) - set(want.layers)), sorted(set(want.layers) - set(got.layers))
                raise ValueError(f"{where} layers {list(want.layers)[:3]}...; the patched layers differ (not in the "
                                 f"profile: {extra[:4]}, missing: {lost[:4]}; include/exclude must match)")
            if (got.heads, got.head_dim) != (want.heads, want.head_dim):
                raise ValueError(f"{where} {want.heads} heads of {want.head_dim}, applied to {got.heads} heads of "
                                 f"{got.head_dim}")
            tiles = tuple(block_size) if block_size is not None else default_block_sizes(got.head_dim)
            if tiles != self.tiles:
                raise ValueError(f"{where} tiles {self.tiles[0]}x{self.tiles[1]}, applied with "
                                 f"{tiles[0]}x{tiles[1]} (block_size)")

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON form (thresholds -inf written as ``"-inf"``)."""
        return {
            "format": FORMAT, "version": VERSION, "name": self.name,
            "model": {label: b.to_dict() for label, b in self.models.items()},
            "tiles": list(self.tiles), "tokens": self.tokens, "token_rule": self.token_rule,
            "steps": self.steps, "dense_steps": self.dense_steps, "skip_rule": self.skip_rule,
            "range_starts": list(self.range_starts),
            "thresholds": {layer: [_threshold_out(t) for t in row] for layer, row in self.thresholds.items()},
            "budget": self.budget, "measured": self.measured, "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, data) -> "Profile":
        """Read the JSON form; a ``ValueError`` names the field that is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"profile: expected a liteattn calibration profile (\"format\": \"{FORMAT}\"), got "
                             f"{str(data.get('format') if isinstance(data, dict) else type(data).__name__)!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"profile: expected format version {VERSION}, got {data.get('version')!r} (made by "
                             "another liteattn version; calibrate again)")
        try:
            models = {label: ModelBinding.from_dict(b, f"model[{label!r}]") for label, b in data["model"].items()}
            return cls(models=models, tiles=tuple(data["tiles"]), tokens=data["tokens"],
                       token_rule=data["token_rule"], steps=data["steps"], dense_steps=data["dense_steps"],
                       range_starts=tuple(data["range_starts"]), thresholds=dict(data["thresholds"]),
                       skip_rule=data.get("skip_rule", "carry"), name=str(data.get("name", "")),
                       budget=dict(data.get("budget", {})), measured=dict(data.get("measured", {})),
                       calibration=dict(data.get("calibration", {})))
        except KeyError as err:
            raise ValueError(f"profile: missing field {err.args[0]!r}") from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"profile: a field has the wrong type ({err})") from None

    def save(self, path) -> Path:
        """Write the profile to ``path`` atomically (a reader sees the old file or the new one, never a part)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Profile":
        """Read a profile file (``ValueError`` naming ``profile`` for a missing or malformed one)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile: expected the path of a calibration profile file, got {str(path)!r} (no such "
                             "file)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"profile: {str(path)!r} is not a JSON profile ({err})") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """A few lines for a person: what it binds, its table, what was measured."""
        lines = [f"liteattn calibration profile {self.name!r}: {', '.join(b.class_name for b in self.models.values())}"
                 f", {self.tokens} tokens (rule {self.token_rule}), tiles {self.tiles[0]}x{self.tiles[1]}, "
                 f"{self.steps} steps, first {self.dense_steps} dense, rule {self.skip_rule}",
                 "step ranges start at " + ", ".join(map(str, self.range_starts))]
        width = max(len(k) for k in self.thresholds)
        for layer, row in self.thresholds.items():
            lines.append(f"  {layer:<{width}}  " + "  ".join(f"{t:6g}" for t in row))
        for where, values in self.measured.items():
            if isinstance(values, dict):
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
                lines.append(f"measured on {where}: {shown}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Profile({self.name!r}, {len(self.thresholds)} layers x {len(self.range_starts)} step ranges, "
                f"{self.tokens} tokens, dense_steps={self.dense_steps})")


def as_profile(value) -> Profile:
    """A :class:`Profile` from itself or from the path of a profile file."""
    if isinstance(value, Profile):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Profile.load(value)
    raise ValueError(f"profile: expected the path of a calibration profile or a liteattn.calibration.Profile, got "
                     f"{type(value).__name__}")


def load_profile(path) -> Profile:
    """:meth:`Profile.load`."""
    return Profile.load(path)


def write_json_atomic(path, data) -> Path:
    """Write ``data`` as readable JSON to ``path`` through a temporary file in the same folder and a rename.

    Why: a calibration takes hours and is resumable; a crash or a full disk
    while writing must leave the previous file whole, not a truncated one that
    the next run cannot read. The temporary file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(data) + "\n"  # serialised first: a value JSON cannot hold fails before any file is touched
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _dumps(data, indent: int = 0) -> str:
    """JSON with objects one key a line and lists of numbers or strings on one line (a threshold table reads as
    a table). Non-finite floats are refused: JSON has none."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(data, dict):
        if not data:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(data, (list, tuple)):
        if all(not isinstance(x, (dict, list, tuple)) for x in data):
            return "[" + ", ".join(json.dumps(x, allow_nan=False) for x in data) + "]"
        return "[\n" + ",\n".join(inner + _dumps(x, indent + 1) for x in data) + "\n" + pad + "]"
    return json.dumps(data, allow_nan=False)
