"""Qwen2.5-VL / DiffusionVL `config.json` <-> `ModelConfig`.

DiffusionVL's top-level text fields are wrong (spec §8.1): text fields always come from `text_config` when it
is present. `to_hf` writes a Qwen2.5-VL config that transformers loads, plus the keys that make
`dvl export` -> `dvl convert` lossless.
"""

from __future__ import annotations

from typing import Any

from dvl_jax.core.config import ModelConfig, VisionConfig
from dvl_jax.models import decoder_hf


def from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """The config of a Qwen2.5-VL / DiffusionVL-QwenVL `config.json` dict; `overrides` set other fields."""
  model_type = hf.get("model_type", "")
  if "vision_config" not in hf:
    raise ValueError("config.json has no `vision_config`; this is not a Qwen2.5-VL/DiffusionVL checkpoint")
  # DiffusionVL's top-level text fields are Qwen2_5_VLTextConfig defaults, not the model: use text_config.
  t = dict(hf["text_config"]) if "text_config" in hf else dict(hf)
  if model_type == "diffusionvl_qwenvl" and "text_config" not in hf:
    raise ValueError("DiffusionVL config.json has no `text_config`; cannot trust its top-level fields")
  v = hf["vision_config"]
  text = decoder_hf.text_from_hf(t, hf)
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
  ids = decoder_hf.token_ids_from_hf(hf, t, ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id"))
  ids.update(decoder_hf.diffusion_fields_from_hf(hf, "mrope" if model_type == "qwen2_5_vl" else "flat"))
  return ModelConfig(vision=vision, text=text, **{**ids, **overrides})


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A Qwen2.5-VL `config.json` dict that `transformers` loads."""
  t, v = cfg.text, cfg.vision
  text_config = {"model_type": "qwen2_5_vl_text", **decoder_hf.text_to_hf(t),
                 "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
                 "torch_dtype": cfg.param_dtype}
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
      "image_token_id": cfg.image_token_id,
      "video_token_id": cfg.video_token_id,
      "vision_start_token_id": cfg.vision_start_token_id,
      "vision_end_token_id": cfg.vision_end_token_id,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id,
      **decoder_hf.diffusion_fields_to_hf(cfg),
  }
