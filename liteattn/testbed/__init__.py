"""A small trained video DiT (diffusers' Wan transformer in pixel space) to test liteattn on.

No model weights can be downloaded where liteattn is developed and tested, and
a randomly initialised transformer has no attention structure to exploit, so
liteattn ships its own: trained on procedural videos of moving shapes
(:mod:`.data`) with rectified flow (:mod:`.train`), sampled with an Euler
solver and classifier-free guidance (:mod:`.sampler`). See docs/testbed.md.

Nothing here imports diffusers until a model is built or loaded.
"""
from .data import describe_prompt, encode_prompt, generate_videos
from .model import Testbed, load_testbed

__all__ = ["Testbed", "describe_prompt", "encode_prompt", "generate_videos", "load_testbed"]
