"""Budgets parse and refuse what they cannot mean; profile files are versioned, readable, checked field by field
when read, and written atomically."""
from __future__ import annotations

import json
import math
import os

import pytest

from liteattn.calibration import Budget, Profile, load_profile
from liteattn.profile import ModelBinding, write_json_atomic


def _binding(layers=("blocks.0.attn1", "blocks.1.attn1")):
    return ModelBinding("WanTransformer3DModel", "sha256:0123", tuple(layers), 4, 64)


def _profile(**changes):
    fields = dict(models={"transformer": _binding()}, tiles=(128, 128), tokens=2048, token_rule="log2_shift",
                  steps=20, dense_steps=3, range_starts=(3, 11),
                  thresholds={"blocks.0.attn1": [-1.5, -1.0], "blocks.1.attn1": ["-inf", -0.5]}, name="t")
    fields.update(changes)
    return Profile(**fields)


@pytest.mark.parametrize("text,metric,value,aggregate", [
    ("psnr>=32", "psnr", 32.0, "mean"), (" ssim >= 0.97 ", "ssim", 0.97, "mean"),
    ("worst:psnr>=30", "psnr", 30.0, "worst"), ("rel_error<=0.05", "rel_error", 0.05, "mean"),
    ("sparsity>=0.4", "sparsity", 0.4, "mean"), ("marginal_l1<=0.05", "marginal_l1", 0.05, "mean"),
])
def test_budgets_parse(text, metric, value, aggregate):
    budget = Budget.parse(text)
    assert (budget.metric, budget.value, budget.aggregate) == (metric, value, aggregate)
    assert Budget.parse(str(budget)) == budget


@pytest.mark.parametrize("text,message", [
    ("psnr<=32", "psnr takes >="), ("rel_error>=0.1", "rel_error takes <="), ("lpips<=0.1", "expected one of"),
    ("ssim>=1.5", r"ssim bound expected in \(0, 1\]"), ("sparsity>=0", "sparsity bound expected"),
    ("psnr 32", "expected 'psnr>=DB'"), ("worst:sparsity>=0.3", "aggregate expected"),
])
def test_bad_budgets_are_refused(text, message):
    with pytest.raises(ValueError, match=f"^budget: .*{message}"):
        Budget.parse(text)


def test_budget_reduce_and_margin():
    mean, worst = Budget("psnr", 30.0, margin=1.0), Budget("psnr", 30.0, aggregate="worst")
    assert mean.reduce([29.0, 33.0]) == 31.0 and worst.reduce([29.0, 33.0]) == 29.0
    assert mean.met(31.0) and not mean.met(30.5) and mean.met(30.5, with_margin=False)
    error = Budget("rel_error", 0.1, aggregate="worst")
    assert error.reduce([0.05, 0.2]) == 0.2 and not error.met(0.2) and error.met(0.1)
    assert not mean.met(math.nan)
    with pytest.raises(ValueError, match="^budget: margin expected"):
        Budget("sparsity", 0.3, margin=0.1)


def test_profile_file_round_trip_is_readable_json(tmp_path):
    profile = _profile(measured={"calibration": {"sparsity": 0.3, "psnr_mean": 33.0}}, budget={"text": "psnr>=32"})
    path = profile.save(tmp_path / "deep" / "profile.json")
    text = path.read_text()
    data = json.loads(text)
    assert data["format"] == "liteattn-calibration-profile" and data["version"] == 1
    assert '"blocks.1.attn1": ["-inf", -0.5]' in text and '"range_starts": [3, 11]' in text
    loaded = load_profile(path)
    assert loaded.to_dict() == profile.to_dict()
    assert loaded.thresholds["blocks.1.attn1"] == (-math.inf, -0.5)
    assert "blocks.0.attn1" in loaded.describe() and "psnr_mean 33" in loaded.describe()


def test_profile_lookups_and_token_rules():
    profile = _profile()
    assert [profile.range_index(s) for s in (0, 3, 10, 11, 40)] == [0, 0, 0, 1, 1]
    assert profile.threshold("blocks.0.attn1", 2) == -math.inf  # a dense step
    assert profile.threshold("blocks.0.attn1", 5) == -1.5 and profile.threshold("blocks.0.attn1", 19) == -1.0
    assert profile.threshold("blocks.0.attn1", 19, tokens=8192) == -3.0  # 4x the tokens: 2 log2 units lower
    assert profile.threshold("blocks.1.attn1", 5, tokens=8192) == -math.inf
    assert profile.threshold("blocks.1.attn1", 19, tokens=512) == -0.125  # capped below 0
    assert profile.with_token_rule("same").threshold("blocks.0.attn1", 19, tokens=8192) == -1.0
    with pytest.raises(ValueError, match="calibrated for 2048 tokens and its token rule is 'exact'"):
        profile.with_token_rule("exact").threshold("blocks.0.attn1", 19, tokens=8192)
    with pytest.raises(ValueError, match="^profile: has no thresholds for layer 'blocks.9.attn1'"):
        profile.layer_schedule("blocks.9.attn1", 2048)
    assert not profile.never_marks
    assert _profile(thresholds={"blocks.0.attn1": ["-inf"] * 2, "blocks.1.attn1": ["-inf"] * 2}).never_marks


@pytest.mark.parametrize("change,message", [
    (dict(tokens=0), "tokens: expected a positive int"),
    (dict(token_rule="nearest"), "token_rule: expected one of"),
    (dict(range_starts=(2, 11)), "range_starts: expected ascending first steps starting at dense_steps=3"),
    (dict(range_starts=(3, 3)), "range_starts"),
    (dict(thresholds={"blocks.0.attn1": [-1.0], "blocks.1.attn1": [-1.0]}), "expected 2 values"),
    (dict(thresholds={"blocks.0.attn1": [-1.0, 0.5], "blocks.1.attn1": [-1.0, -1.0]}), "expected a negative number"),
    (dict(thresholds={"blocks.0.attn1": [-1.0, -1.0]}), r"no row for layers \['blocks.1.attn1'\]"),
    (dict(thresholds={"blocks.0.attn1": [-1, -1], "blocks.1.attn1": [-1, -1], "x": [-1, -1]}), "layer 'x' is not"),
    (dict(skip_rule="sometimes"), "skip_rule"),
    (dict(tiles=(128,)), "tiles"),
])
def test_bad_profiles_are_named(change, message):
    with pytest.raises(ValueError, match=f"^profile: (thresholds.*: )?{message}"):
        _profile(**change)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "expected a liteattn calibration profile"),
    (lambda d: d.update(version=99), "expected format version 1, got 99"),
    (lambda d: d.pop("tokens"), "missing field 'tokens'"),
    (lambda d: d["model"]["transformer"].pop("heads"), r"model\['transformer'\]: expected class, config_hash"),
    (lambda d: d.update(thresholds=[1, 2]), "wrong type"),
])
def test_bad_files_are_named(tmp_path, edit, message):
    data = _profile().to_dict()
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"^profile: .*{message}"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="^profile: .* is not a JSON profile"):
        load_profile(path)
    with pytest.raises(ValueError, match="^profile: expected the path of a calibration profile file"):
        load_profile(tmp_path / "missing.json")


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    _profile(name="first").save(path)
    before = path.read_text()
    # a value JSON cannot hold fails before the file is touched
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": math.nan})
    # a failure while the new file is being written (a full disk) leaves the old file whole and no temporary file
    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        _profile(name="second").save(path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]
    _profile(name="second").save(path)
    assert load_profile(path).name == "second"
