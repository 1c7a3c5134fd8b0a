"""The GPU's SM clock and board power while each case ran.

Why: under a power cap the clock is part of the result. On an H200 at its 700 W cap, a sparse call whose
key tiles came from memory more often (random tiles at the HunyuanVideo shape) ran at a median 1485 MHz
while the full walk (no skipping) ran at 1605 MHz, for about the same cycles per tile (lab/kernel-notes.md,
v15). A ratio to the linear ideal then measures the clock as much as the kernel, and the report should say which.

Samples come from ``nvidia-smi`` in a child process (every 20 ms), so sampling costs the timed GPU and the
timing loop nothing; where it is missing or fails, the columns stay empty and the run says why once.
"""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

__all__ = ["ClockSampler", "ClockSummary", "case_lines", "device_id", "host_now", "parse_samples", "summarize"]

QUERY = "--query-gpu=timestamp,clocks.sm,power.draw"


def host_now() -> float:
    """The host's wall clock in seconds: the time base of ``nvidia-smi``'s timestamps (local time, ms)."""
    return time.time()


@dataclass(frozen=True)
class ClockSummary:
    """Medians over the samples taken inside a case's timed batches (None without samples)."""

    sm_clock_mhz: float | None
    power_w: float | None
    samples: int


def parse_samples(lines: Iterable[str]) -> list[tuple[float, float, float]]:
    """``(host seconds, SM MHz, watts)`` per line of ``nvidia-smi --format=csv,noheader,nounits``; lines that
    do not parse (a header, ``[N/A]``) and a last line without its newline (cut by the sampler's stop, e.g. a
    power of "69" for "690.5") are left out."""
    samples = []
    for line in lines:
        if not line.endswith("\n"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return samples


def summarize(samples: Sequence[tuple[float, float, float]],
              windows: Sequence[tuple[float, float]]) -> ClockSummary:
    """Median clock and power of the samples that fall inside any of ``windows`` (host seconds)."""
    inside = [(mhz, watts) for t, mhz, watts in samples if any(a <= t <= b for a, b in windows)]
    if not inside:
        return ClockSummary(None, None, 0)
    return ClockSummary(statistics.median(m for m, _ in inside), statistics.median(w for _, w in inside),
                        len(inside))


def case_lines(samples: Sequence[tuple[float, float, float]],
               windows: Mapping[object, Sequence[tuple[float, float]]], error: str = "") -> list[str]:
    """One printable line per case of ``windows`` (case key -> its batches' host time spans): the case, its
    median SM clock and power, and the number of samples behind them; ``error`` (the sampler's) is appended,
    so a run without samples says why. A tuple key is printed as its parts."""
    lines = []
    for key, spans in windows.items():
        c = summarize(samples, spans)
        name = " ".join(map(str, key)) if isinstance(key, tuple) else str(key)
        lines.append(f"clocks {name} SM MHz median {c.sm_clock_mhz} power W median {c.power_w} "
                     f"samples {c.samples} {error or ''}".rstrip())
    return lines


class ClockSampler:
    """``nvidia-smi`` writing one sample per ``interval_ms`` to a temporary file until :meth:`stop`.

    ``device``: what ``nvidia-smi -i`` accepts (an index or a ``GPU-<uuid>``); ``command`` replaces the whole
    sampler command (tests). ``error`` says why there are no samples, when there are none. Use it as a context
    manager (or call :meth:`stop`); a sampler never stopped is ended when it is garbage collected or at exit, so
    no sampling process outlives the run."""

    def __init__(self, device: str | None = None, interval_ms: int = 20, command: list[str] | None = None):
        self.error = ""
        self._proc = None
        self._out = self._err = None
        if command is None:
            exe = shutil.which("nvidia-smi")
            if exe is None:
                self.error = "nvidia-smi not found"
                return
            command = [exe, QUERY, "--format=csv,noheader,nounits", "-lms", str(interval_ms)]
            if device is not None:
                command += ["-i", str(device)]
        try:
            self._out = tempfile.TemporaryFile("w+", errors="replace")
            self._err = tempfile.TemporaryFile("w+", errors="replace")
            self._proc = subprocess.Popen(command, stdout=self._out, stderr=self._err)
        except OSError as exc:
            self.error = f"could not start {command[0]}: {exc}"
            self._close_files()
            return
        self._finalizer = weakref.finalize(self, _end, self._proc)

    def __enter__(self) -> "ClockSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for_first_sample(self, timeout_s: float = 2.0) -> None:
        """Return once the sampler has written something (or exited, or ``timeout_s`` passed): the first cases
        timed would otherwise run before ``nvidia-smi`` has started."""
        end = time.monotonic() + timeout_s
        while self._proc is not None and self._proc.poll() is None and time.monotonic() < end:
            if os.fstat(self._out.fileno()).st_size > 0:
                return
            time.sleep(0.01)

    def stop(self) -> list[tuple[float, float, float]]:
        """End the sampling and return its samples (none if it never started or printed nothing usable)."""
        if self._proc is None:
            return []
        exited = self._proc.poll()
        self._finalizer()
        try:
            self._out.seek(0)
            text = self._out.read()
            samples = parse_samples(text.splitlines(keepends=True))
            self._err.seek(0)
            # nvidia-smi prints its complaints (e.g. "No devices were found") to stdout
            complaint = self._err.read().strip().splitlines() or text.strip().splitlines()
        except OSError as exc:
            samples, complaint = [], [f"reading its output failed: {exc}"]
        finally:
            self._close_files()
            self._proc = None
        if not samples and not self.error:
            why = complaint[0] if complaint else (f"exit code {exited}" if exited is not None else "")
            self.error = "nvidia-smi gave no samples" + (f" ({why})" if why else "")
        return samples

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            if f is not None:
                f.close()
        self._out = self._err = None


def _end(proc: subprocess.Popen) -> None:
    """Stop a sampling process: an interrupt first (as Ctrl-C ends nvidia-smi -lms), a kill if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def device_id() -> str | None:
    """The current CUDA device as ``nvidia-smi -i`` names it (its UUID: the index may be remapped by
    ``CUDA_VISIBLE_DEVICES``), or None when torch does not know it."""
    try:
        import torch

        return f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"
    except Exception:
        return None
