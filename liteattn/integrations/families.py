"""Which attention layers of a diffusers transformer liteattn patches.

Why per-family data and not a rule: diffusers does not say which attention
modules are self-attention. ``is_cross_attention`` exists on some classes
only (LTX's ``attn2`` lacks it), and joint attention (HunyuanVideo) receives
``encoder_hidden_states`` yet attends over one concatenated sequence. So each
supported family names its self-attention modules by regular expression, as
diffusers' own hooks do, and says where its text tokens sit.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from .config import LiteAttentionConfig

__all__ = ["FAMILIES", "Family", "family_of", "select_layers"]

logger = logging.getLogger("liteattn.integrations")


@dataclass(frozen=True)
class Family:
    """A transformer class and its self-attention layers.

    ``text_position`` is ``"end"`` for joint attention whose sequence is the
    video tokens followed by the ``encoder_hidden_states`` tokens, None when
    text only enters through cross-attention.
    """

    class_name: str
    self_attention: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    text_position: str | None = None


FAMILIES = (
    Family("WanTransformer3DModel", (r"^blocks\.\d+\.attn1$",)),
    Family("LTXVideoTransformer3DModel", (r"^transformer_blocks\.\d+\.attn1$",)),
    Family(
        "HunyuanVideoTransformer3DModel",
        (r"^(single_)?transformer_blocks\.\d+\.attn$",),
        # The token refiner attends over text tokens only.
        exclude=(r"^context_embedder\.",),
        text_position="end",
    ),
)


def family_of(model: nn.Module) -> Family | None:
    """The family of ``model``'s class or of its nearest known base class."""
    by_name = {f.class_name: f for f in FAMILIES}
    for cls in type(model).__mro__:
        if cls.__name__ in by_name:
            return by_name[cls.__name__]
    return None


def select_layers(model: nn.Module, family: Family | None, config: LiteAttentionConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every self-attention layer to patch, in model order.

    Raises ``ValueError`` when nothing matches (naming ``exclude`` when it
    excluded every layer ``include`` selects) and ``NotImplementedError`` for
    an unknown family without ``include`` or for a layer whose processor calls
    SDPA directly instead of diffusers' attention dispatcher.
    """
    include = config.include if config.include is not None else (family.self_attention if family else None)
    if include is None:
        known = ", ".join(f.class_name for f in FAMILIES)
        raise NotImplementedError(
            f"NYI: liteattn does not know which layers of {type(model).__name__} are self-attention "
            f"(known: {known}); pass include=(regex, ...) naming them, e.g. include=(r'attn1$',)"
        )
    exclude = (family.exclude if family else ()) + config.exclude
    chosen, excluded = [], []
    for name, module in model.named_modules():
        if not any(re.search(p, name) for p in include):
            continue
        processor = getattr(module, "processor", None)
        if processor is None:
            logger.debug("liteattn: %s matches include but is not an attention module", name)
            continue
        if any(re.search(p, name) for p in exclude):
            logger.info("liteattn: %s stays dense (excluded)", name)
            excluded.append(name)
            continue
        if getattr(module, "is_cross_attention", False):
            logger.info("liteattn: %s stays dense (cross-attention)", name)
            continue
        if not hasattr(processor, "_attention_backend"):
            raise NotImplementedError(
                f"NYI: {name} uses {type(processor).__name__}, which calls scaled_dot_product_attention directly "
                "rather than diffusers' attention dispatcher (e.g. CogVideoX); liteattn cannot route it"
            )
        logger.debug("liteattn: patching %s", name)
        chosen.append((name, module))
    if not chosen and excluded and any(any(re.search(p, name) for p in config.exclude) for name in excluded):
        # The layers were there; the user's exclude removed the last of them (blaming include would send the
        # user to the wrong option).
        raise ValueError(f"exclude: {config.exclude!r} leaves no self-attention layer of {type(model).__name__} to "
                         f"patch (it excludes all {len(excluded)} that include selects, e.g. {excluded[0]!r}); "
                         "nothing would run through liteattn: narrow exclude, or leave the model unpatched")
    if not chosen:
        raise ValueError(f"include: no self-attention layer of {type(model).__name__} matches {include!r}")
    return chosen
