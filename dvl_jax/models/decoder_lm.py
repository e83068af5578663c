"""`DecoderLM`: the Qwen2 decoder + lm_head half of `interface.DiffusionLM`, shared by the families built on it.

A family subclasses it and adds its vision path by overriding `image_features`, `embed`, `_features`
(pixels -> features for the model call) and `_mrope_positions`; a text-only family uses it as it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dvl_jax.attention import masks
from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.config import ModelConfig
from dvl_jax.core.vision_layout import VisionLayout
from dvl_jax.models.decoder import Packing, TextModel
from dvl_jax.models.interface import KV, ParamGroup
from dvl_jax.models.layers import Dense, dtypes
from dvl_jax.models.rope import text_rope


class DecoderLM(nnx.Module):
  """The decoder under `text`, an untied `lm_head` (None when tied); no vision path."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pd, cd = dtypes(cfg)
    self.text = TextModel(cfg, rngs=rngs)
    self.lm_head = None if cfg.text.tie_word_embeddings else Dense(
        cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), use_bias=False, param_dtype=pd,
        compute_dtype=cd, rngs=rngs)

  # ---- interface.DiffusionLM ----------------------------------------------------------------------
  def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    raise ValueError(f"the {self.config.family} model family has no vision tower; pass no images")

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings `[B, L, H]`."""
    if image_features is not None:
      raise ValueError(f"the {self.config.family} model family has no vision tower; pass no image features")
    return self.text.embed_tokens(input_ids)

  def decode(self, embeds: jax.Array, positions: jax.Array, spec: AttentionSpec, cache: KV | None = None,
             *, return_kv: bool = False, packed: jax.Array | None = None,
             fill: KV | None = None) -> tuple[jax.Array, KV | None]:
    """Decoder over embeddings with `[B, L]` (flat) or `[3, B, L]` (M-RoPE) positions."""
    t = self.config.text
    b, n = embeds.shape[:2]
    packing = None if packed is None else Packing(packed, b, n)
    with jax.named_scope("decoder"):  # names the decoder's ops in profiles (`benchmarks/sampling.py --split`)
      cos, sin = text_rope(positions, t.head_dim, t.rope_theta, t.mrope_section, dtypes(self.config)[1])
      return self.text(embeds, cos, sin, spec, cache, return_kv=return_kv, packing=packing, fill=fill)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """lm_head (tied or not) in the compute dtype, returned in fp32 (spec §10.7)."""
    with jax.named_scope("lm_head"):
      if self.lm_head is None:
        return self.text.embed_tokens.attend(hidden).astype(jnp.float32)
      return self.lm_head(hidden).astype(jnp.float32)

  def positions(self, input_ids: Any, image_grid_thw: Any, attention_mask: Any,
                mode: str | jax.Array) -> jax.Array:
    """Resolves a position mode ("flat", "mrope" or an array) to an array."""
    if not isinstance(mode, str):
      return jnp.asarray(mode)
    b, n = input_ids.shape
    if mode == "flat":
      return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    if mode != "mrope":
      raise ValueError(f"positions must be 'mrope', 'flat' or an array, got {mode!r}")
    return self._mrope_positions(input_ids, image_grid_thw, attention_mask)

  @staticmethod
  def param_group(path: tuple[str, ...]) -> ParamGroup:
    return "language"

  # ---- the model call (design §3) ----------------------------------------------------------------
  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               image_grid_thw: Any = None, positions: str | jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, vision: VisionLayout | None = None,
               mask_kind: str = "causal") -> jax.Array:
    """Logits `[B, L, vocab]` (fp32) of the autoregressive model.

    `positions` is "mrope", "flat", an explicit `[B, L]` / `[3, B, L]` array, or None for the config's
    `position_mode`; "mrope" needs concrete
    `input_ids`/`image_grid_thw` (host-side `get_rope_index`), so under `jit` pass the array instead.
    `vision` (from `vision_layout`) replaces `image_grid_thw` under `jit`. `attention_mask` `[B, L]`
    marks real tokens (1) and padding (0). `mask_kind` "block_causal" uses the config's `block_size`.
    """
    b, n = input_ids.shape
    mask = jnp.ones((b, n), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    features = None if pixel_values is None else self._features(pixel_values, image_grid_thw, vision)
    embeds = self.embed(input_ids, features)
    mode = self.config.position_mode if positions is None else positions
    positions = self.positions(input_ids, image_grid_thw, mask, mode)
    block = {"block_size": self.config.block_size} if mask_kind in masks.BLOCK_KINDS else {}
    hidden, _ = self.decode(embeds, positions, AttentionSpec.self_attention(mask, kind=mask_kind, **block))
    return self.logits(hidden)

  # ---- what a family with a vision path overrides --------------------------------------------------
  def _features(self, pixel_values: jax.Array, image_grid_thw: Any, vision: VisionLayout | None) -> jax.Array:
    raise ValueError(f"the {self.config.family} model family has no vision tower; pass no pixel_values")

  def _mrope_positions(self, input_ids: Any, image_grid_thw: Any, attention_mask: Any) -> jax.Array:
    raise ValueError(f"the {self.config.family} model family has 1-D positions only; use positions='flat'")
