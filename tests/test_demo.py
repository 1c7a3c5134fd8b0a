"""``liteattn demo`` end to end at a tiny size on the CPU: files written, report sane."""
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
    assert (r["frames"], r["steps"], r["seed"], r["threshold"], r["dense_steps"]) == (2, 3, 3, -1.0, 1)
    assert r["tokens_per_video"] == 2 * 16 * 16
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
    q = r["quality_vs_dense"]
    assert q["lpips"] is None and "offline" in q["lpips_note"]
    assert 0.0 < q["ssim"] <= 1.0
    psnr = float(q["psnr_db"])
    assert psnr > 15


def test_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="--threshold"):
        main(["demo", "--out", str(tmp_path), "--device", "cpu", "--threshold", "3"])
    with pytest.raises(ValueError, match="--dense-steps"):
        main(["demo", "--out", str(tmp_path), "--device", "cpu", "--dense-steps", "-1"])
    with pytest.raises(ValueError, match="--steps"):
        main(["demo", "--out", str(tmp_path), "--device", "cpu", "--steps", "0"])
