"""The Qwen2 decoder's fields of a Hugging Face `config.json`, shared by every family built on that decoder.

`t` is the dict that holds the text fields (`text_config` in Qwen2.5-VL / DiffusionVL, the top level in a
plain Qwen2 LM); `hf` is the whole config, read for fields some checkpoints keep only at the top level.
"""

from __future__ import annotations

from typing import Any

from dvl_jax.core.config import TextConfig


def text_from_hf(t: dict[str, Any], hf: dict[str, Any]) -> TextConfig:
  rope_scaling = t.get("rope_scaling") or hf.get("rope_scaling") or {}
  tie = t.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
  return TextConfig(
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


def text_to_hf(t: TextConfig) -> dict[str, Any]:
  """The decoder fields transformers' Qwen2 / Qwen2.5-VL text configs read (no rope scaling, no dtype)."""
  return {
      "vocab_size": t.vocab_size,
      "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size,
      "num_hidden_layers": t.num_layers,
      "num_attention_heads": t.num_heads,
      "num_key_value_heads": t.num_kv_heads,
      "rope_theta": t.rope_theta,
      "rms_norm_eps": t.rms_norm_eps,
      "tie_word_embeddings": t.tie_word_embeddings,
      "max_position_embeddings": t.max_position_embeddings,
      "hidden_act": "silu",
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": 32768,
      "max_window_layers": t.num_layers,
  }


def token_ids_from_hf(hf: dict[str, Any], t: dict[str, Any], keys: tuple[str, ...]) -> dict[str, int]:
  """The integer token ids among `keys` (top level first, then the text dict), plus `mask_token_id`."""
  ids = {}
  for key in keys:
    value = hf.get(key, t.get(key))
    if isinstance(value, int):
      ids[key] = value
  if isinstance(hf.get("mask_token_id"), int):
    ids["mask_token_id"] = hf["mask_token_id"]
  return ids


def diffusion_fields_from_hf(hf: dict[str, Any], default_position_mode: str) -> dict[str, Any]:
  """`block_size` and `position_mode` where the config fixes them.

  The Qwen->DiffusionVL conversion script writes bd3lm_block_size 4 with enable_bd3lm false and evaluation
  overrides it to 8 (spec §8.1, §9.1): only a model trained with BD3-LM fixes it.
  """
  fields: dict[str, Any] = {"position_mode": hf.get("dvl_position_mode", default_position_mode)}
  if hf.get("bd3lm_block_size") and hf.get("enable_bd3lm", True):
    fields["block_size"] = int(hf["bd3lm_block_size"])
  return fields


def diffusion_fields_to_hf(cfg: Any) -> dict[str, Any]:
  """Extra keys transformers keeps and ignores; they make export -> convert lossless."""
  return {"mask_token_id": cfg.mask_token_id, "bd3lm_block_size": cfg.block_size,
          "dvl_position_mode": cfg.position_mode}
