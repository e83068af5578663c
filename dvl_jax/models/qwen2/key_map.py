"""Qwen2 / Qwen2.5 LM checkpoints (transformers' `Qwen2ForCausalLM`): the decoder's Hub names, one layout."""

from __future__ import annotations

from dvl_jax.models.decoder_key_map import DECODER_RULES
from dvl_jax.models.key_map import Layout

RULES = DECODER_RULES
LAYOUTS = (Layout("hub", (), ("model.",)),)
SIDE_FILES: dict[str, str] = {}
SIDE_FILES_LAYOUT = ""
