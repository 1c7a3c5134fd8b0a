"""The documentation's code runs: every ```python block of README.md and docs/*.md is executed on the CPU, so the
documentation cannot drift from the code. A block that cannot run here (a GPU, a model download) is preceded by an HTML comment giving the
reason, ``<!-- no-test: needs a GPU and a model download -->``, and is only checked to compile."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<before>(?:[^\n]*\n){0,3})```python\n(?P<code>.*?)\n```", re.S)
MARKER = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>[^>]*?)\s*-->\s*$")


def _blocks() -> list[tuple[str, int, str, str | None]]:
    """(file, line, code, reason for not running it or None) for every python block of the docs, in order."""
    found = []
    for doc in DOCS:
        found += [(doc.relative_to(ROOT).as_posix(), *block) for block in _blocks_of(doc)]
    return found


def _blocks_of(doc: Path) -> list[tuple[int, str, str | None]]:
    text = doc.read_text(encoding="utf-8")
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        before = match.group("before").rstrip("\n").splitlines()
        marker = MARKER.search(before[-1]) if before else None
        found.append((line, match.group("code"), marker.group("reason") if marker else None))
    return found


BLOCKS = _blocks()


def test_the_docs_have_blocks_to_run():
    assert "README.md" in {doc for doc, _, _, _ in BLOCKS}
    assert len([b for b in BLOCKS if b[3] is None]) >= 2, "no python block would run: the test would prove nothing"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_marker_says_why_and_sits_on_a_python_block(doc):
    text = doc.read_text(encoding="utf-8")
    markers = re.findall(r"^\s*<!--\s*no-test:(.*?)-->\s*$", text, re.M)  # on a line of their own
    skipped = [reason for _, _, reason in _blocks_of(doc) if reason is not None]
    assert len(markers) == len(skipped), "a no-test marker must directly precede a ```python block"
    assert all(reason.strip() for reason in skipped), "a no-test marker must give its reason"


@pytest.mark.parametrize("doc,line,code,reason", BLOCKS, ids=[f"{doc}:{line}" for doc, line, _, _ in BLOCKS])
def test_doc_block_runs(doc, line, code, reason):
    compiled = compile(code, f"{doc}:{line}", "exec")  # even a block that cannot run must be valid Python
    if reason is not None:
        pytest.skip(f"{doc}:{line}: {reason}")
    exec(compiled, {"__name__": f"doc_block_{line}"})


def test_the_readme_example_skips_what_its_comment_says(capsys):
    """The README's first block states, in a comment, the skipped fractions it prints: the code must print them (the
    example exists to show skipping; random inputs showed none)."""
    doc, line, code, reason = next(b for b in BLOCKS if b[0] == "README.md")
    said = re.search(r"print\(attn\.history\).*?\[([-\d., ]+)\]", code)
    assert reason is None and said, "the README's first block prints attn.history and says what it prints"
    exec(compile(code, f"{doc}:{line}", "exec"), {"__name__": f"doc_block_{line}"})
    printed = capsys.readouterr().out.splitlines()[0]  # the block's only print
    assert [round(h, 2) for h in ast.literal_eval(printed)] == [float(x) for x in said.group(1).split(",")]
