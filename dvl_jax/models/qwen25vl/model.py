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

from dvl_jax.core.config import ModelConfig
from dvl_jax.core.vision_layout import VisionLayout, vision_layout
from dvl_jax.models.decoder_lm import DecoderLM
from dvl_jax.models.interface import ParamGroup
from dvl_jax.models.qwen25vl.vision import VisionTower
from dvl_jax.models.qwen25vl.rope import get_rope_index


class Qwen25VL(DecoderLM):
  """Qwen2.5-VL as an `interface.DiffusionLM`: the ViT + PatchMerger under `visual`, the decoder under `text`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.visual = VisionTower(cfg, rngs=rngs)  # first: the init draws its params before the decoder's
    super().__init__(cfg, rngs=rngs)

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

  @staticmethod
  def param_group(path: tuple[str, ...]) -> ParamGroup:
    """The PatchMerger is the projector (stage 1 trains it alone); the rest of `visual` is the ViT."""
    if path[:2] == ("visual", "merger"):
      return "projector"
    return "vision" if path[:1] == ("visual",) else "language"

  def _features(self, pixel_values: jax.Array, image_grid_thw: Any, vision: VisionLayout | None) -> jax.Array:
    if vision is None:
      if image_grid_thw is None:
        raise ValueError("pixel_values given without image_grid_thw (or a precomputed `vision` layout)")
      vision = vision_layout(np.asarray(image_grid_thw), self.config.vision, pad_patches=int(pixel_values.shape[0]))
    return self.image_features(pixel_values, vision)

  def _mrope_positions(self, input_ids: Any, image_grid_thw: Any, attention_mask: Any) -> jax.Array:
    if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
      raise ValueError("positions='mrope' needs concrete input_ids; under jit pass the array from "
                       "dvl_jax.models.qwen25vl.rope.get_rope_index(...)")
    pos, _ = get_rope_index(np.asarray(input_ids), None if image_grid_thw is None else np.asarray(image_grid_thw),
                            np.asarray(attention_mask), image_token_id=self.config.image_token_id,
                            vision_start_token_id=self.config.vision_start_token_id,
                            spatial_merge_size=self.config.vision.spatial_merge_size)
    return jnp.asarray(pos, jnp.int32)
