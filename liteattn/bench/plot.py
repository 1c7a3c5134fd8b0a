"""Time vs skipped fraction, one panel per shape (matplotlib, imported only when plotting).

What to read off it: sparse methods should fall on or near the dashed ideal
line ``(1 - s) x cuDNN``; dense methods are horizontal lines, and liteattn's
dense line should sit at or below cuDNN's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .results import Row

__all__ = ["plot_rows"]

_METHOD_COLORS = {"sdpa-cudnn": "black", "sdpa-flash": "tab:gray", "liteattn-dense": "tab:blue",
                  "liteattn-detect": "tab:cyan", "liteattn-detect-list": "tab:purple", "flex": "tab:orange", "liteattn-sparse": "tab:green",
                  "liteattn-int8": "tab:red", "liteattn-int8-sparse": "tab:olive",
                  "liteattn-int8-fp8pv": "tab:brown", "liteattn-int8-fp8pv-sparse": "tab:pink"}
_PATTERN_STYLES = {"random": ("o", "-"), "random-uneven": ("D", "-."), "banded": ("s", "--"), "per-head": ("^", ":")}


def plot_rows(rows: Iterable[Row], path: str | Path, title: str = "") -> Path | None:
    """Write the PNG; returns its path, or None if no row has a time to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    ok = [r for r in rows if r.status == "ok" and r.median_ms is not None]
    shapes = list(dict.fromkeys(r.shape for r in ok))
    if not shapes:
        return None
    fig = Figure(figsize=(6.4 * len(shapes), 4.8), layout="constrained")
    axes = fig.subplots(1, len(shapes), squeeze=False)[0]
    for ax, shape in zip(axes, shapes):
        _panel(ax, [r for r in ok if r.shape == shape], shape)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _panel(ax, rows: list[Row], shape: str) -> None:
    dense = {r.method: r.median_ms for r in rows if r.pattern is None}
    for method, ms in dense.items():
        ax.axhline(ms, color=_METHOD_COLORS.get(method, "tab:purple"), linewidth=1.2, label=f"{method} (dense)")
    if "sdpa-cudnn" in dense:
        ax.plot([0, 1], [dense["sdpa-cudnn"], 0], color="black", linestyle="--", linewidth=1,
                label="ideal (1-s) x sdpa-cudnn")
    sparse_keys = dict.fromkeys((r.method, r.pattern) for r in rows if r.pattern is not None)
    for method, pattern in sparse_keys:
        pts = sorted((r.skipped, r.median_ms, r.p20_ms, r.p80_ms) for r in rows
                     if r.method == method and r.pattern == pattern)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        yerr = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        marker, style = _PATTERN_STYLES.get(pattern, ("x", "-."))
        ax.errorbar(xs, ys, yerr=yerr, color=_METHOD_COLORS.get(method, "tab:purple"), marker=marker,
                    linestyle=style, markersize=4, capsize=2, linewidth=1, label=f"{method} / {pattern}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("skipped fraction of tiles s")
    ax.set_ylabel("time per call (ms, median; bars p20-p80)")
    ax.set_title(shape)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")  # the corner the dense lines and the ideal line leave free
