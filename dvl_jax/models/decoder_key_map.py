"""Key map rows of the shared Qwen2 decoder (`decoder.TextModel` under `text`) and the untied lm_head.

Hub names are those of transformers' `Qwen2ForCausalLM` (`model.*`, `lm_head.weight`), which Qwen2.5-VL's
Hub checkpoints use for their language model too.
"""

from __future__ import annotations

from dvl_jax.models.key_map import EMBED_TOKENS, Rule, Transform, linear, norm

MLP = ("gate_proj", "up_proj", "down_proj")

DECODER_RULES: tuple[Rule, ...] = (
    Rule(EMBED_TOKENS, "text.embed_tokens.embedding", Transform.IDENTITY),
    *norm("model.layers.{i}.input_layernorm", "text.layers.input_layernorm"),
    *norm("model.layers.{i}.post_attention_layernorm", "text.layers.post_attention_layernorm"),
    *[r for p in ("q_proj", "k_proj", "v_proj")
      for r in linear(f"model.layers.{{i}}.self_attn.{p}", f"text.layers.self_attn.{p}")],
    *linear("model.layers.{i}.self_attn.o_proj", "text.layers.self_attn.o_proj", bias=False),
    *[r for p in MLP for r in linear(f"model.layers.{{i}}.mlp.{p}", f"text.layers.mlp.{p}", bias=False)],
    *norm("model.norm", "text.norm"),
    *linear("lm_head", "lm_head", bias=False),  # absent from the model when embeddings are tied
)
