"""What a client asks the serving engine for, and what it gets back."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import numpy as np

from dvl_jax.diffusion.sampling_config import GenerateOutput, SamplingConfig


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt and its own settings.

  `prompt`: token ids (images: the Hugging Face convention, image-token ids in the prompt with `pixel_values`
  `[N, patch_dim]` and `image_grid_thw` `[n_images, 3]`). `max_tokens` is the gen length; the remasking
  strategy, `steps` and `confidence_threshold` (block diffusion) and `seed` are per request. What a compile
  depends on (algorithm, mode, temperature / top-k / top-p, block size) is the engine's `SamplingConfig`.
  """

  prompt: Sequence[int]
  max_tokens: int = 128
  remasking_strategy: str = "low_confidence_static"
  steps: int = 8
  confidence_threshold: float = 0.85
  seed: int = 0
  pixel_values: Any = None
  image_grid_thw: Any = None

  def config(self, engine: SamplingConfig) -> SamplingConfig:
    """The `SamplingConfig` under which `dvl.generate` on this prompt alone (rng `jax.random.key(seed)`) gives
    this request's tokens (validated)."""
    return dataclasses.replace(engine, gen_length=self.max_tokens, remasking_strategy=self.remasking_strategy,
                               steps=self.steps, confidence_threshold=self.confidence_threshold)


class Result(NamedTuple):
  """What one `Engine.step` hands out."""

  admitted: list[int]  # request ids that got a slot
  pieces: list[tuple[int, np.ndarray]]  # (request id, its next final tokens): whole blocks, then the rest at the end
  finished: list[tuple[int, GenerateOutput]]  # (request id, its output, as `dvl.generate` gives it for one prompt)
