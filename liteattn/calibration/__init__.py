"""Calibration: thresholds chosen per layer and step range for one model.

A :class:`Profile` (per-layer, per-step-range thresholds and the dense first
steps, bound to the model it was calibrated on) is what
``liteattn.apply(pipe, profile=...)`` runs.

Imports run one way: this package uses :mod:`liteattn.integrations`; the
integrations import only :mod:`.profile`, to load a profile given to ``apply``
by path.
"""
from .profile import Profile, load_profile

__all__ = ["Profile", "load_profile"]
