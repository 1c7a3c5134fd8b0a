"""The README's code runs: every ```python block is executed on the CPU, so the documentation cannot drift from
the code. A block that cannot run here (a GPU, a model download) is preceded by an HTML comment giving the
reason, ``<!-- no-test: needs a GPU and a model download -->``, and is only checked to compile."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?P<before>(?:[^\n]*\n){0,3})```python\n(?P<code>.*?)\n```", re.S)
MARKER = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>[^>]*?)\s*-->\s*$")


def _blocks() -> list[tuple[int, str, str | None]]:
    """(line, code, reason for not running it or None) for every python block, in order."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        before = match.group("before").rstrip("\n").splitlines()
        marker = MARKER.search(before[-1]) if before else None
        found.append((line, match.group("code"), marker.group("reason") if marker else None))
    return found


BLOCKS = _blocks()


def test_the_readme_has_blocks_to_run():
    assert len([b for b in BLOCKS if b[2] is None]) >= 1, "no python block would run: the test would prove nothing"


def test_every_marker_says_why_and_sits_on_a_python_block():
    text = README.read_text(encoding="utf-8")
    markers = re.findall(r"^\s*<!--\s*no-test:(.*?)-->\s*$", text, re.M)  # on a line of their own
    skipped = [reason for _, _, reason in BLOCKS if reason is not None]
    assert len(markers) == len(skipped), "a no-test marker must directly precede a ```python block"
    assert all(reason.strip() for reason in skipped), "a no-test marker must give its reason"


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, reason):
    compiled = compile(code, f"README.md:{line}", "exec")  # even a block that cannot run must be valid Python
    if reason is not None:
        pytest.skip(f"README.md:{line}: {reason}")
    exec(compiled, {"__name__": f"readme_block_{line}"})
