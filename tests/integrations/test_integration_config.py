"""LiteAttentionConfig: normalised once, frozen, and every bad field named in its error."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from liteattn.integrations import LiteAttentionConfig
from liteattn.integrations.config import describe_threshold


def test_defaults():
    config = LiteAttentionConfig()
    assert config.threshold == -10.0 and config.dense_steps == 0 and config.include is None
    assert config.threshold_at(0) == config.threshold_at(99) == -10.0
    assert not config.is_dense_step(0)


def test_schedule_and_dense_steps():
    config = LiteAttentionConfig(threshold=[-math.inf, -8, -6.5], dense_steps=2, block_size=[32, 64],
                                 include="attn1$", must_do=[(16, 32), [0, 8]])
    assert config.threshold == (-math.inf, -8.0, -6.5)
    assert [config.threshold_at(s) for s in range(5)] == [-math.inf, -8.0, -6.5, -6.5, -6.5]
    assert [config.is_dense_step(s) for s in range(3)] == [True, True, False]
    assert config.block_size == (32, 64)
    assert config.include == ("attn1$",)
    assert config.must_do == ((0, 8), (16, 32))
    assert describe_threshold(config) == "[-inf, -8, -6.5]"


def test_frozen_and_replace_validates():
    config = LiteAttentionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = -5.0
    with pytest.raises(ValueError, match="threshold"):
        dataclasses.replace(config, threshold=1.0)


@pytest.mark.parametrize("field,value,message", [
    ("threshold", 0.0, "threshold"),
    ("threshold", "low", "threshold"),
    ("threshold", [], "threshold"),
    ("threshold", [-5.0, 2.0], "threshold"),
    ("dense_steps", -1, "dense_steps"),
    ("dense_steps", 1.5, "dense_steps"),
    ("dense_steps", True, "dense_steps"),
    ("block_size", (24, 16), "block_size"),
    ("block_size", 64, "block_size"),
    ("backend", "cuda", "backend"),
    ("include", ("attn[",), "include"),
    ("exclude", (3,), "exclude"),
    ("text_tokens", "dense", "text_tokens"),
    ("must_do", [(5, 5)], "must_do"),
    ("must_do", [(-1, 5)], "must_do"),
    ("must_do", [5], "must_do"),
    ("profile", "yes", "profile"),
])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        LiteAttentionConfig(**{field: value})


def test_importing_the_integrations_does_not_import_diffusers():
    code = ("import sys, liteattn, liteattn.integrations as li; "
            "li.LiteAttentionConfig(threshold=-6.0); "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
