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

from dvl_jax import storage

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The whole VLM plus the token ids and block size the diffusion code needs (design §2)."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
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
  scan_layers: bool = True
  remat_policy: str = "none"  # none | full | dots_saveable | nothing_saveable
  attention_backend: str = "auto"

  def __post_init__(self):
    vocab = self.text.vocab_size
    for name in ("mask_token_id", "eos_token_id", "image_token_id", "pad_token_id"):
      value = getattr(self, name)
      if not 0 <= value < vocab:
        raise ValueError(f"{name}={value} is outside the {vocab}-row vocabulary; pass {name}=<id> "
                         "(e.g. a ModelConfig.from_hf / dvl convert override)")
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
    vision = _build(VisionConfig, d.pop("vision", {}))
    text = _build(TextConfig, d.pop("text", {}))
    return _build(cls, d, vision=vision, text=text)

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2)

  @classmethod
  def load(cls, path: str) -> "ModelConfig":
    """From a `config.json` written by `save`; `path` may be a `gs://` URL."""
    return cls.from_dict(json.loads(storage.as_path(path).read_text()))

  # ---- Hugging Face ---------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: dict[str, Any] | str, **overrides: Any) -> "ModelConfig":
    """Builds the config from a HF `config.json` dict or path (Qwen2.5-VL or DiffusionVL layout)."""
    if isinstance(hf, (str, os.PathLike)):
      path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
      with open(path) as f:
        hf = json.load(f)
    model_type = hf.get("model_type", "")
    if model_type not in _KNOWN_MODEL_TYPES:
      raise ValueError(
          f"config.json has model_type={model_type!r}; expected one of {sorted(_KNOWN_MODEL_TYPES)} "
          "(a Qwen2.5-VL or DiffusionVL-QwenVL checkpoint)")
    if "vision_config" not in hf:
      raise ValueError("config.json has no `vision_config`; this is not a Qwen2.5-VL/DiffusionVL checkpoint")
    # DiffusionVL's top-level text fields are Qwen2_5_VLTextConfig defaults, not the model: use text_config.
    t = dict(hf["text_config"]) if "text_config" in hf else dict(hf)
    if model_type == "diffusionvl_qwenvl" and "text_config" not in hf:
      raise ValueError("DiffusionVL config.json has no `text_config`; cannot trust its top-level fields")
    v = hf["vision_config"]
    rope_scaling = t.get("rope_scaling") or hf.get("rope_scaling") or {}
    tie = t.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    text = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        rope_theta=float(t.get("rope_theta", 1_000_000.0)),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(tie),
        mrope_section=tuple(rope_scaling.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
    )
    vision = VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"],
        out_hidden_size=v.get("out_hidden_size", text.hidden_size),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=v.get("tokens_per_second", 2),
    )
    ids = {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "bos_token_id", "eos_token_id", "pad_token_id"):
      value = hf.get(key, t.get(key))
      if isinstance(value, int):
        ids[key] = value
    if isinstance(hf.get("mask_token_id"), int):
      ids["mask_token_id"] = hf["mask_token_id"]
    # The Qwen->DiffusionVL conversion script writes bd3lm_block_size 4 with enable_bd3lm false and
    # evaluation overrides it to 8 (spec §8.1, §9.1): only a model trained with BD3-LM fixes it.
    if hf.get("bd3lm_block_size") and hf.get("enable_bd3lm", True):
      ids["block_size"] = int(hf["bd3lm_block_size"])
    ids["position_mode"] = hf.get("dvl_position_mode", "mrope" if model_type == "qwen2_5_vl" else "flat")
    return cls(vision=vision, text=text, **{**ids, **overrides})

  def to_hf(self) -> dict[str, Any]:
    """A Qwen2.5-VL `config.json` dict that `transformers` loads (used by `dvl export`)."""
    t, v = self.text, self.vision
    text_config = {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "rope_theta": t.rope_theta,
        "rms_norm_eps": t.rms_norm_eps,
        "tie_word_embeddings": t.tie_word_embeddings,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": t.num_layers,
        "torch_dtype": self.param_dtype,
    }
    vision_config = {
        "model_type": "qwen2_5_vl",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "in_channels": v.in_channels,
        "in_chans": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "tokens_per_second": v.tokens_per_second,
        "hidden_act": "silu",
    }
    top = {k: v for k, v in text_config.items() if k != "model_type"}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **top,
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        # Extra keys transformers keeps and ignores; they make export -> convert lossless.
        "mask_token_id": self.mask_token_id,
        "bd3lm_block_size": self.block_size,
        "dvl_position_mode": self.position_mode,
    }


_KNOWN_MODEL_TYPES = frozenset({"qwen2_5_vl", "diffusionvl_qwenvl", "llada_qwen"})


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


def tiny_config(**overrides: Any) -> ModelConfig:
  """A few-layer model with a tiny vocabulary for tests and demos (mask id inside the vocab)."""
  vision = VisionConfig(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                        fullatt_block_indexes=(1, 3))
  text = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, rope_theta=10_000.0, tie_word_embeddings=False, mrope_section=(2, 3, 3),
                    max_position_embeddings=4096)
  base = ModelConfig(vision=vision, text=text, image_token_id=250, video_token_id=251,
                     vision_start_token_id=248, vision_end_token_id=249, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0, mask_token_id=255)
  return base.replace(**overrides)
