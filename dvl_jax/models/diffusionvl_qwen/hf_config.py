"""DiffusionVL-Qwen / LLaVA-OneVision `config.json` <-> `ModelConfig`.

Reads transformers' `llava_onevision` configs (SigLIP `vision_config`, Qwen2 `text_config`) and DiffusionVL's
LLaVA configs (`diffusionvl_qwen`, the AR `llava_qwen`: a Qwen2 config at the top level plus `mm_*` fields;
the tower is LLaVA's fixed SigLIP-so400m shape with its last layer removed). `to_hf` writes a
`llava_onevision` config that transformers loads, plus the keys that make export -> convert lossless.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dvl_jax.core.config import ModelConfig
from dvl_jax.models import decoder_hf
from dvl_jax.models.diffusionvl_qwen.vision_config import SiglipVisionConfig, pinpoints_from_llava

_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _require(hf: dict[str, Any], key: str, want: Any, why: str) -> None:
  if hf.get(key, want) != want:
    raise ValueError(f"{key}={hf[key]!r}, but this family needs {want!r} ({why})")


def _from_onevision(hf: dict[str, Any]) -> tuple[SiglipVisionConfig, dict[str, Any], dict[str, Any]]:
  v, t = hf["vision_config"], hf["text_config"]
  layers = v["num_hidden_layers"]
  if hf.get("vision_feature_layer", -1) not in (-1, layers):
    raise ValueError(f"vision_feature_layer={hf['vision_feature_layer']}: DiffusionVL's features are the last "
                     "layer the tower keeps; drop the layers after the feature layer and set it to -1")
  _require(hf, "vision_feature_select_strategy", "full", "SigLIP has no CLS token to drop")
  _require(hf, "projector_hidden_act", "gelu", "mlp2x_gelu uses the exact GELU")
  _require(v, "hidden_act", "gelu_pytorch_tanh", "SigLIP's MLP")
  size = v.get("image_size", 384)
  pinpoints = tuple((h // size, w // size) for h, w in hf.get("image_grid_pinpoints") or [[size, size]])
  vision = SiglipVisionConfig(
      depth=layers, hidden_size=v["hidden_size"], num_heads=v["num_attention_heads"],
      intermediate_size=v["intermediate_size"], out_hidden_size=t["hidden_size"],
      in_channels=v.get("num_channels", 3), patch_size=v.get("patch_size", 14), image_size=size,
      layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
      image_aspect_ratio=hf.get("dvl_image_aspect_ratio", hf.get("vision_aspect_ratio", "anyres_max_9")),
      grid_pinpoints=pinpoints, patch_merge_type=hf.get("dvl_patch_merge_type", "spatial_unpad"))
  ids = decoder_hf.token_ids_from_hf(hf, t, _IDS)
  if isinstance(hf.get("image_token_index"), int):
    ids["image_token_id"] = hf["image_token_index"]
  return vision, t, ids


def _from_llava(hf: dict[str, Any]) -> tuple[SiglipVisionConfig, dict[str, Any], dict[str, Any]]:
  _require(hf, "mm_projector_type", "mlp2x_gelu", "DiffusionVL-Qwen's projector")
  base = SiglipVisionConfig()  # LLaVA builds the tower from SigLipVisionConfig() defaults: so400m, 27 - 1 layers
  if hf.get("mm_hidden_size", base.hidden_size) != base.hidden_size:
    raise ValueError(f"mm_hidden_size={hf['mm_hidden_size']}: DiffusionVL's SigLIP tower has {base.hidden_size}")
  merge = hf.get("mm_patch_merge_type", "flat")
  vision = dataclasses.replace(
      base, out_hidden_size=hf["hidden_size"], image_aspect_ratio=hf.get("image_aspect_ratio", "square"),
      grid_pinpoints=pinpoints_from_llava(hf.get("image_grid_pinpoints", "(1x1),...,(6x6)"), base.image_size),
      patch_merge_type="spatial_unpad" if "unpad" in merge else "flat")
  ids = decoder_hf.token_ids_from_hf(hf, hf, _IDS + ("image_token_id",))
  return vision, hf, ids


def from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """The config of a `llava_onevision` / `diffusionvl_qwen` / `llava_qwen` `config.json` dict."""
  reader = _from_onevision if hf.get("model_type") == "llava_onevision" else _from_llava
  vision, t, ids = reader(hf)
  fields = decoder_hf.diffusion_fields_from_hf(hf, "flat")
  if fields["position_mode"] != "flat":
    raise ValueError(f"DiffusionVL-Qwen has 1-D positions; dvl_position_mode={fields['position_mode']!r}")
  # `vision` may be overridden: DiffusionVL's configs do not describe the tower (LLaVA hard-codes so400m).
  return ModelConfig(**{"family": "diffusionvl_qwen", "vision": vision, "text": decoder_hf.text_from_hf(t, hf),
                        **ids, **fields, **overrides})


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A `LlavaOnevisionConfig` dict (SigLIP + Qwen2) that transformers loads."""
  t, v = cfg.text, cfg.vision
  return {
      "architectures": ["LlavaOnevisionForConditionalGeneration"],
      "model_type": "llava_onevision",
      "text_config": {"model_type": "qwen2", **decoder_hf.text_to_hf(t), "torch_dtype": cfg.param_dtype,
                      **{k: getattr(cfg, k) for k in _IDS}},
      "vision_config": {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
                        "intermediate_size": v.intermediate_size, "num_hidden_layers": v.depth,
                        "num_attention_heads": v.num_heads, "num_channels": v.in_channels,
                        "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu_pytorch_tanh",
                        "layer_norm_eps": v.layer_norm_eps, "attention_dropout": 0.0, "vision_use_head": False},
      "image_token_index": cfg.image_token_id,
      "vision_feature_layer": -1,
      "vision_feature_select_strategy": "full",
      "vision_aspect_ratio": v.image_aspect_ratio if v.anyres else "anyres_max_4",
      "image_grid_pinpoints": [[r * v.image_size, c * v.image_size] for r, c in v.grid_pinpoints],
      "projector_hidden_act": "gelu",
      "multimodal_projector_bias": True,
      "tie_word_embeddings": t.tie_word_embeddings,
      "torch_dtype": cfg.param_dtype,
      **{k: getattr(cfg, k) for k in _IDS},
      "dvl_image_aspect_ratio": v.image_aspect_ratio,
      "dvl_patch_merge_type": v.patch_merge_type,
      **decoder_hf.diffusion_fields_to_hf(cfg),
  }


def start_config(lm: dict[str, Any], siglip: dict[str, Any], stage: int = 1, **overrides: Any) -> ModelConfig:
  """The model a training stage starts (spec §7.2) from a Qwen2 LM `config.json` and a SigLIP one (`siglip` or
  `siglip_vision_model`): the tower minus its last layer; stage 1 square images without newlines, stage 2
  DiffusionVL's anyres_max_4 over (1x1)..(6x6) with `image_newline`."""
  if stage not in (1, 2):
    raise ValueError(f"stage={stage}; DiffusionVL-Qwen trains in stage 1 (connector) and stage 2 (BD3-LM)")
  if lm.get("model_type") != "qwen2":
    raise ValueError(f"--lm config.json has model_type={lm.get('model_type')!r}; expected a Qwen2 / Qwen2.5 LM (qwen2)")
  v = siglip.get("vision_config", siglip) if siglip.get("model_type") == "siglip" else siglip
  if v.get("model_type") not in ("siglip_vision_model", None):
    raise ValueError(f"--vision config.json has model_type={siglip.get('model_type')!r}; expected siglip or "
                     "siglip_vision_model")
  _require(v, "hidden_act", "gelu_pytorch_tanh", "SigLIP's MLP")
  vision = SiglipVisionConfig(
      depth=v["num_hidden_layers"] - 1, hidden_size=v["hidden_size"], num_heads=v["num_attention_heads"],
      intermediate_size=v["intermediate_size"], out_hidden_size=lm["hidden_size"], in_channels=v.get("num_channels", 3),
      patch_size=v["patch_size"], image_size=v["image_size"], layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)))
  if stage == 1:
    vision = dataclasses.replace(vision, image_aspect_ratio="square", patch_merge_type="flat")
  return from_hf({**lm, "model_type": "llava_qwen", "mm_projector_type": "mlp2x_gelu"},
                 **{"vision": vision, **overrides})
