"""The full Qwen2.5-VL / DiffusionVL model: vision tower, image-feature splicing, decoder, lm_head.

`input_ids` follow the Hugging Face convention: each image appears as `image_token_id` repeated once
per merged patch; image features fill those slots in row-major order over the whole batch (like
`masked_scatter`). Position modes (design §2): `mrope` = Qwen2.5-VL's 3-D M-RoPE from the host-side
`get_rope_index`; `flat` = `arange` positions for every token (DiffusionVL, spec §3.2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.config import ModelConfig
from dvl_jax.model.layers import Dense, dtypes
from dvl_jax.model.rope import get_rope_index, text_rope
from dvl_jax.model.text import KV, TextModel
from dvl_jax.model.vision import VisionTower
from dvl_jax.model.vision_layout import VisionLayout, vision_layout


class Qwen25VL(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pd, cd = dtypes(cfg)
    self.visual = VisionTower(cfg, rngs=rngs)
    self.text = TextModel(cfg, rngs=rngs)
    self.lm_head = None if cfg.text.tie_word_embeddings else Dense(
        cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), use_bias=False, param_dtype=pd,
        compute_dtype=cd, rngs=rngs)

  # ---- pieces (used by the losses and samplers) -------------------------------------------------
  def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """`[N_patches, patch_dim]` -> `[N_patches / 4, H]` merged image tokens in row-major order."""
    return self.visual(pixel_values, layout)

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings `[B, L, H]` with image features spliced at the image-token positions."""
    emb = self.text.embed_tokens(input_ids)
    if image_features is None:
      return emb
    is_image = (input_ids == self.config.image_token_id).reshape(-1)
    order = jnp.clip(jnp.cumsum(is_image) - 1, 0, image_features.shape[0] - 1)
    spliced = jnp.where(is_image[:, None], image_features.astype(emb.dtype)[order], emb.reshape(-1, emb.shape[-1]))
    return spliced.reshape(emb.shape)

  def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = self.config.text
    return text_rope(positions, t.head_dim, t.rope_theta, t.mrope_section, dtypes(self.config)[1])

  def decode(self, embeds: jax.Array, positions: jax.Array, spec: AttentionSpec, cache: KV | None = None,
             *, return_kv: bool = False) -> tuple[jax.Array, KV | None]:
    """Decoder over embeddings with `[B, L]` (flat) or `[3, B, L]` (M-RoPE) positions."""
    cos, sin = self.rope(positions)
    return self.text(embeds, cos, sin, spec, cache, return_kv=return_kv)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """lm_head (tied or not) in the compute dtype, returned in fp32 (spec §10.7)."""
    if self.lm_head is None:
      return self.text.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  # ---- the model call (design §3) ------------------------------------------------------------
  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
               image_grid_thw: Any = None, positions: str | jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, vision: VisionLayout | None = None,
               mask_kind: str = "causal") -> jax.Array:
    """Logits `[B, L, vocab]` (fp32) of the autoregressive model.

    `positions` is "mrope", "flat", an explicit `[B, L]` / `[3, B, L]` array, or None for the config's
    `position_mode`; "mrope" needs concrete
    `input_ids`/`image_grid_thw` (host-side `get_rope_index`), so under `jit` pass the array instead.
    `vision` (from `vision_layout`) replaces `image_grid_thw` under `jit`. `attention_mask` `[B, L]`
    marks real tokens (1) and padding (0).
    """
    b, n = input_ids.shape
    mask = jnp.ones((b, n), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    features = None
    if pixel_values is not None:
      if vision is None:
        if image_grid_thw is None:
          raise ValueError("pixel_values given without image_grid_thw (or a precomputed `vision` layout)")
        vision = vision_layout(np.asarray(image_grid_thw), self.config.vision,
                               pad_patches=int(pixel_values.shape[0]))
      features = self.image_features(pixel_values, vision)
    embeds = self.embed(input_ids, features)
    mode = self.config.position_mode if positions is None else positions
    positions = self.positions(input_ids, image_grid_thw, mask, mode)
    hidden, _ = self.decode(embeds, positions, AttentionSpec.self_attention(mask, kind=mask_kind))
    return self.logits(hidden)

  def positions(self, input_ids: Any, image_grid_thw: Any, attention_mask: Any,
                mode: str | jax.Array) -> jax.Array:
    """Resolves a position mode to an array (see `__call__`)."""
    if not isinstance(mode, str):
      return jnp.asarray(mode)
    b, n = input_ids.shape
    if mode == "flat":
      return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    if mode != "mrope":
      raise ValueError(f"positions must be 'mrope', 'flat' or an array, got {mode!r}")
    if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
      raise ValueError("positions='mrope' needs concrete input_ids; under jit pass the array from "
                       "dvl_jax.model.rope.get_rope_index(...)")
    pos, _ = get_rope_index(np.asarray(input_ids), None if image_grid_thw is None else np.asarray(image_grid_thw),
                            np.asarray(attention_mask), image_token_id=self.config.image_token_id,
                            vision_start_token_id=self.config.vision_start_token_id,
                            spatial_merge_size=self.config.vision.spatial_merge_size)
    return jnp.asarray(pos, jnp.int32)
