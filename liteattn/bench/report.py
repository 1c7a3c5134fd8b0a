"""Plain-text tables and the JSON record of a run.

Why plain aligned text: the table is read in a terminal or a CI log and
pasted into issues; the JSON keeps every number plus the environment
(GPU, library versions, date, command line), so a result can be compared
with another run without guessing what produced it.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .results import Check, Ratio, Row

__all__ = ["environment", "format_checks", "format_ratios", "format_rows", "format_table", "write_json",
           "write_text"]


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [all(_is_number(r[i]) for r in cells if r[i] != "-") and any(r[i] != "-" for r in cells)
               for i in range(len(header))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_rows(rows: Iterable[Row]) -> str:
    header = ("shape", "method", "pattern", "s want", "s got", "median ms", "p20 ms", "p80 ms", "reps",
              "TFLOP/s", "eff TFLOP/s", "SM MHz", "status")
    body = [(r.shape, r.method, r.pattern, r.fraction if r.pattern else None, r.skipped if r.pattern else None,
             r.median_ms, r.p20_ms, r.p80_ms, r.reps or None, r.tflops, r.effective_tflops,
             None if r.sm_clock_mhz is None else round(r.sm_clock_mhz),
             r.status if r.status == "ok" else f"{r.status}: {_first_line(r.error)}") for r in rows]
    return format_table(header, body)


def format_ratios(ratios: Iterable[Ratio]) -> str:
    header = ("shape", "ratio", "pattern", "s", "value", "target", "verdict")
    body = [(r.shape, r.name, r.pattern, r.fraction if r.pattern else None, r.value, r.target,
             "ok" if r.ok else "MISSED") for r in ratios]
    return format_table(header, body)


def format_checks(checks: Iterable[Check]) -> str:
    header = ("shape", "check", "max abs err", "max |ref|", "rel L2 err", "status")
    body = [(c.shape, c.name, _sci(c.max_abs), _sci(c.ref_max_abs), _sci(c.rel_l2),
             c.status if not c.detail else f"{c.status}: {_first_line(c.detail)}") for c in checks]
    return format_table(header, body)


def _sci(value: float | None) -> str | None:
    return None if value is None else f"{value:.2e}"


def _first_line(text: str, limit: int = 100) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def environment(argv: Sequence[str] | None = None) -> dict:
    """Device, versions, date and command line. Never raises: missing pieces are reported as such."""
    import torch

    import liteattn

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "liteattn": liteattn.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        env["device"] = "cpu (no CUDA device)"
    return env


def _command(argv: Sequence[str] | None) -> str:
    """The command line as typed: ``python -m liteattn bench ...`` rather than the path of ``__main__.py``."""
    if argv is not None:
        return " ".join(argv)
    first = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if first == "__main__.py":
        first = "python -m liteattn"
    elif first == "-c":
        first = "python -c ..."
    return " ".join([first] + sys.argv[1:])


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as strict JSON (NaN/inf become the strings "nan"/"inf"), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    return path


def _jsonable(value):
    """Records to dicts, tuples to lists, non-finite floats to strings: a NaN error must still be written."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path
