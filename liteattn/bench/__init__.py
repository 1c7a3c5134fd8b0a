"""``liteattn bench``: liteattn against the dense attention users already run.

A user switches to liteattn only if, with nothing skipped, it is no slower
than the cuDNN/FlashAttention SDPA they use today, and if every skipped tile
turns into saved time. This package measures both in one run, side by side
with FlexAttention driven by the *same* tile mask, after checking that the
outputs agree.

Modules: :mod:`.registry` (shapes, methods, patterns as data), :mod:`.masks`
(tile masks), :mod:`.timing` (CUDA-event timing), :mod:`.clocks` (the SM
clock and power while each case ran), :mod:`.methods` (one callable per
method), :mod:`.results` (rows, checks, ratios), :mod:`.report` (table and
JSON), :mod:`.plot` (PNG), :mod:`.run` (the command).

Nothing here imports matplotlib or touches CUDA at import time, so the CLI
starts fast on any machine.
"""
