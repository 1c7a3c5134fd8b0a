"""``liteattn calibrate`` on the shipped testbed at a tiny size, the profile it writes run by ``liteattn demo
--profile``, the shipped profile's binding, and the options refused before any work."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from liteattn.calibration import TESTBED_PROFILE, Profile  # noqa: E402
from liteattn.cli import main  # noqa: E402

pytest.importorskip("diffusers")

TINY = ["--device", "cpu", "--frames", "2", "--steps", "3", "--no-progress"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate")
    rc = main(["calibrate", "--out", str(out), "--inputs", "1", "--held-out", "1", "--dense-steps", "1",
               "--ranges", "1", "--budget", "psnr>=30", *TINY])
    return rc, out


def test_writes_a_profile_bound_to_the_testbed(calibrated):
    rc, out = calibrated
    assert rc == 0
    profile = Profile.load(out / "profile.json")
    assert (profile.tokens, profile.steps, profile.dense_steps, profile.tiles) == (2 * 16 * 16, 3, 1, (128, 128))
    assert profile.budget["text"] == "psnr>=30" and profile.token_rule == "exact"
    assert list(profile.models) == ["transformer"] and len(profile.thresholds) == 6
    assert set(profile.measured) == {"calibration", "held_out"}
    for measured in profile.measured.values():
        assert measured["psnr_mean"] >= 30 and 0 <= measured["sparsity"] < 1
        assert set(measured["scores_mean"]) >= {"prompt_adherence", "overall"}
    journal = json.loads((out / "journal.json").read_text())
    tried = {entry["try"] for entry in profile.calibration["trace"]}  # every setting the search checked, once each
    assert len(journal["evaluations"]) == len(tried) == profile.calibration["evaluations"] >= 4


def test_running_it_again_resumes(calibrated, capsys, monkeypatch):
    from liteattn.calibration import session

    _, out = calibrated
    before = (out / "profile.json").read_text()
    measured, measure = [], session.Calibration.measure

    def counting(self, config, inputs=None, tag="calibration", **options):
        measured.append(tag)
        return measure(self, config, inputs, tag, **options)

    monkeypatch.setattr(session.Calibration, "measure", counting)
    rc = main(["calibrate", "--out", str(out), "--inputs", "1", "--held-out", "1", "--dense-steps", "1",
               "--ranges", "1", "--budget", "psnr>=30", *TINY])
    assert rc == 0
    assert "calibrate: resuming" in capsys.readouterr().err
    assert measured == ["held-out"]  # the search generated nothing again; only the held-out measurement runs
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "calibration"}  # noqa: E731
    assert strip((out / "profile.json").read_text()) == strip(before)


def test_the_demo_runs_a_profile(calibrated, tmp_path):
    _, out = calibrated
    rc = main(["demo", "--out", str(tmp_path), "--profile", str(out / "profile.json"), "--seed", "3", *TINY])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["profile"]["tokens"] == 512 and report["threshold"] is None and report["dense_steps"] == 1
    assert report["setting"].startswith("profile ")
    assert report["liteattn"]["sparsity_per_step"][0] == 0.0  # its dense first step


def test_the_shipped_profile_binds_to_the_shipped_testbed():
    import liteattn
    from liteattn.demo import DEFAULT_DENSE_STEPS, DEFAULT_THRESHOLD, choose_setting
    from liteattn.testbed import load_testbed

    profile = Profile.load(TESTBED_PROFILE)
    testbed = load_testbed("cpu")
    handle = liteattn.apply(testbed.transformer, profile=profile)  # raises if it were for another model
    handle.remove()
    assert profile.tokens == testbed.tokens_per_video(8, 32) and profile.steps == 20
    assert profile.measured["calibration"]["meets_budget"]

    class Args:
        profile, threshold, dense_steps = "auto", None, None

    small = choose_setting(Args, profile.tokens, profile.steps)  # the CPU demo's size: the profile
    assert small["profile"] is not None and small["threshold"] is None
    large = choose_setting(Args, testbed.tokens_per_video(32, 64), 30)  # the GPU size: the H200-measured defaults
    assert large["profile"] is None and (large["threshold"], large["dense_steps"]) == (DEFAULT_THRESHOLD,
                                                                                        DEFAULT_DENSE_STEPS)
    Args.threshold = -2.0
    assert choose_setting(Args, profile.tokens, profile.steps)["threshold"] == -2.0  # one threshold when asked


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "--budget", "psnr<=30"], "--budget: psnr takes >="),
    (["calibrate", "--budget", "sparsity>=0.3", "--margin", "1"], "--margin: expected a number >= 0, and only"),
    (["calibrate", "--budget", "sparsity>=0.3", "--dense-steps", "1", "2"], "--dense-steps: a sparsity budget takes"),
    (["calibrate", "--inputs", "0"], "--inputs: expected at least 1"),
    (["calibrate", "--ranges", "0"], "--ranges: expected at least 1"),
    (["calibrate", "--budget", "marginal_l1<=0.05", "--skip-rule", "per_call"], "--skip-rule: the marginal rule"),
    (["demo", "--profile", "missing.json"], "--profile: expected the path of a calibration profile file"),
    (["demo", "--profile", "p.json", "--threshold", "-1"], "--threshold: a profile sets every layer's thresholds"),
])
def test_bad_options_exit_2_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text(TESTBED_PROFILE.read_text())
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
