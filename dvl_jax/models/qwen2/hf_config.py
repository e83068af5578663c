"""Qwen2 / Qwen2.5 LM `config.json` (model_type "qwen2") <-> `ModelConfig` (no vision, flat positions)."""

from __future__ import annotations

from typing import Any

from dvl_jax.core.config import ModelConfig
from dvl_jax.models import decoder_hf

# Qwen2 LMs keep their text fields at the top level; `mask_token_id` must come from the converted model or an
# override, as Qwen2.5's vocabulary has no mask token of its own (DiffusionVL adds <|mask|> = 151671).
_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  text = decoder_hf.text_from_hf(hf, hf)
  fields = {**decoder_hf.token_ids_from_hf(hf, hf, _IDS), **decoder_hf.diffusion_fields_from_hf(hf, "flat")}
  if fields["position_mode"] != "flat":
    raise ValueError(f"a qwen2 LM has 1-D positions; dvl_position_mode={fields['position_mode']!r}")
  return ModelConfig(family="qwen2", vision=None, text=text, **{**fields, **overrides})


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A `Qwen2ForCausalLM` `config.json` dict that transformers loads."""
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      **decoder_hf.text_to_hf(cfg.text),
      "torch_dtype": cfg.param_dtype,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id,
      **decoder_hf.diffusion_fields_to_hf(cfg),
  }
