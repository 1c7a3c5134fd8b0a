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
JSON), :mod:`.plot` (PNG), :mod:`.config` (a run's settings), :mod:`.run`
(the command) and :mod:`.runner` (the GPU run).

"Dense" in the method names means what it means for attention: every tile
computed. ``liteattn-dense`` is liteattn with skipping off
(``enabled=False``), which its kernels run as the full walk (every key tile
by position, no list read; :mod:`liteattn.kernels.dispatch`).

Nothing here imports matplotlib or touches CUDA at import time, so the CLI
starts fast on any machine.
"""
