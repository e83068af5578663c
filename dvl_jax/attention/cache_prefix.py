"""`CachePrefix`: keys and values that come before an attention call's own, kept in the samplers' stacked cache.

The decoding step's keys are `[one layer of the KV cache ; the step's new K/V]`. Concatenating them copies the
layer's whole cache every step (two kernels per layer on a GPU, bytes growing with batch x context), so the
stack hands attention the whole `[layers, ...]` cache and the layer's index instead: a backend that can read the
cache in place does (`pallas_gpu`), the others get the concatenation, in the same key order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CachePrefix(NamedTuple):
  """`keys` / `values` `[layers, B, Lp, Hkv, D]` (the whole stacked cache), `layer` `[]` int32: the slice
  `[layer]` is the prefix."""

  keys: jax.Array
  values: jax.Array
  layer: jax.Array

  @property
  def length(self) -> int:
    return self.keys.shape[2]

  def joined(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[prefix ; k]`, `[prefix ; v]` `[B, Lp + L, Hkv, D]` in `k`'s dtype: what a backend without in-place
    reads attends over."""
    cat = lambda cache, x: jnp.concatenate([cache[self.layer].astype(x.dtype), x], axis=1)  # noqa: E731
    return cat(self.keys, k), cat(self.values, v)
