"""The released DiffusionVL-Qwen2.5-7B shape (spec §11): SigLIP-so400m minus its last layer + Qwen2.5-7B-Instruct."""

from __future__ import annotations

from dvl_jax.core.config import ModelConfig, TextConfig
from dvl_jax.models.diffusionvl_qwen.vision_config import SiglipVisionConfig

DIFFUSIONVL_QWEN_7B = ModelConfig(
    family="diffusionvl_qwen",
    position_mode="flat",
    vision=SiglipVisionConfig(out_hidden_size=3584),
    text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                    num_kv_heads=4, tie_word_embeddings=False, max_position_embeddings=32768),
)

PRESETS = {"diffusionvl-qwen2.5-7b": DIFFUSIONVL_QWEN_7B}
