"""Optional timers for attention calls and transformer forwards.

Why events that are read later: on a GPU, reading a time right after a call
would sync the device on every layer and distort what it measures. A CUDA
event pair is recorded around the call and only read when the summary is
built, after the run. On a CPU the work is synchronous, so
``time.perf_counter`` is exact and cheap.
"""
from __future__ import annotations

import time

import torch

__all__ = ["elapsed_ms", "start", "stop"]


def start(device: torch.device):
    """A running timer for work about to be queued on ``device``."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def stop(timer):
    """The finished timer: an event pair, or the elapsed seconds."""
    if isinstance(timer, torch.cuda.Event):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return timer, end
    return time.perf_counter() - timer


def elapsed_ms(timer) -> float | None:
    """Milliseconds of a finished timer (waits for its end event); None when not timed."""
    if timer is None:
        return None
    if isinstance(timer, tuple):
        begin, end = timer
        end.synchronize()
        return begin.elapsed_time(end)
    return timer * 1000.0
