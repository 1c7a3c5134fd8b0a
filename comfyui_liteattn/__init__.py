"""liteattn for ComfyUI: the LiteAttention node (temporal sparse attention for Wan 2.1 / 2.2).

Drop this folder into ComfyUI's ``custom_nodes/`` and install the liteattn
library into the Python environment ComfyUI runs in. The node itself is
:mod:`.nodes`; what it computes lives in ``liteattn.integrations.comfyui``.
"""
try:
    import liteattn  # noqa: F401
except ImportError as exc:  # say what to do, in the message ComfyUI logs for a node that failed to import
    raise ImportError(
        "the LiteAttention node needs the liteattn library in ComfyUI's Python environment: run "
        "`python -m pip install liteattn` (or the path of a liteattn checkout) with that Python") from exc

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
