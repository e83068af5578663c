"""Per-position cross entropy over the vocabulary, optionally a chunk of positions at a time.

With flash-style attention (splash on TPU), the fp32 logits of a training row are the largest
activation of a real Qwen2.5-VL step: `[B, L, 151936]` is 5 GB for one 8k-token row, and their
gradient as much again, more than all the layer inputs a fully rematerialised 3B decoder keeps. With `chunk_size > 0` the logits are computed `chunk_size` positions
at a time inside a rematerialised scan, so only `[B, chunk_size, V]` of them is alive in the forward
and in the backward pass (the lm_head forward runs twice). The values per position are the same.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dvl_jax.core.batch import IGNORE


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  target = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(labels != IGNORE, jax.nn.logsumexp(logits, axis=-1) - target, 0.0)


def token_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                        chunk_size: int = 0) -> jax.Array:
  """CE `[B, n]` (fp32, 0 where `labels == -100`) of `logits_fn(hidden)` `[B, n, V]` against `labels` `[B, n]`.

  `chunk_size <= 0` (or `>= n`) computes all logits at once.
  """
  b, n, width = hidden.shape
  if chunk_size <= 0 or chunk_size >= n:
    return _cross_entropy(logits_fn(hidden), labels)
  chunks = -(-n // chunk_size)
  pad = chunks * chunk_size - n
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE)
  per_chunk = (hidden.reshape(b, chunks, chunk_size, width).swapaxes(0, 1),
               labels.reshape(b, chunks, chunk_size).swapaxes(0, 1))

  @jax.checkpoint
  def one_chunk(carry, xs):
    h, lab = xs
    return carry, _cross_entropy(logits_fn(h), lab)

  _, ce = jax.lax.scan(one_chunk, None, per_chunk)
  return ce.swapaxes(0, 1).reshape(b, chunks * chunk_size)[:, :n]
