"""lab/benchmarks/wan14b_shape.py: its CPU smoke mode and its message on a machine without CUDA."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[2] / "lab" / "benchmarks" / "wan14b_shape.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("wan14b_shape", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_explains_and_exits_0(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "r.json")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


def test_tiny_smoke_run_writes_every_mode(bench, tmp_path):
    out = tmp_path / "tiny.json"
    assert bench.main(["--tiny", "--steps", "2", "--warmup", "0", "--force-sparsity", "0.5",
                       "--threshold", "-4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tokens"] == 48 and report["layers"] == 2 and report["block_size"] == [16, 16]
    modes = report["modes"]
    assert list(modes) == ["stock", "dense", "liteattn", "forced"]
    assert all(len(m["step_ms"]) == 2 and m["mean_step_ms"] > 0 for m in modes.values())
    assert "attention_ms" not in modes["stock"]
    assert modes["dense"]["sparsity"] == [0.0, 0.0]
    assert modes["liteattn"]["sparsity"][0] == 0.0
    # Seeded at 50% with the diagonal kept: 3 x 3 tiles, so between 1/3 and 2/3 of them skipped on average.
    assert 0.0 < modes["forced"]["sparsity"][0] == modes["forced"]["sparsity"][1] < 2 / 3
    assert all(m.get("fallbacks", {}) == {} for m in modes.values())


def test_arguments_are_checked(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--force-sparsity", "1.0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "forced" not in bench.parse_args([]).modes  # nothing to force without --force-sparsity
