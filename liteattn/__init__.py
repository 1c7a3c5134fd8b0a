"""liteattn: temporal sparse attention for video diffusion transformers.

Key tiles that carry negligible softmax mass at one denoising step stay
negligible later; liteattn marks them while computing attention and never
computes them again in that generation (no QK, no softmax, no PV).
"""
from .attention import LiteAttention, lite_attention, skip_softmax_attention
from .integrations import LiteAttentionConfig, apply, remove
from .calibration import calibrate
from .state import SkipState
from .version import __version__

__all__ = ["LiteAttention", "LiteAttentionConfig", "SkipState", "apply", "calibrate", "lite_attention", "remove",
           "skip_softmax_attention", "__version__"]
