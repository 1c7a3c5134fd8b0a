"""Testbed tests run offline: diffusers must never try the model hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
