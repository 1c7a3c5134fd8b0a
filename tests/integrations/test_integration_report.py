"""Summary aggregates and tables, on hand-made call records."""
from __future__ import annotations

import json

import pytest

from liteattn.integrations.report import AttentionCall, ForwardCall, Summary


def _summary(profiled=True, transformers=("transformer",)):
    calls, forwards = [], []
    for t in transformers:
        for context in ("cond", "uncond"):
            for step in range(3):
                forwards.append(ForwardCall(t, context, step, 10.0 if profiled else None))
                for i, layer in enumerate(("blocks.0.attn1", "blocks.1.attn1")):
                    sparsity = 0.0 if step == 0 else 0.1 * step + 0.1 * i
                    mode = "dense_step" if step == 0 else "sparse"
                    calls.append(AttentionCall(t, context, layer, step, mode, sparsity, 2.0 if profiled else None))
    return Summary(calls, forwards, {"mask": 3}, header="liteattn: test")


def test_aggregates():
    s = _summary()
    steps = s.per_step()
    assert list(steps) == [0, 1, 2]
    assert steps[0] == {"sparsity": 0.0, "attention_ms": 8.0, "forward_ms": 20.0, "calls": 4, "dense": 4}
    assert steps[2]["sparsity"] == pytest.approx(0.25) and steps[2]["dense"] == 0
    layers = s.per_layer()
    assert layers["blocks.0.attn1"]["sparsity"] == pytest.approx((0.1 + 0.2) / 3)
    assert layers["blocks.1.attn1"]["calls"] == 6 and layers["blocks.1.attn1"]["attention_ms"] == 12.0
    assert s.sparsity == pytest.approx(sum(c.sparsity for c in s.calls) / 12)
    assert s.attention_ms == 24.0


def test_unprofiled_times_are_none_and_print_as_dashes():
    s = _summary(profiled=False)
    assert s.attention_ms is None and s.per_step()[1]["forward_ms"] is None
    assert " - " in s.table()


def test_layers_of_two_transformers_are_told_apart():
    s = _summary(transformers=("transformer", "transformer_2"))
    assert set(s.per_layer()) == {f"{t}:blocks.{i}.attn1" for t in ("transformer", "transformer_2") for i in (0, 1)}


def test_table_and_dict():
    s = _summary()
    text = str(s)
    assert text.splitlines()[0] == "liteattn: test"
    assert "contexts: cond, uncond" in text and "blocks.1.attn1" in text and "dense fallbacks: mask=3" in text
    data = json.loads(json.dumps(s.to_dict()))
    assert data["per_step"]["2"]["calls"] == 4 and len(data["calls"]) == 12 and data["fallbacks"] == {"mask": 3}


def test_empty_summary():
    s = Summary([], [])
    assert s.sparsity == 0.0 and s.attention_ms is None and s.per_step() == {} and "contexts: none" in str(s)
