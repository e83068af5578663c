"""DiffusionVL-Qwen / LLaVA-OneVision as an `interface.DiffusionLM`: SigLIP tower, `mlp2x_gelu` projector,
anyres packing with `image_newline`, the Qwen2.5 decoder (1-D `flat` positions, spec §7.5).

`pixel_values` are patch rows `[n_crops * grid**2, C*p*p]` (crops in image order, each crop's patches
row-major: `dvl_jax.data.llava_pixels`); the layout (`dvl_jax.data.anyres.AnyresLayout`) says how the
projected crop features become each image's tokens. In the model call, `image_grid_thw` carries the images'
`(height, width)` `[n_images, 2]` (transformers' `image_sizes`), from which the layout is built.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.core.config import ModelConfig
from dvl_jax.data.anyres import AnyresLayout, anyres_layout
from dvl_jax.models.decoder_lm import DecoderLM
from dvl_jax.models.diffusionvl_qwen.siglip import SiglipTower
from dvl_jax.models.interface import ParamGroup
from dvl_jax.models.layers import Dense, dtypes


def _torch_linear(din: int, dout: int, axes: tuple[str, str], cfg: ModelConfig, rngs: nnx.Rngs) -> Dense:
  """A Dense drawn as PyTorch's `nn.Linear` default (weight and bias ~ U(+-1/sqrt(fan_in))): LLaVA builds
  the stage-1 projector that way."""
  pd, cd = dtypes(cfg)
  layer = Dense(din, dout, axes=axes, use_bias=True, param_dtype=pd, compute_dtype=cd, rngs=rngs)
  bound = 1.0 / np.sqrt(din)
  layer.kernel[...] = jax.random.uniform(rngs.params(), (din, dout), jnp.float32, -bound, bound).astype(pd)
  layer.bias[...] = jax.random.uniform(rngs.params(), (dout,), jnp.float32, -bound, bound).astype(pd)
  return layer


def new_image_newline(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Param:
  """LLaVA's new `image_newline`: N(0, 1/H) (spec §7.2)."""
  h = cfg.text.hidden_size
  newline = jax.random.normal(rngs.params(), (h,), jnp.float32) / np.sqrt(h)
  return nnx.Param(newline.astype(dtypes(cfg)[0]), axes=("embed",))


class Projector(nnx.Module):
  """`mlp2x_gelu`: Linear(vision hidden -> H), exact GELU, Linear(H -> H)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    h = cfg.text.hidden_size
    self.linear_1 = _torch_linear(cfg.vision.hidden_size, h, ("vision_embed", "embed"), cfg, rngs)
    self.linear_2 = _torch_linear(h, h, ("embed", "embed"), cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class DiffusionVLQwen(DecoderLM):
  """`vision_tower` (SigLIP), `projector`, `image_newline` `[H]`, the decoder under `text`, `lm_head`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.vision.out_hidden_size != cfg.text.hidden_size:
      raise ValueError(f"vision.out_hidden_size={cfg.vision.out_hidden_size} must equal the LM hidden size "
                       f"{cfg.text.hidden_size} (the projector's output)")
    self.vision_tower = SiglipTower(cfg, rngs=rngs)
    self.projector = Projector(cfg, rngs=rngs)
    self.image_newline = new_image_newline(cfg, rngs)
    super().__init__(cfg, rngs=rngs)

  @staticmethod
  def new_connector(cfg: ModelConfig, seed: int) -> dict[tuple[str, ...], np.ndarray]:
    """What a stage-1 start adds to a Qwen2.5 LM and a SigLIP tower: the projector and `image_newline`, drawn
    as LLaVA's `initialize_vision_modules` does, by param path (a few tensors: no whole model in memory)."""
    rngs = nnx.Rngs(seed)
    projector, newline = Projector(cfg, rngs=rngs), new_image_newline(cfg, rngs)
    out = {("image_newline",): np.asarray(newline[...])}
    for path, var in nnx.to_flat_state(nnx.state(projector, nnx.Param)):
      out[("projector", *(str(p) for p in path))] = np.asarray(var[...])
    return out

  def crop_features(self, pixel_values: jax.Array) -> jax.Array:
    """Projected features of every crop, `[n_crops * grid**2, H]` (before packing)."""
    x = self.projector(self.vision_tower(pixel_values))
    return x.reshape(-1, x.shape[-1])

  def image_features(self, pixel_values: jax.Array, layout: AnyresLayout) -> jax.Array:
    """Patch rows -> one feature per image token `[M, H]`, packed as `layout` says (compute dtype)."""
    f = self.crop_features(pixel_values)
    taps = jnp.take(f, layout.source.reshape(-1), axis=0).reshape(*layout.source.shape, -1)  # [M, 4, H]
    wy, wx = (w.astype(f.dtype)[..., None] for w in (layout.wy, layout.wx))
    top = wx[:, 0] * taps[:, 0] + wx[:, 1] * taps[:, 1]
    bottom = wx[:, 0] * taps[:, 2] + wx[:, 1] * taps[:, 3]
    packed = wy[:, 0] * top + wy[:, 1] * bottom
    return jnp.where(layout.newline[:, None], self.image_newline[...].astype(f.dtype), packed)

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings `[B, L, H]`; image features replace the image tokens in order (row-major)."""
    emb = self.text.embed_tokens(input_ids)
    if image_features is None:
      return emb
    is_image = input_ids == self.config.image_token_id
    slot = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = jnp.take(image_features.astype(emb.dtype), jnp.clip(slot, 0, image_features.shape[0] - 1), axis=0)
    return jnp.where(is_image[..., None], gathered, emb)

  @staticmethod
  def param_group(path: tuple[str, ...]) -> ParamGroup:
    """The projector alone trains in stage 1; the tower has its own lr; `image_newline` trains with the LM."""
    return {"vision_tower": "vision", "projector": "projector"}.get(path[0] if path else "", "language")

  def _features(self, pixel_values: jax.Array, image_grid_thw: Any, vision: AnyresLayout | None) -> jax.Array:
    if vision is None:
      if image_grid_thw is None:
        raise ValueError("pixel_values given without the images' (height, width) sizes (image_grid_thw=) or a "
                         "precomputed `vision` layout (dvl_jax.data.anyres.anyres_layout)")
      vision = anyres_layout(np.asarray(image_grid_thw).reshape(-1, 2).tolist(), self.config.vision)
    return self.image_features(pixel_values, vision)
