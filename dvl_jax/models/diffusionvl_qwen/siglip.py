"""SigLIP vision tower as DiffusionVL runs it: patch embedding + learned positions, `depth` pre-norm encoder
layers, no post-layernorm applied and no pooling head (spec §11).

Exact to transformers' `SiglipVisionModel` `hidden_states[depth]`. Crops are independent sequences of
`grid**2` patches, so attention is a plain batched full attention over `[n_crops, T]`. `post_layernorm`
is kept as a param only so that checkpoints round-trip: DiffusionVL's features are taken before it.
Kernels are stored `[in, out]`; the Conv2d patch embedding is the matrix `weight.reshape(hidden, -1).T`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dvl_jax.attention.dispatch import attend
from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.config import ModelConfig
from dvl_jax.models.diffusionvl_qwen.vision_config import SiglipVisionConfig
from dvl_jax.models.layers import Dense, dtypes, run_stack, stack_modules


class LayerNorm(nnx.Module):
  """LayerNorm with bias; statistics in fp32 (PyTorch's fp32 path)."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    return (y + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class SiglipLayer(nnx.Module):
  """`x + attn(ln1(x))`, then `x + fc2(gelu_tanh(fc1(ln2(x))))`; attention over each crop's patches."""

  def __init__(self, v: SiglipVisionConfig, *, param_dtype: Any, compute_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=True, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    d = v.hidden_size
    self.num_heads = v.num_heads
    self.layer_norm1 = LayerNorm(d, eps=v.layer_norm_eps, param_dtype=param_dtype)
    self.layer_norm2 = LayerNorm(d, eps=v.layer_norm_eps, param_dtype=param_dtype)
    self.q_proj, self.k_proj, self.v_proj = (Dense(d, d, axes=("vision_embed", "vision_heads"), **kw)
                                             for _ in range(3))
    self.out_proj = Dense(d, d, axes=("vision_heads", "vision_embed"), **kw)
    self.fc1 = Dense(d, v.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
    self.fc2 = Dense(v.intermediate_size, d, axes=("vision_mlp", "vision_embed"), **kw)

  def __call__(self, x: jax.Array, spec: AttentionSpec, backend: str) -> jax.Array:
    n, t, d = x.shape
    h = self.layer_norm1(x)
    q, k, v = (p(h).reshape(n, t, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
    x = x + self.out_proj(attend(q, k, v, spec, backend=backend).reshape(n, t, d))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.layer_norm2(x)), approximate=True))


class SiglipTower(nnx.Module):
  """`pixel_values` `[n_crops * T, C*p*p]` patch rows -> features `[n_crops, T, hidden]` (compute dtype)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    v = cfg.vision
    param_dtype, compute_dtype = dtypes(cfg)
    self.tokens = v.tokens_per_crop
    self.remat_policy = cfg.remat_policy
    self.attention_backend = cfg.attention_backend
    self.patch_embed = Dense(v.patch_dim, v.hidden_size, axes=("vision_patch", "vision_embed"), use_bias=True,
                             param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    positions = 0.02 * jax.random.normal(rngs.params(), (v.tokens_per_crop, v.hidden_size), jnp.float32)
    self.position_embedding = nnx.Param(positions.astype(param_dtype), axes=(None, "vision_embed"))
    self.layers = stack_modules(
        lambda r: SiglipLayer(v, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=r), v.depth, rngs,
        stacked=cfg.scan_layers)
    self.post_layernorm = LayerNorm(v.hidden_size, eps=v.layer_norm_eps, param_dtype=param_dtype)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    rows, patch_dim = pixel_values.shape
    if rows % self.tokens:
      raise ValueError(f"pixel_values has {rows} patch rows, not a multiple of the {self.tokens} patches of a crop")
    x = self.patch_embed(pixel_values.reshape(rows // self.tokens, self.tokens, patch_dim))
    x = x + self.position_embedding[...].astype(x.dtype)
    spec = AttentionSpec.self_attention(jnp.ones(x.shape[:2], jnp.int32), kind="full")

    def body(layer: SiglipLayer, h: jax.Array, _: Any) -> tuple[jax.Array, None]:
      return layer(h, spec, self.attention_backend), None

    x, _ = run_stack(self.layers, x, body, remat_policy=self.remat_policy)
    return x
