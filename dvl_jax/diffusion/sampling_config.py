"""What the samplers take and return: `SamplingConfig` (static options), `Prompts`, `GenerateOutput`
(and `clean_answer`, the original evaluation's answer clean-up).

A `SamplingConfig` is hashable and a static jit argument: one compile per (batch size, prompt length
bucket, config). Option names follow the original `generate_with_bd3lm` kwargs (spec §6).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from dvl_jax.core.config import ModelConfig
from dvl_jax.core.vision_layout import VisionLayout
from dvl_jax.diffusion.remask import CONFIDENCES
from dvl_jax.models import families

ALGORITHMS = ("block_diffusion", "autoregressive")
ABLATION_SCHEDULES = ("block_size", "gen_length")  # spec §7.5: DiffusionVL-QwenVL / DiffusionVL-Qwen, LLaDA-BD3LM
STRATEGIES = ("low_confidence_static", "low_confidence_dynamic", "threshold")
MODES = ("fused", "reference")
POSITIONS = ("flat", "mrope")
PATCH_BUCKET = 256  # pixel rows: padded to a multiple of this, or a power of two below it (`patch_rows`)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling options.

  `algorithm`: "block_diffusion" (spec §6) or "autoregressive" (the in-stack AR baseline).
  `mode`: "fused" commits a finished block in the same forward as the next block's first denoising
    step; "reference" runs the original's separate commit pass (same tokens, one forward more per block).
  `fused_window_share`: in "fused" mode, a forward runs that double-width window (`[previous block ; current
    block]`) over every row only when at least this share of the active rows commit; when fewer do, they commit
    alone as in "reference" and the other rows' forward stays one block wide (same tokens; a row's NFE then
    counts its commit). Fusing pays when the committing share exceeds what a twice-as-wide forward costs extra,
    relative to a one-block one: about 0 on an accelerator at small batch (set 0: fuse whenever a row commits),
    up to 1 where the forward is compute-bound (a CPU, a large batch). At batch 1 every commit is fused.
  `packed_commit_share`: in "fused" mode on one device, when at most this share of the batch's rows (rounded up,
    fewer than all) commit, their commits are fused too, in a packed forward: the decoder computes every row's
    current block and those rows' previous blocks only (`DiffusionLM.decode(packed=...)`), so a few rows'
    commits neither cost them a forward of their own nor widen the others' (same tokens; one more decoder in
    the compiled program). Off (0) by default: on a 2-core CPU at batch 8 it saves ~10% of the forwards and
    their extra positions cost as much (`benchmarks/sampling.py`); where a forward's cost hardly grows with its
    positions (an accelerator below its compute bound) try 0.25.
  `compact_rows`: rows that finish leave the batch, which narrows (halves) as they do (`diffusion.compaction`;
    same tokens): the batch no longer computes every row until its slowest is done, at one more copy of the
    loop in the program per width (longer compiles). It pays where a forward's cost grows with its rows (a
    CPU); on one device only, and not while streaming (elsewhere it is ignored).
  `remasking_strategy`: "low_confidence_static" / "low_confidence_dynamic" (spec §6.4) or "threshold"
    (Fast-dLLM v2 style: every masked position with confidence > `confidence_threshold`, at least one
    per step; `steps` is then unused).
  `confidence`: what a sampled token's confidence is at temperature > 0 (spec §6.5, §7.5): "sampled" (its
    probability under the temperature / top-k / top-p distribution, DiffusionVL-QwenVL) or "softmax" (under
    the unmodified softmax, DiffusionVL-Qwen).
  `ablation_schedule`: the unmasking schedule of a prompt whose answer fits in its one block (`P + gen_length
    <= block_size`, spec §6.1's full-diffusion ablation; §6.7 quirk 3, §7.5): `num_transfer(block_size, steps)`
    ("block_size", DiffusionVL-QwenVL) or `num_transfer(gen_length, steps)` ("gen_length", DiffusionVL-Qwen).
  `block_size`, `positions`, `confidence` and `ablation_schedule` None take the model's values (`positions` is
    always "flat" for block diffusion, as in DiffusionVL; the last two its family's). `length_bucket` pads
    prompts to a multiple of it; `max_len` is the KV-cache length (default: prompt bucket + `gen_length`,
    rounded up to a block).
  The device mesh is not an option here: sampling runs where the model's params are, so a mesh shape
  (the CLI's / config's `mesh`, or `dvl.suggest_mesh(cfg, batch=...)`) goes to
  `dvl.load(ckpt, mesh=dvl.make_mesh(shape))`.
  """

  gen_length: int = 128
  steps: int = 8
  block_size: int | None = None
  remasking_strategy: str = "low_confidence_static"
  confidence_threshold: float = 0.85
  mode: str = "fused"
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  algorithm: str = "block_diffusion"
  positions: str | None = None
  confidence: str | None = None
  ablation_schedule: str | None = None
  length_bucket: int = 64
  max_len: int | None = None
  fused_window_share: float = 0.5
  packed_commit_share: float = 0.0
  compact_rows: bool = False

  def __post_init__(self):
    _one_of("algorithm", self.algorithm, ALGORITHMS)
    _one_of("remasking_strategy", self.remasking_strategy, STRATEGIES)
    _one_of("mode", self.mode, MODES)
    if self.positions is not None:
      _one_of("positions", self.positions, POSITIONS)
    if self.confidence is not None:
      _one_of("confidence", self.confidence, CONFIDENCES)
    if self.ablation_schedule is not None:
      _one_of("ablation_schedule", self.ablation_schedule, ABLATION_SCHEDULES)
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if self.gen_length < 1:
      raise ValueError(f"gen_length must be >= 1, got {self.gen_length}")
    if self.block_size is not None and self.block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {self.block_size}")
    if not 0.0 < self.confidence_threshold < 1.0:
      raise ValueError(f"confidence_threshold must be in (0, 1), got {self.confidence_threshold}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
    if not 0.0 <= self.fused_window_share <= 1.0:
      raise ValueError(f"fused_window_share must be in [0, 1], got {self.fused_window_share}")
    if not 0.0 <= self.packed_commit_share <= 1.0:
      raise ValueError(f"packed_commit_share must be in [0, 1] (0: never pack), got {self.packed_commit_share}")
    if self.length_bucket < 1:
      raise ValueError(f"length_bucket must be >= 1, got {self.length_bucket}")
    if self.block_size is not None and self.max_len is not None and self.max_len % self.block_size:
      raise ValueError(f"block_size {self.block_size} does not divide the cache length max_len={self.max_len}")

  def resolve(self, model_cfg: ModelConfig) -> "SamplingConfig":
    """Fills `block_size`, `positions`, `confidence` and `ablation_schedule` from the model config (validated
    again)."""
    positions = self.positions or ("flat" if self.algorithm == "block_diffusion" else model_cfg.position_mode)
    family = families.get(model_cfg.family)
    if self.algorithm == "block_diffusion" and positions != "flat":
      raise ValueError("block diffusion uses flat positions (spec §3.2); positions='mrope' is only for "
                       "algorithm='autoregressive'")
    return dataclasses.replace(self, block_size=self.block_size or model_cfg.block_size, positions=positions,
                               confidence=self.confidence or family.confidence,
                               ablation_schedule=self.ablation_schedule or family.ablation_schedule)

  def cache_len(self, prompt_width: int) -> int:
    """KV-cache slots: `max_len`, or the prompt bucket plus `gen_length` rounded up to a whole block."""
    return self.max_len or round_up(prompt_width + self.gen_length, self.block_size or 1)


def checked_config(config: Any) -> "SamplingConfig":
  """`config` if it is a `SamplingConfig` (a dict of its fields is the likely mistake), else a one-line error."""
  if not isinstance(config, SamplingConfig):
    raise TypeError(f"config must be a dvl.SamplingConfig, e.g. dvl.SamplingConfig(gen_length=64); got "
                    f"{type(config).__name__}")
  return config


def _not_text(rows: Any) -> Any:
  if isinstance(rows, (str, bytes)) or (isinstance(rows, Sequence) and any(isinstance(r, (str, bytes)) for r in rows)):
    raise TypeError("generate takes token ids, not text: pass dvl.Processor's output (processor(prompts, images)), "
                    "a Prompts or lists of token ids")
  return rows


def _token_ids(values: Any, what: str) -> np.ndarray:
  """`values` as int32 token ids; floats, bools or strings are refused rather than cast."""
  ids = np.asarray(values)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"{what} must hold integer token ids, got {ids.dtype}")
  if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
    raise ValueError(f"{what} holds ids past int32 ({ids.min()} .. {ids.max()}): not token ids")
  return ids.astype(np.int32)


def _check_images(ids: np.ndarray, pixels: Any, grids: Any, model_cfg: ModelConfig) -> None:
  """Image tokens, pixel rows and images that do not add up would splice features in the wrong places silently
  (transformers refuses them too): one line each, pointing at the Processor, which builds them consistently."""
  have = int((ids == model_cfg.image_token_id).sum())
  if pixels is None:
    if have:
      raise ValueError(f"the prompts hold {have} image tokens but no pixel_values: build them with dvl.Processor")
    return
  if grids is None:
    raise ValueError("pixel_values given without image_grid_thw (or a precomputed `vision` layout)")
  tokens, rows = families.get(model_cfg.family).host_images.counts(grids, model_cfg.vision)
  if have != tokens.sum():
    raise ValueError(f"the prompts hold {have} image tokens, their {len(tokens)} images take {int(tokens.sum())}: "
                     "build them with dvl.Processor (each <image> becomes its image's tokens)")
  if np.shape(pixels)[0] != rows:
    raise ValueError(f"pixel_values has {np.shape(pixels)[0]} rows, image_grid_thw's {len(tokens)} images take "
                     f"{rows}")


def _one_of(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; use one of {choices}")


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A batch of prompts: right-padded `ids` `[B, W]`, `lengths` `[B]`, optional images.

  Images follow the Hugging Face convention (image-token ids in `ids`, `pixel_values` `[N, patch_dim]`,
  `image_grid_thw` `[n_images, 3]`, or the family's image metadata, e.g. DiffusionVL-Qwen's (height, width));
  `vision` is the precomputed layout (built from `image_grid_thw` by the family's image hook if absent).
  """

  ids: np.ndarray
  lengths: np.ndarray
  pixel_values: Any = None
  image_grid_thw: Any = None
  vision: VisionLayout | None = None

  @classmethod
  def from_lists(cls, rows: Sequence[Sequence[int]], pad_id: int = 0, **images: Any) -> "Prompts":
    rows = [_token_ids(r, "a prompt") for r in _not_text(rows)]
    if not rows:
      raise ValueError("no prompts: pass at least one")
    ids = np.full((len(rows), max(len(r) for r in rows)), pad_id, np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    return cls(ids, np.array([len(r) for r in rows], np.int32), **images)

  @classmethod
  def coerce(cls, inputs: Any) -> "Prompts":
    """Accepts `Prompts`, a list of token lists, or a mapping with `input_ids` and `lengths` or
    `attention_mask` (right padding), plus optional `pixel_values` / `image_grid_thw` / `vision`."""
    if isinstance(inputs, Prompts):
      return inputs
    if isinstance(inputs, Mapping):
      if "input_ids" not in inputs:
        raise ValueError(f"inputs have no `input_ids` (keys: {sorted(inputs)}); pass the Processor's output")
      ids = _token_ids(inputs["input_ids"], "input_ids")
      if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
      if "lengths" in inputs:
        lengths = np.asarray(inputs["lengths"], np.int32)
      elif "attention_mask" in inputs:
        mask = np.asarray(inputs["attention_mask"])
        lengths = mask.sum(-1).astype(np.int32)
        if not np.array_equal(mask, np.arange(ids.shape[1]) < lengths[:, None]):
          raise ValueError("attention_mask must be right-padded (ones, then zeros) for generate")
      else:
        raise ValueError("inputs need `lengths` or `attention_mask` next to `input_ids`")
      return cls(ids, lengths, inputs.get("pixel_values"), inputs.get("image_grid_thw"), inputs.get("vision"))
    return cls.from_lists(inputs)

  def bucketed(self, config: SamplingConfig, model_cfg: ModelConfig, *, few_shapes: bool = False) -> "Prompts":
    """Validated copy padded to the length bucket (and pixel rows by `PATCH_BUCKET`), with a layout;
    `few_shapes`: the image layout with the fewest distinct shapes (the serving engine: see the image hook)."""
    lengths = np.asarray(self.lengths, np.int32).reshape(-1)
    if lengths.shape[0] != self.ids.shape[0]:
      raise ValueError(f"{lengths.shape[0]} lengths for {self.ids.shape[0]} prompts")
    if lengths.min() < 1:
      raise ValueError(f"every prompt needs at least one token, got lengths {lengths.tolist()}")
    if lengths.max() > self.ids.shape[1]:
      raise ValueError(f"prompt lengths must be in [1, {self.ids.shape[1]}], got {lengths.tolist()}")
    vocab = model_cfg.text.vocab_size
    valid = self.ids[np.arange(self.ids.shape[1]) < lengths[:, None]]
    if valid.min() < 0 or valid.max() >= vocab:
      raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got {valid.min()} .. "
                       f"{valid.max()}: tokenize with the checkpoint's own tokenizer / Processor")
    longest = int(lengths.max())
    width = round_up(longest, config.length_bucket)
    if config.max_len is not None:
      width = min(width, config.max_len)
    context = config.cache_len(width)
    if longest + config.gen_length > context:
      raise ValueError(f"prompt of {longest} tokens + gen_length {config.gen_length} exceeds the context of "
                       f"{context} tokens (max_len); raise max_len or shorten the prompt")
    if max(width, context) > model_cfg.text.max_position_embeddings:
      raise ValueError(f"context of {max(width, context)} tokens exceeds the model's max_position_embeddings "
                       f"({model_cfg.text.max_position_embeddings})")
    ids = np.full((len(lengths), width), model_cfg.pad_token_id, np.int32)
    keep = min(width, self.ids.shape[1])
    ids[:, :keep] = self.ids[:, :keep]
    ids = np.where(np.arange(width) < lengths[:, None], ids, model_cfg.pad_token_id).astype(np.int32)
    pixels, vision = self.pixel_values, self.vision
    if model_cfg.vision is not None and vision is None:
      _check_images(valid, pixels, self.image_grid_thw, model_cfg)
    if pixels is not None:
      pixels = np.asarray(pixels, np.float32)
      if vision is None:
        pixels, vision = families.get(model_cfg.family).host_images.layout(
            pixels, self.image_grid_thw, model_cfg.vision, PATCH_BUCKET, few_shapes=few_shapes)
    return Prompts(ids, lengths, pixels, self.image_grid_thw, vision)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Generated tokens and statistics (NumPy), one row per prompt.

  `tokens` `[B, G]`: block diffusion returns, like the original, the whole last decoded block (tokens
    after EOS included) and the mask id for never-decoded positions; the AR path pads after EOS.
  `lengths` `[B]`: tokens up to and including the first EOS (G without EOS).
  `nfe` `[B]`: model forwards per row, prefill included; `forwards`: forwards of the batch.
  `tokens_per_forward` `[B]`: decoded tokens / `nfe`.
  `steps_per_token` `[B, G]`: index of the row's forward that fixed each token, -1 if never decoded
    (trajectory plots); block diffusion counts from the first forward after the prefill, AR from the
    prefill (which gives token 0).
  `text`: decoded answers (up to the first EOS) when a tokenizer was given; `clean_text`: the same after
    the original evaluation's clean-up (`clean_answer`), the strings its scores were computed on.
  `cache`: the donated KV cache, reusable by the next call with the same shapes (on a mesh its batch
    is padded to a multiple of the `data` axis).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  nfe: np.ndarray
  forwards: int
  tokens_per_forward: np.ndarray
  steps_per_token: np.ndarray
  text: list[str] | None = None
  cache: Any = None

  @classmethod
  def build(cls, tokens: Any, decoded: Any, nfe: Any, forwards: Any, steps: Any, eos_id: int,
            tokenizer: Any = None, cache: Any = None, batch: int | None = None) -> "GenerateOutput":
    """Per-row arrays `[B', ...]` (device or host) -> NumPy; the first `batch` rows are kept (the rest pad
    a sharded batch)."""
    tokens, decoded, nfe, steps = (np.asarray(a)[:batch] for a in (tokens, decoded, nfe, steps))
    is_eos = tokens == eos_id
    lengths = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, tokens.shape[1]).astype(np.int32)
    text = None
    if tokenizer is not None:
      text = tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)], skip_special_tokens=True)
    return cls(tokens, lengths, nfe, int(forwards), decoded / np.maximum(nfe, 1), steps, text, cache)

  @property
  def clean_text(self) -> list[str] | None:
    return None if self.text is None else [clean_answer(t) for t in self.text]


def clean_answer(text: str) -> str:
  """DiffusionVL's evaluation post-processing (spec §9.2): cut at the first newline, `strip()`, drop one
  trailing "." (benchmarks score short answers, which the model may end with a full stop or a new line)."""
  text = text.split("\n", 1)[0].strip()
  return text[:-1] if text.endswith(".") else text
