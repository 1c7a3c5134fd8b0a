"""The timed runs' warm-up (liteattn/testbed/runs.py): how many steps one warm-up generation takes."""
from __future__ import annotations

from types import SimpleNamespace

from liteattn.integrations import LiteAttentionConfig
from liteattn.testbed.runs import warmup_steps


def test_warmup_covers_the_dense_steps_and_every_step_range():
    assert warmup_steps(LiteAttentionConfig(dense_steps=3), 30) == 8  # a global threshold: no step ranges
    assert warmup_steps(LiteAttentionConfig(), 30) == 5
    assert warmup_steps(LiteAttentionConfig(dense_steps=28), 30) == 30  # never past the run's steps
    profiled = SimpleNamespace(profile=SimpleNamespace(range_starts=(4, 12, 20)), first_skipping_step=4)
    assert warmup_steps(profiled, 30) == 25
