"""What a client asks the serving engine for, and what it gets back."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from dvl_jax.diffusion.sampling_config import GenerateOutput, SamplingConfig

SEEDS = 2 ** 32  # `jax.random.key` keeps 32 bits of a seed: larger ones would collide silently
_DEFAULTS = SamplingConfig()  # a request left alone decodes as dvl.generate does by default


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt and its own decoding settings.

  `prompt`: token ids (images: the Hugging Face convention, image-token ids in the prompt with `pixel_values`
  `[N, patch_dim]` and `image_grid_thw` `[n_images, 3]`). `max_tokens` is the gen length (None: the engine's
  longest answer). `algorithm` ("block_diffusion" or "autoregressive"), the remasking strategy, `steps` and
  `confidence_threshold` (block diffusion), `temperature` / `top_p` / `top_k` (temperature 0: greedy) and `seed`
  are per request; what every request shares (mode, block size, length bucket, AR's positions) is the engine's
  `SamplingConfig`.
  """

  prompt: Sequence[int]
  max_tokens: int | None = None  # None: the engine's longest answer (its config's gen_length)
  remasking_strategy: str = _DEFAULTS.remasking_strategy
  steps: int = _DEFAULTS.steps
  confidence_threshold: float = _DEFAULTS.confidence_threshold
  temperature: float = _DEFAULTS.temperature
  top_p: float = _DEFAULTS.top_p
  top_k: int = _DEFAULTS.top_k
  algorithm: str = _DEFAULTS.algorithm
  seed: int = 0
  pixel_values: Any = None
  image_grid_thw: Any = None

  def __post_init__(self):
    if isinstance(self.prompt, (str, bytes)):
      raise TypeError("a Request's prompt is token ids, not text: tokenize it first, e.g. "
                      "dvl.Processor.from_pretrained(ckpt)(text)['input_ids'][0]")

  def config(self, engine: SamplingConfig) -> SamplingConfig:
    """The `SamplingConfig` under which `dvl.generate` on this prompt alone (rng `jax.random.key(seed)`) gives
    this request's tokens (validated: a bad setting raises a one-line `ValueError`)."""
    if not math.isfinite(self.temperature):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
    if not 0 <= self.seed < SEEDS:
      raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
    gen_length = engine.gen_length if self.max_tokens is None else self.max_tokens
    return dataclasses.replace(engine, gen_length=gen_length, remasking_strategy=self.remasking_strategy,
                               steps=self.steps, confidence_threshold=self.confidence_threshold,
                               temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                               algorithm=self.algorithm,
                               positions=engine.positions if self.algorithm == "autoregressive" else None)


class Result(NamedTuple):
  """What one `Engine.step` hands out."""

  admitted: list[int]  # request ids that got a slot
  pieces: list[tuple[int, np.ndarray]]  # (request id, its next final tokens): whole blocks, then the rest at the end
  finished: list[tuple[int, GenerateOutput]]  # (request id, its output, as `dvl.generate` gives it for one prompt)
  forwards: dict[int, int]  # request id -> its forwards so far, prefill included (each request that decoded)
