"""Calibration: thresholds chosen per layer and step range so that a model's outputs meet the quality asked for.

``liteattn.calibrate(pipe, inputs, budget="psnr>=32")`` runs the inputs dense
and with candidate settings and returns a :class:`Profile` (per-layer,
per-step-range thresholds and the dense first steps, bound to the model, with
the sparsity and quality it measured); ``liteattn.apply(pipe, profile=...)``
runs it. ``liteattn calibrate`` does the same for the shipped testbed from
the command line. See docs/calibration.md.

Imports run one way: this package uses :mod:`liteattn.integrations` and
:mod:`liteattn.testbed`; the profile format is :mod:`liteattn.profile`,
outside this package, so that the integrations can load a profile given to
``apply`` without importing calibration.
"""
from .api import calibrate, testbed_inputs
from .budget import Budget
from ..profile import Profile, load_profile
from .runners import CallableRunner, PipelineRunner, Runner, TestbedRunner

__all__ = ["Budget", "CallableRunner", "PipelineRunner", "Profile", "Runner", "TESTBED_PROFILE", "TestbedRunner",
           "calibrate", "load_profile", "testbed_inputs"]

from pathlib import Path as _Path

# The shipped testbed's profile, calibrated at its CPU size (docs/calibration.md says how and what it holds).
TESTBED_PROFILE = _Path(__file__).resolve().parent / "profiles" / "testbed.json"
