"""Serving: continuous batching of block-diffusion (or AR) requests over the slots of one donated KV cache.

`Engine(model, SamplingConfig, slots=...)` takes `Request`s (`submit`), and each `step` admits, decodes a
bounded chunk and hands out finished blocks and requests (`engine.py`); `slots.py` holds its device programs.
"""

from dvl_jax.serving.engine import Engine
from dvl_jax.serving.request import Request, Result

__all__ = ["Engine", "Request", "Result"]
