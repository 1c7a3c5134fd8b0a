"""``liteattn.calibrate`` on a tiny Wan transformer driven like a pipeline: the profile meets its budget on inputs it
never saw, the same inputs give the same profile, an interrupted calibration resumes where it stopped, and the
sparsity and marginal budgets do what they say."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn  # noqa: E402
import liteattn.integrations as li  # noqa: E402
from liteattn.calibration import Budget, CallableRunner, Profile  # noqa: E402
from liteattn.calibration.session import fidelity  # noqa: E402

SHARP = 12.0
STEPS = 6
GRID = (-6.0, -3.0, -1.5, -0.5)
CALIBRATION = [1, 2, 3]
HELD_OUT = [11, 12, 13, 14]
# The tiny model's outputs move little (PSNR 45-80 dB against dense); the bound sits between what -3 and -1.5 give
# everywhere, and the margin keeps the search off the edge it would otherwise fit to three inputs.
BUDGET = Budget("psnr", 54.0, margin=1.5)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.wan(sharpen=SHARP)


@pytest.fixture(scope="module")
def make_runner(model, loops):
    """A runner whose inputs are seeds of the pipeline-like loop; ``runner.calls`` counts generations."""
    def make():
        def run(seeds):
            run.calls += len(seeds)
            return torch.stack([loops.wan(model, seed=s, steps=STEPS)[0][0] for s in seeds])

        run.calls = 0
        runner = CallableRunner(model, run)
        runner.calls = lambda: run.calls
        return runner

    return make


def _calibrate(runner, **options):
    options = dict(dict(budget=BUDGET, dense_steps=(0,), ranges=2, grid=GRID, block_size=(16, 16),
                        show_progress=False, log=lambda line: None), **options)
    return liteattn.calibrate(runner, CALIBRATION, **options)


@pytest.fixture(scope="module")
def calibrated(make_runner, tmp_path_factory):
    work = tmp_path_factory.mktemp("calibration")
    runner = make_runner()
    profile = _calibrate(runner, held_out=HELD_OUT, work_dir=work, out=work / "profile.json")
    return profile, work, runner.calls()


def _comparable(profile: Profile) -> dict:
    data = profile.to_dict()
    data["calibration"] = {k: v for k, v in data["calibration"].items() if k != "date"}
    return data


def test_the_profile_meets_its_budget_on_held_out_inputs(calibrated, make_runner, loops, model):
    profile, work, _ = calibrated
    held = profile.measured["held_out"]
    assert held["meets_budget"] and held["psnr_mean"] >= 54
    assert held["inputs"] == len(HELD_OUT) and profile.measured["calibration"]["meets_budget"]
    assert profile.measured["calibration"]["sparsity"] > 0.05  # it found tiles to skip
    assert Profile.load(work / "profile.json").to_dict() == profile.to_dict()
    # The budget binds: the most aggressive setting searched misses it on the held-out inputs, so a search that
    # ignored the budget would fail this test.
    handle = li.apply(model, threshold=GRID[-1], dense_steps=1, block_size=(16, 16))
    try:
        aggressive = [loops.wan(model, seed=s, steps=STEPS)[0][0] for s in HELD_OUT]
    finally:
        handle.remove()
    dense = make_runner().generate(HELD_OUT)
    psnrs = [fidelity(a, d, None)["psnr"] for a, d in zip(aggressive, dense)]
    assert sum(psnrs) / len(psnrs) < 54


def test_per_layer_and_range_thresholds_come_from_the_grid(calibrated):
    profile, _, _ = calibrated
    assert profile.dense_steps == 0 and profile.range_starts == (0, 3)
    assert set(profile.thresholds) == {"blocks.0.attn1", "blocks.1.attn1"}
    assert all(t in GRID for row in profile.thresholds.values() for t in row)
    assert profile.budget["text"] == "psnr>=54 (margin 1.5)" and profile.tokens == 160 and profile.steps == STEPS
    assert profile.calibration["evaluations"] >= 3


def test_same_inputs_same_profile(calibrated, make_runner):
    profile, _, _ = calibrated
    again = _calibrate(make_runner(), held_out=HELD_OUT)
    assert _comparable(again) == _comparable(profile)


def test_an_interrupted_calibration_resumes_where_it_stopped(calibrated, make_runner, tmp_path):
    profile, _, uninterrupted_calls = calibrated
    seen = []

    def stop_after_three(line):
        seen.append(line)
        if line.startswith("calibrate [3]"):
            raise Interrupted

    first = make_runner()
    with pytest.raises(Interrupted):
        _calibrate(first, held_out=HELD_OUT, work_dir=tmp_path, log=stop_after_three)
    second = make_runner()
    resumed = _calibrate(second, held_out=HELD_OUT, work_dir=tmp_path)
    assert _comparable(resumed) == _comparable(profile)
    # the dense outputs and the three finished evaluations were not generated again
    assert second.calls() == uninterrupted_calls - len(CALIBRATION) * 4
    assert first.calls() == len(CALIBRATION) * 4


def test_a_journal_for_other_inputs_is_refused(calibrated, make_runner):
    _, work, _ = calibrated
    with pytest.raises(ValueError, match="^work_dir: the journal in .* was written for another calibration "
                                         r"\(inputs differ\)"):
        liteattn.calibrate(make_runner(), [7, 8], BUDGET, work_dir=work, dense_steps=(1,), grid=GRID,
                           block_size=(16, 16), show_progress=False, log=lambda line: None)


def test_a_journal_for_another_checkpoint_is_refused(calibrated, model, loops):
    """The same architecture and inputs with other weights (a fine-tune) cannot reuse the journal's evaluations."""
    import copy

    _, work, _ = calibrated
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1e-3)
    runner = CallableRunner(tuned, lambda seeds: torch.stack([loops.wan(tuned, seed=s, steps=STEPS)[0][0]
                                                               for s in seeds]))
    with pytest.raises(ValueError, match=r"^work_dir: the journal in .* was written for another calibration "
                                         r"\(.*weights differ\)"):
        liteattn.calibrate(runner, CALIBRATION, BUDGET, work_dir=work, dense_steps=(0,), grid=GRID,
                           block_size=(16, 16), show_progress=False, log=lambda line: None)


def test_a_sparsity_budget_makes_every_layer_skip_its_share(make_runner):
    profile = _calibrate(make_runner(), budget="sparsity>=0.05", dense_steps=1)
    measured = profile.measured["calibration"]
    assert all(s >= 0.05 for s in measured["sparsity_per_layer"].values())
    assert measured["meets_budget"] and measured["layers_below_target"] == []
    assert set(measured["sparsity_per_layer"]) == set(profile.thresholds)  # every layer measured, keyed as the profile
    assert profile.range_starts == (1,) and profile.budget["kind"] == "sparsity"
    assert all(-12 < row[0] < 0 for row in profile.thresholds.values())


def test_the_marginal_rule_chooses_a_threshold_per_layer_and_step(make_runner):
    loose = _calibrate(make_runner(), budget="marginal_l1<=0.05", dense_steps=1)
    tight = _calibrate(make_runner(), budget="marginal_l1<=0.002", dense_steps=1)
    assert loose.range_starts == tuple(range(1, STEPS))
    for layer in loose.thresholds:
        assert all(math.isfinite(t) for t in loose.thresholds[layer])
        assert all(a >= b for a, b in zip(loose.thresholds[layer], tight.thresholds[layer]))  # looser, more skipped
    assert loose.measured["calibration"]["sparsity"] > tight.measured["calibration"]["sparsity"]


@pytest.mark.parametrize("options,message", [
    (dict(budget="psnr<=30"), "^budget: psnr takes >="),
    (dict(budget="sparsity>=0.3", dense_steps=(1, 2)), "^dense_steps: a sparsity budget takes one number"),
    (dict(grid=(-1.0, -2.0)), "^grid: expected ascending distinct negative thresholds"),
    (dict(ranges=0), "^ranges: expected a positive int"),
    (dict(token_rule="nearest"), "^token_rule: expected one of"),
    (dict(budget=Budget("marginal_l1", 0.1), skip_rule="per_call"), "^skip_rule: the marginal rule"),
])
def test_bad_arguments_are_named(make_runner, options, message):
    with pytest.raises(ValueError, match=message):
        _calibrate(make_runner(), **options)


def test_what_calibrate_needs_to_run(model):
    with pytest.raises(ValueError, match="^pipe_or_transformer: .* a bare WanTransformer3DModel needs run="):
        liteattn.calibrate(model, [1], BUDGET)
    with pytest.raises(ValueError, match="^inputs: expected a non-empty list of inputs"):
        liteattn.calibrate(CallableRunner(model, lambda seeds: None), [], BUDGET)
    with pytest.raises(ValueError, match="^inputs: a number of inputs is only for the testbed"):
        liteattn.calibrate(CallableRunner(model, lambda seeds: None), 3, BUDGET)


def test_the_premise_is_measured_on_the_dense_trajectory(make_runner, model):
    from liteattn.calibration.premise import measure_persistence

    runner = make_runner()
    result = measure_persistence(runner, [1, 2], thresholds=(-3.0, -1.0), max_gap=3, block_size=(16, 16))
    assert result["steps"] == STEPS and result["tokens"] == [160] and result["inputs"] == 2
    for th in ("-3", "-1"):
        layers = result["thresholds"][th]["layers"]
        assert set(layers) == {"blocks.0.attn1", "blocks.1.attn1"}
        for layer in layers.values():
            assert len(layer["negligible"]) == STEPS and all(0 <= x <= 1 for x in layer["negligible"])
            assert set(layer["persistence"]) <= {"1", "2", "3"}
            assert all(0 <= x <= 1 for x in layer["persistence"].values())
    looser = sum(sum(v["negligible"]) for v in result["thresholds"]["-1"]["layers"].values())
    stricter = sum(sum(v["negligible"]) for v in result["thresholds"]["-3"]["layers"].values())
    assert looser > stricter > 0  # a looser threshold finds more tiles negligible
    assert 0 < result["thresholds"]["-1"]["all"]["1"] <= 1
