"""A text-only Qwen2 / Qwen2.5 causal LM (transformers' `Qwen2ForCausalLM`) as an `interface.DiffusionLM`.

The same decoder as Qwen2.5-VL's language model with 1-D RoPE: `flat` positions only, no image features.
Translated with the BD3-LM objective it is a block-diffusion language model; it is also the language half
the SigLIP + Qwen2.5 family starts from (spec §7.5).
"""

from __future__ import annotations

from dvl_jax.models.decoder_lm import DecoderLM


class Qwen2LM(DecoderLM):
  """`text` (embedding, layers, final norm) and `lm_head`, exactly as `DecoderLM` builds them."""
