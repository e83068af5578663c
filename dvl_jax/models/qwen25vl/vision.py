"""Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, PatchMerger (spec §2).

Exact to `Qwen2_5_VisionTransformerPretrainedModel` (transformers 4.55). Patches run in window order
(`VisionLayout`); window and full attention are the same segment-masked attention over different
segment ids, so one stacked block serves every layer. Kernels are stored `[in, out]` (torch `weight.T`);
the Conv3d patch embedding is the matrix `weight.reshape(hidden, -1).T`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.attention.dispatch import attend
from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.config import ModelConfig, VisionConfig
from dvl_jax.models.layers import Dense, RMSNorm, SwiGLU, dtypes, run_stack, stack_modules
from dvl_jax.models.qwen25vl.rope import vision_rope
from dvl_jax.models.rope import apply_rope
from dvl_jax.core.vision_layout import VisionLayout
from dvl_jax.parallel.rules import constrain

PATCH_ROWS = ("batch", None)  # ViT hidden states [N, D]: each batch shard's pixel chunk stays on it


class VisionAttention(nnx.Module):
  """Bidirectional attention inside segments, 2-D rotary on q and k (rotation in fp32)."""

  def __init__(self, v: VisionConfig, *, param_dtype: Any, compute_dtype: Any, rngs: nnx.Rngs):
    self.num_heads = v.num_heads
    self.qkv = Dense(v.hidden_size, 3 * v.hidden_size, axes=("vision_embed", "vision_heads"), use_bias=True,
                     param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    self.proj = Dense(v.hidden_size, v.hidden_size, axes=("vision_heads", "vision_embed"), use_bias=True,
                      param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array,
               backend: str, chunks: int = 1) -> jax.Array:
    """x `[N, D]`, cos/sin `[N, head_dim]` fp32, segments `[N]` -> `[N, D]`; attention runs inside
    each of `chunks` equal row chunks (`VisionLayout.chunks`), as a batch of sequences."""
    n = x.shape[0]
    qkv = self.qkv(x)
    q, k, v = jnp.moveaxis(qkv.reshape(n, 3, self.num_heads, -1), 1, 0)
    q = apply_rope(q.astype(jnp.float32), cos, sin).astype(qkv.dtype)
    k = apply_rope(k.astype(jnp.float32), cos, sin).astype(qkv.dtype)
    per_chunk = lambda a: a.reshape(chunks, n // chunks, *a.shape[1:])  # noqa: E731
    spec = AttentionSpec.self_attention(per_chunk(segments), kind="full")
    out = attend(per_chunk(q), per_chunk(k), per_chunk(v), spec, backend=backend)
    return self.proj(out.reshape(n, -1))


class VisionBlock(nnx.Module):
  """Pre-norm residual block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

  def __init__(self, v: VisionConfig, *, param_dtype: Any, compute_dtype: Any, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(v.hidden_size, eps=v.rms_norm_eps, param_dtype=param_dtype)
    self.norm2 = RMSNorm(v.hidden_size, eps=v.rms_norm_eps, param_dtype=param_dtype)
    self.attn = VisionAttention(v, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    self.mlp = SwiGLU(v.hidden_size, v.intermediate_size, axes=("vision_embed", "vision_mlp"), use_bias=True,
                      param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array,
               backend: str, chunks: int = 1) -> jax.Array:
    x = x + self.attn(self.norm1(x), cos, sin, segments, backend, chunks)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm per patch, concat each 2x2 cell (4 consecutive window-order rows), Linear-GELU-Linear."""

  def __init__(self, v: VisionConfig, *, param_dtype: Any, compute_dtype: Any, rngs: nnx.Rngs):
    merged = v.hidden_size * v.merge_unit
    kw = dict(use_bias=True, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    self.merged_dim = merged
    self.ln_q = RMSNorm(v.hidden_size, eps=v.rms_norm_eps, param_dtype=param_dtype)
    self.mlp_in = Dense(merged, merged, axes=("vision_merge", "vision_merge"), **kw)
    self.mlp_out = Dense(merged, v.out_hidden_size, axes=("vision_merge", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[N, D]` -> `[N / merge_unit, out_hidden_size]`."""
    x = self.ln_q(x).reshape(-1, self.merged_dim)
    return self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))


class VisionTower(nnx.Module):
  """`pixel_values` `[N, patch_dim]` + `VisionLayout` -> merged tokens `[N / 4, out_hidden]`.

  `rope_table_dtype` is the dtype the rotary angle table is built in: fp32 as in HF; DiffusionVL's
  tower builds it in its own dtype (bf16 training, fp16 eval; spec §2.3), a quirk reproduced by
  passing that dtype (or assigning the attribute later).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rope_table_dtype: Any = jnp.float32):
    v = cfg.vision
    param_dtype, compute_dtype = dtypes(cfg)
    self.head_dim = v.head_dim
    self.merge_unit = v.merge_unit
    self.full_layers = tuple(i in v.fullatt_block_indexes for i in range(v.depth))
    self.remat_policy = cfg.remat_policy
    self.attention_backend = cfg.attention_backend
    self.rope_table_dtype = jnp.dtype(rope_table_dtype)
    self.patch_embed = Dense(v.patch_dim, v.hidden_size, axes=("vision_patch", "vision_embed"),
                             use_bias=False, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    self.blocks = stack_modules(
        lambda r: VisionBlock(v, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=r),
        v.depth, rngs, stacked=cfg.scan_layers)
    self.merger = PatchMerger(v, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)

  def encode_patches(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """Hidden states after the last block, `[N, hidden]` in window order (HF's merger input)."""
    x = self.patch_embed(pixel_values)
    n, d = x.shape
    chunks = layout.chunks
    cells = x.reshape(chunks, n // self.merge_unit // chunks, self.merge_unit, d)
    local = layout.window_index.reshape(chunks, -1) % cells.shape[1]  # each chunk's cells stay in it
    x = jax.vmap(lambda c, i: jnp.take(c, i, axis=0))(cells, local).reshape(n, d)
    cos, sin = vision_rope(layout.hw, self.head_dim, table_dtype=self.rope_table_dtype)

    def body(block: VisionBlock, h: jax.Array, is_full: jax.Array) -> tuple[jax.Array, None]:
      segments = jnp.where(is_full, layout.image_segments, layout.window_segments)
      h = block(constrain(h, PATCH_ROWS), cos, sin, segments, self.attention_backend, chunks)
      return constrain(h, PATCH_ROWS), None

    x, _ = run_stack(self.blocks, x, body, np.asarray(self.full_layers), remat_policy=self.remat_policy)
    return x

  def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """Merged tokens `[N / merge_unit, out_hidden]` in processor (row-major) order, compute dtype.

    With a padded layout the rows past the real tokens are garbage (padding attends to nothing).
    """
    merged = self.merger(self.encode_patches(pixel_values, layout))
    return jnp.take(merged, layout.reverse_index, axis=0)
