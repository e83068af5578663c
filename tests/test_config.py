"""ModelConfig from HF config.json files (Qwen2.5-VL old/new layouts, DiffusionVL) and presets."""

import json

import pytest

from dvl_jax.core.config import QWEN25_VL_3B, QWEN25_VL_7B, ModelConfig
from dvl_jax.testing.tiny import tiny_config

HUB_3B = {  # the published Qwen2.5-VL-3B-Instruct layout: text fields at the top, no text_config
    "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 128000,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                      "out_hidden_size": 2048, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2},
}


def test_hub_layout_gives_the_3b_preset():
  assert ModelConfig.from_hf(HUB_3B) == QWEN25_VL_3B


def test_diffusionvl_layout_reads_text_config_not_wrong_top_level_fields():
  text = {k: HUB_3B[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta",
                                 "tie_word_embeddings", "rope_scaling")}
  dvl = {"model_type": "diffusionvl_qwenvl", "hidden_size": 8192, "num_hidden_layers": 80, "rms_norm_eps": 1e-5,
         "rope_scaling": None, "text_config": text, "vision_config": HUB_3B["vision_config"],
         "image_token_id": 151655, "bd3lm_block_size": 8, "eos_token_id": 151645}
  cfg = ModelConfig.from_hf(dvl)
  assert cfg.text == QWEN25_VL_3B.text
  assert cfg.vision == QWEN25_VL_3B.vision
  assert cfg.block_size == 8 and cfg.position_mode == "flat"


def test_to_hf_round_trips_and_loads_in_transformers(tmp_path):
  from transformers import Qwen2_5_VLConfig

  for cfg in (tiny_config(), QWEN25_VL_7B):
    hf = Qwen2_5_VLConfig(**cfg.to_hf())
    hf.save_pretrained(tmp_path)
    back = ModelConfig.from_hf(str(tmp_path))
    assert back.text == cfg.text and back.vision == cfg.vision
    assert back.image_token_id == cfg.image_token_id


def test_presets_match_spec_table():
  t3, t7 = QWEN25_VL_3B.text, QWEN25_VL_7B.text
  assert (t3.hidden_size, t3.num_layers, t3.num_heads, t3.num_kv_heads, t3.head_dim) == (2048, 36, 16, 2, 128)
  assert (t7.hidden_size, t7.num_layers, t7.num_heads, t7.num_kv_heads, t7.head_dim) == (3584, 28, 28, 4, 128)
  assert (t3.vocab_size, t7.vocab_size, t3.tie_word_embeddings, t7.tie_word_embeddings) == (151936, 152064, True, False)
  assert QWEN25_VL_7B.vision.out_hidden_size == 3584 and QWEN25_VL_3B.vision.head_dim == 80


def test_bad_configs_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="model_type"):
    ModelConfig.from_hf({"model_type": "llama"})
  with pytest.raises(ValueError, match="vision_config"):
    ModelConfig.from_hf({"model_type": "qwen2_5_vl"})
  with pytest.raises(ValueError, match="text_config"):
    ModelConfig.from_hf({"model_type": "diffusionvl_qwenvl", "vision_config": {}})
  for field, value in (("param_dtype", "int8"), ("compute_dtype", "bf16")):
    with pytest.raises(ValueError, match=f"{field}='{value}' is not a floating-point dtype; use one of"):
      tiny_config(**{field: value})


def test_save_load_round_trip(tmp_path):
  cfg = tiny_config(block_size=4, compute_dtype="bfloat16")
  cfg.save(str(tmp_path / "c.json"))
  assert ModelConfig.load(str(tmp_path / "c.json")) == cfg
  json.loads((tmp_path / "c.json").read_text())
