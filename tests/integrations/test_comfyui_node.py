"""The LiteAttention node folder: its metadata and inputs everywhere, the node in a real ComfyUI when one is at hand.

The folder's module imports ComfyUI only when the node runs, so its inputs and
metadata are checked in CI. ``test_node_in_comfyui`` needs ComfyUI: set
``LITEATTN_COMFYUI`` to a ComfyUI source folder whose requirements are
installed in this Python; otherwise it is skipped. It runs
``tools/comfyui_check.py`` (ComfyUI headless on the CPU, the testbed loaded as
a Wan model, the node loaded by ComfyUI's custom-node loader) in a child
process, so ComfyUI's import-time setup stays out of the test session, at a
size that takes a minute or two on a CPU.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from liteattn.integrations import LiteAttentionConfig
from liteattn.integrations.comfyui import NEVER_SKIP, pv_dtype_from_input, qk_dtype_from_input, threshold_from_input

REPO = Path(__file__).resolve().parents[2]
NODE_FOLDER = REPO / "comfyui_liteattn"
TOOL = REPO / "tools" / "comfyui_check.py"
COMFYUI = os.environ.get("LITEATTN_COMFYUI")
CANNOT_IMPORT = 3  # the tool's exit status when ComfyUI cannot be imported


def _node_module():
    """comfyui_liteattn/nodes.py, imported as ComfyUI imports it: by path, without ComfyUI."""
    spec = importlib.util.spec_from_file_location("liteattn_node_under_test", NODE_FOLDER / "nodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_inputs():
    nodes = _node_module()
    assert nodes.NODE_CLASS_MAPPINGS == {"LiteAttention": nodes.LiteAttention}
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == {"LiteAttention"}
    node = nodes.LiteAttention
    assert node.RETURN_TYPES == ("MODEL",) and callable(getattr(node(), node.FUNCTION))
    inputs = node.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "threshold", "dense_steps"]
    assert list(inputs["optional"]) == ["calibration_profile", "qk_dtype", "pv_dtype"]
    kind, threshold = inputs["required"]["threshold"]
    assert kind == "FLOAT" and threshold["min"] == NEVER_SKIP and threshold["max"] < 0
    assert threshold_from_input(threshold["min"]) == -math.inf  # the widget can say "never skip"
    assert threshold_from_input(threshold["default"]) == threshold["default"]
    kind, dense_steps = inputs["required"]["dense_steps"]
    assert kind == "INT" and dense_steps["min"] == 0
    assert LiteAttentionConfig(dense_steps=dense_steps["default"]).dense_steps == dense_steps["default"]
    assert inputs["optional"]["calibration_profile"][1]["default"] == ""
    choices, qk_dtype = inputs["optional"]["qk_dtype"]
    assert [qk_dtype_from_input(c) for c in choices] == [None, "int8"]  # a combo: every choice means a setting
    assert qk_dtype_from_input(qk_dtype["default"]) is None  # 16-bit scores unless chosen
    choices, pv_dtype = inputs["optional"]["pv_dtype"]
    assert [pv_dtype_from_input(c) for c in choices] == [None, "fp8"]
    assert pv_dtype_from_input(pv_dtype["default"]) is None
    for _, options in list(inputs["required"].values()) + list(inputs["optional"].values()):
        assert options["tooltip"]


def test_node_metadata():
    """What ComfyUI and its registry read from the folder's pyproject.toml; the folder is not in the wheel."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((NODE_FOLDER / "pyproject.toml").read_text())
    assert meta["project"]["name"] and "comfyui" not in meta["project"]["name"].lower()
    assert meta["project"]["dependencies"] == ["liteattn"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    assert "Repository" in meta["project"]["urls"]
    library = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert library["tool"]["setuptools"]["packages"]["find"]["include"] == ["liteattn*"]


@pytest.mark.skipif(not COMFYUI, reason="LITEATTN_COMFYUI (a ComfyUI source folder) is not set")
@pytest.mark.parametrize("qk_dtype,pv_dtype", [("16-bit", "16-bit"), ("int8", "16-bit"), ("int8", "fp8")])
def test_node_in_comfyui(tmp_path, qk_dtype, pv_dtype):
    pytest.importorskip("diffusers")  # the testbed is a diffusers model
    if not (Path(COMFYUI) / "comfy" / "ldm" / "wan" / "model.py").is_file():
        pytest.skip(f"LITEATTN_COMFYUI={COMFYUI} is not a ComfyUI source folder")
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--comfyui", COMFYUI, "--frames", "2", "--steps", "4", "--dense-steps", "1",
         "--qk-dtype", qk_dtype, "--pv-dtype", pv_dtype, "--json", str(report_path)], capture_output=True, text=True, timeout=1200)
    if result.returncode == CANNOT_IMPORT:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert report_path.is_file(), result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert not failed and result.returncode == 0, json.dumps(failed, indent=1)
    assert report["checks"]["sparsity"]["unequal"] == 0 and report["checks"]["sparsity"]["node_sparsity"] > 0
