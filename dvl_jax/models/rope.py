"""Rotary embeddings shared by the families: the rotation and the decoder's RoPE in `flat` and `mrope` modes.

Angles are computed in fp32 and cast to the activation dtype before rotation (spec §3.2, §10.1). Family-specific
position schemes (Qwen2.5-VL's M-RoPE index, its ViT's 2-D RoPE) live with their family.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x: jax.Array) -> jax.Array:
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-b, a], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, rotated_heads: int | None = None) -> jax.Array:
  """x `[..., L, H, D]`, cos/sin `[..., L, D]` (already in the rotation dtype); `rotated_heads`: only the first so
  many heads rotate and the others pass unchanged (cos 1, sin 0: exactly), for queries, keys and values as one
  array."""
  cos, sin = cos[..., None, :], sin[..., None, :]
  if rotated_heads is not None:
    rotated = (jnp.arange(x.shape[-2]) < rotated_heads)[:, None]
    cos, sin = jnp.where(rotated, cos, 1).astype(cos.dtype), jnp.where(rotated, sin, 0).astype(sin.dtype)
  return x * cos + rotate_half(x) * sin


def inv_frequencies(rotary_dim: int, theta: float, dtype: Any = jnp.float32) -> jax.Array:
  """`1 / theta^(arange(0, rotary_dim, 2) / rotary_dim)`, computed in fp32 then cast to `dtype`."""
  exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
  return (1.0 / (theta ** exponents)).astype(dtype)


def text_rope(positions: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int] | None,
              dtype: Any) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[B, L, head_dim]` in `dtype`.

  `positions` is `[B, L]` (flat 1-D RoPE) or `[3, B, L]` (M-RoPE: temporal/height/width rows; the
  head dims are split into `mrope_section * 2` and section j takes row `j % 3`). Equal rows reduce
  M-RoPE exactly to flat RoPE.
  """
  inv = inv_frequencies(head_dim, theta)
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [(3,) B, L, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  if positions.ndim == 3:
    if mrope_section is None or 2 * sum(mrope_section) != head_dim:
      raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    bounds = np.cumsum(list(mrope_section) * 2)[:-1]
    chunks = jnp.split(emb, bounds, axis=-1)
    emb = jnp.concatenate([c[i % 3] for i, c in enumerate(chunks)], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
