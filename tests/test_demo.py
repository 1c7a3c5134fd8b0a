"""``liteattn demo`` and ``liteattn eval`` end to end at a tiny size on the CPU: files written, reports sane,
options checked before any work."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from liteattn.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--out", str(out), "--device", "cpu", "--frames", "2", "--steps", "3", "--threshold", "-1",
               "--dense-steps", "1", "--seed", "3", "--no-progress"])
    return rc, out


def test_writes_every_file(demo_run):
    rc, out = demo_run
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    expected = {"side_by_side.gif", "side_by_side.png", "sparsity.png", "skip_masks.png", "summary.txt",
                "report.json"}
    assert set(report["files"]) == expected
    for name in expected:
        assert (out / name).stat().st_size > 0, name


def test_report_fields_are_sane(demo_run):
    _, out = demo_run
    r = json.loads((out / "report.json").read_text())
    assert (r["frames"], r["pixels"], r["steps"], r["seed"], r["threshold"], r["dense_steps"]) == (2, 32, 3, 3, -1.0, 1)
    assert r["tokens_per_video"] == 2 * 16 * 16 and r["cuda_graphs"] is False
    for run in ("dense", "liteattn"):
        assert r[run]["wall_s"] > 0 and 0 < r[run]["attention_s"] < r[run]["wall_s"]
    lite = r["liteattn"]
    assert len(lite["sparsity_per_step"]) == 3
    # Step 0 runs dense, step 1 starts a fresh skip state (marks tiles, skips none), step 2 skips.
    assert lite["sparsity_per_step"][:2] == [0.0, 0.0]
    assert 0.0 < lite["sparsity_per_step"][2] < 1.0
    assert lite["sparsity_last_step"] == lite["sparsity_per_step"][2]
    assert lite["sparsity_mean"] == pytest.approx(sum(lite["sparsity_per_step"]) / 3)
    assert set(lite["sparsity_per_layer"]) == {f"blocks.{i}.attn1" for i in range(r["model"]["layers"])}
    for run in ("dense", "liteattn"):
        scores = r["scores"][run]
        assert {"prompt_adherence", "subject_consistency", "motion_smoothness", "background_stability",
                "overall"} <= set(scores)
        assert all(0.0 <= scores[k] <= 1.0 for k in scores if k != "details")
    fidelity = r["fidelity_vs_dense"]
    assert 0.0 < fidelity["ssim"] <= 1.0 and float(fidelity["psnr_db"]) > 15


def test_eval_reports_intervals_and_a_choice(tmp_path):
    rc = main(["eval", "--out", str(tmp_path), "--device", "cpu", "--frames", "2", "--steps", "3", "--prompts", "2",
               "--seeds", "1", "--threshold", "-1", "--dense-steps", "1", "--workers", "1", "--no-progress"])
    assert rc == 0
    r = json.loads((tmp_path / "eval.json").read_text())
    assert len(r["pairs"]) == 2 and len(r["settings"]) == 1
    setting = r["settings"][0]
    for dim in ("prompt_adherence", "overall"):
        dense, lite = r["dense"]["scores"][dim], setting["scores"][dim]
        assert dense["low"] <= dense["mean"] <= dense["high"] and dense["n"] == 2
        assert lite["diff_vs_dense"]["n"] == 2
    assert 0.0 <= setting["sparsity"] < 1.0 and isinstance(setting["inside_dense_interval"], bool)
    assert (tmp_path / "eval.md").read_text().startswith("2 prompt x seed pairs")
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_eval_runs_its_settings_with_8bit_qk(tmp_path, monkeypatch):
    """``--qk-dtype int8 --pv-dtype fp8`` reach every liteattn setting's patch (not the dense reference) and the
    report."""
    import liteattn.integrations as integrations

    seen = []
    apply = integrations.apply
    monkeypatch.setattr(integrations, "apply", lambda *a, **kw: seen.append((kw.get("qk_dtype"), kw.get("pv_dtype")))
                        or apply(*a, **kw))
    rc = main(["eval", "--out", str(tmp_path), "--device", "cpu", "--frames", "2", "--steps", "3", "--prompts", "1",
               "--seeds", "1", "--threshold", "-1", "--dense-steps", "1", "--workers", "1", "--no-progress",
               "--qk-dtype", "int8", "--pv-dtype", "fp8"])
    assert rc == 0
    assert seen == [(None, None), ("int8", "fp8")]  # the dense run, then the setting
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["qk_dtype"] == "int8" and report["pv_dtype"] == "fp8"
    # One pair: its "interval" is a point, so no verdict and no chosen setting.
    assert report["settings"][0]["inside_dense_interval"] is None and report["chosen"] is None
    (row,) = [line for line in (tmp_path / "eval.md").read_text().splitlines() if line.startswith("| threshold")]
    assert row.endswith("| - |"), row


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_fp8_pv_without_int8_scores_is_refused_in_one_line(command, tmp_path, capsys):
    assert main([command, "--out", str(tmp_path), "--device", "cpu", "--pv-dtype", "fp8"]) == 2
    assert capsys.readouterr().err == (f"liteattn {command}: --pv-dtype: fp8 P.V comes with 8-bit Q.K^T; expected "
                                       "--qk-dtype int8 with --pv-dtype fp8\n")


def test_eval_judges_a_calibration_profile(tmp_path, monkeypatch):
    """``--profile`` is a setting of its own: the profile reaches the patch (its thresholds and dense steps, no
    default threshold sweep beside it), and the report names it."""
    import dataclasses

    import liteattn.integrations as integrations
    from liteattn._testbed_cli import profile_option

    profile = dataclasses.replace(profile_option("shipped"), token_rule="same", dense_steps=1, range_starts=(1, 2))
    path = profile.save(tmp_path / "tiny.json")
    seen = []
    apply = integrations.apply
    monkeypatch.setattr(integrations, "apply", lambda *a, **kw: seen.append(kw.get("profile")) or apply(*a, **kw))
    rc = main(["eval", "--out", str(tmp_path / "ev"), "--device", "cpu", "--frames", "2", "--steps", "3",
               "--prompts", "2", "--seeds", "1", "--profile", str(path), "--workers", "1", "--no-progress"])
    assert rc == 0
    assert seen[0] is None and seen[1] is not None and seen[1].range_starts == (1, 2) and len(seen) == 2
    (setting,) = json.loads((tmp_path / "ev" / "eval.json").read_text())["settings"]
    assert setting["profile"] == str(path) and setting["threshold"] is None and setting["dense_steps"] == 1
    assert 0.0 < setting["sparsity"] < 1.0 and isinstance(setting["inside_dense_interval"], bool)
    assert f"| profile {path} (1 dense steps) |" in (tmp_path / "ev" / "eval.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--profile", "missing.json"], "liteattn eval: --profile: expected the path of a calibration profile file"),
    (["--profile", "shipped", "--dense-steps", "2"], "liteattn eval: --dense-steps: sweeps with --threshold"),
    (["--profile", "shipped"], "liteattn eval: --profile: calibrated for 2048 tokens and its token rule is 'exact'"),
])
def test_eval_refuses_a_profile_it_cannot_run_before_any_generation(argv, message, tmp_path, capsys, monkeypatch):
    import liteattn.testbed.runs as runs

    monkeypatch.setattr(runs, "generate", lambda *a, **kw: pytest.fail("generated before refusing"))
    rc = main(["eval", "--out", str(tmp_path), "--device", "cpu", "--frames", "2", "--steps", "3", *argv])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "3"], "liteattn demo: --threshold: expected a negative number"),
    (["--steps", "0"], "liteattn demo: --steps: expected at least 1, got 0"),
    (["--frames", "-2"], "liteattn demo: --frames: expected at least 1, got -2"),
    (["--dense-steps", "-1"], "liteattn demo: --dense-steps: expected at least 0, got -1"),
    (["--pixels", "33"], "liteattn demo: --pixels: expected an even number"),
    (["--device", "tpu"], "liteattn demo: --device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--prompt", "purple circle"], "liteattn demo: --prompt: each shape must be"),
])
def test_bad_options_are_one_line_errors_before_any_work(argv, message, tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "never"), "--device", "cpu", *argv])  # a later --device wins
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_out_under_a_file_is_refused_up_front(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["demo", "--out", str(blocker / "demo"), "--device", "cpu"])
    assert rc == 2
    assert "--out: expected a folder to write into" in capsys.readouterr().err
