"""Dense XLA attention: the exact reference every other backend is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dvl_jax.attention.spec import AttentionSpec


def attend_dense(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
  """q `[B, Lq, Hq, D]`, k/v `[B, Lk, Hkv, D]` -> `[B, Lq, Hq, D]`; GQA without repeating K/V.

  Logits and softmax in fp32; masked entries get `finfo(f32).min` (not -inf), so a row with no
  allowed key (padding) yields a finite uniform average instead of NaN.
  """
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
  qg = q.reshape(b, lq, hkv, hq // hkv, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32) * (d ** -0.5)
  mask = spec.dense()[:, None, None, :, :]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, hq, d).astype(q.dtype)
