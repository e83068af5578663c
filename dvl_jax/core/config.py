"""Model architecture as frozen dataclasses, built from Hugging Face `config.json` files.

Architecture is data (hashable, usable as a static jit argument); experiment settings live in
`configs/*.py` (ml_collections). `ModelConfig.from_hf` reads both the Qwen2.5-VL layout and the
DiffusionVL layout, whose top-level text fields are wrong (spec §8.1): text fields always come from
`text_config` when it is present.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from dvl_jax.core import storage

PositionMode = Literal["mrope", "flat"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Qwen2.5-VL ViT (spec §2)."""

  depth: int = 32
  hidden_size: int = 1280
  num_heads: int = 16
  intermediate_size: int = 3420
  out_hidden_size: int = 2048
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one `pixel_values` row: C * t * ph * pw."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    """Patches per LLM token."""
    return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Qwen2.5 decoder (spec §3)."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_layers: int = 36
  num_heads: int = 16
  num_kv_heads: int = 2
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # names of the dtypes params and compute may take


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The whole VLM plus the token ids and block size the diffusion code needs (design §2)."""

  vision: VisionConfig | None = VisionConfig()  # None: a text-only family
  text: TextConfig = TextConfig()
  family: str = "qwen2_5_vl"  # dvl_jax.models.families: which model class, HF config and key map
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  pad_token_id: int = 151643
  mask_token_id: int = 151671
  block_size: int = 8
  position_mode: PositionMode = "flat"
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  scan_layers: bool = True  # False: per-layer params, unrolled (decoding reads weights in place); stored stacked
  remat_policy: str = "none"  # none | full | dots_saveable | nothing_saveable
  attention_backend: str = "auto"

  def __post_init__(self):
    vocab = self.text.vocab_size
    ids = ("mask_token_id", "eos_token_id", "pad_token_id") + (() if self.vision is None else ("image_token_id",))
    for name in ids:
      value = getattr(self, name)
      if not 0 <= value < vocab:
        raise ValueError(f"{name}={value} is outside the {vocab}-row vocabulary; pass {name}=<id> "
                         "(e.g. a ModelConfig.from_hf / dvl convert override)")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in FLOAT_DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} is not a floating-point dtype; use one of {FLOAT_DTYPES}")
    if self.position_mode not in ("mrope", "flat"):
      raise ValueError(f"position_mode must be 'mrope' or 'flat', got {self.position_mode!r}")

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---- serialisation -------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    vision = d.pop("vision", {})
    vision = None if vision is None else _build(_vision_config_type(d.get("family", "qwen2_5_vl")), vision)
    text = _build(TextConfig, d.pop("text", {}))
    return _build(cls, d, vision=vision, text=text)

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2)

  @classmethod
  def load(cls, path: str) -> "ModelConfig":
    """From a `config.json` written by `save`; `path` may be a `gs://` URL."""
    return cls.from_dict(json.loads(storage.as_path(path).read_text()))

  # ---- Hugging Face (each family reads and writes its own config.json: models/<family>/hf_config.py) --
  @classmethod
  def from_hf(cls, hf: dict[str, Any] | str, **overrides: Any) -> "ModelConfig":
    """Builds the config from a HF `config.json` dict or path; its `model_type` picks the family."""
    from dvl_jax.models import families  # families name their modules; importing them here avoids a cycle

    if isinstance(hf, (str, os.PathLike)):
      path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
      with open(path) as f:
        hf = json.load(f)
    return families.for_hf_model_type(hf.get("model_type", "")).hf_config.from_hf(hf, **overrides)

  def to_hf(self) -> dict[str, Any]:
    """The family's Hugging Face `config.json` dict (used by `dvl export` and the parity fixtures)."""
    from dvl_jax.models import families

    return families.get(self.family).hf_config.to_hf(self)



def _vision_config_type(family: str) -> type:
  """The family's `vision` dataclass (a SigLIP family has its own); the registry is asked late, as in from_hf."""
  from dvl_jax.models import families

  return families.get(family).vision_config_type


def _build(cls, d: dict[str, Any], **extra: Any):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  return cls(**{**kwargs, **extra})


# ---- presets (spec §2.7) -------------------------------------------------------------------------

QWEN25_VL_3B = ModelConfig(
    position_mode="mrope",
    vision=VisionConfig(out_hidden_size=2048),
    text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                    num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
)

QWEN25_VL_7B = ModelConfig(
    position_mode="mrope",
    vision=VisionConfig(out_hidden_size=3584),
    text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                    num_heads=28, num_kv_heads=4, tie_word_embeddings=False),
)

PRESETS = {"qwen2.5-vl-3b": QWEN25_VL_3B, "qwen2.5-vl-7b": QWEN25_VL_7B}
