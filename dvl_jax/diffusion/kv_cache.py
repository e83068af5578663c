"""The samplers' KV cache as a plain pytree, and the attention spec of new tokens against it.

Layout: `(k, v)`, each `[layers, B, max_len, kv_heads, head_dim]` (post-RoPE, compute dtype).
Slot `j` of row `b` holds the token at absolute index `j` of that row, so rows with different prompt
lengths share one array, each at its own offset. Which slots are valid is never stored: every pass
derives it from a per-row `cache_end` (slots `< cache_end` are valid); stale slots beyond it are
masked until a commit overwrites them. On a mesh the cache is created straight onto its sharding
(`sampling_mesh.Placement.cache`), never whole on one device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.config import ModelConfig
from dvl_jax.models.layers import dtypes
from dvl_jax.models.interface import KV


def _shape(cfg: ModelConfig, batch: int, max_len: int) -> tuple[int, ...]:
  """`[layers, B, max_len, kv_heads, head_dim]`, each of keys and values."""
  t = cfg.text
  return t.num_layers, batch, max_len, t.num_kv_heads, t.head_dim


def init(cfg: ModelConfig, batch: int, max_len: int, sharding: jax.sharding.Sharding | None = None) -> KV:
  """Zeroed cache for `batch` rows of `max_len` slots (on the default device if `sharding` is None)."""
  return _zeros(_shape(cfg, batch, max_len), dtypes(cfg)[1], sharding)


def abstract(cfg: ModelConfig, batch: int, max_len: int, sharding: jax.sharding.Sharding | None = None) -> KV:
  """`init`'s shapes, shardings and dtype without the arrays: what lowering needs (nothing is allocated, so it
  also lowers for devices this process only describes)."""
  return tuple(jax.ShapeDtypeStruct(_shape(cfg, batch, max_len), dtypes(cfg)[1], sharding=sharding) for _ in range(2))


@functools.cache
def _zeros_program(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding | None) -> Any:
  return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for _ in range(2)),
                 out_shardings=None if sharding is None else (sharding, sharding))


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding | None) -> KV:
  """Both zeroed arrays from one compiled program, each made on its devices: one dispatch per sampler call
  (two `jnp.zeros` took 0.4 ms of host time, a tenth of a short answer's on a CPU)."""
  return _zeros_program(shape, dtype, sharding)()


def write_prefix(cache: KV, kv: KV, sharding: jax.sharding.Sharding | None = None) -> KV:
  """Writes `[layers, B, n, ...]` K/V into slots `[0, n)` of every row (the serving engine's decoded view, back
  into its whole cache; a prefill fills the cache inside the decoder, `decode(fill=)`); `sharding`: see `write`."""
  cache, kv = pinned(cache, sharding), pinned(kv, sharding)
  return pinned(tuple(jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), 0, axis=2) for c, x in zip(cache, kv)),
                sharding)


def write(cache: KV, kv: KV, starts: jax.Array, enabled: jax.Array, sharding: jax.sharding.Sharding | None = None
          ) -> KV:
  """Writes `[layers, B, n, ...]` K/V into slots `[starts[b], starts[b] + n)` of the `enabled` rows `[B]`, which
  must lie inside the cache.

  In place: one scatter of the enabled rows' windows, the others' indices past the cache (dropped). Writing
  every row's window instead (a disabled row writing back what the window held) read those windows with a gather
  that XLA:TPU served by relayouting the whole stacked cache, twice per AR step. Each (layer, row, slot) is an
  index of the scatter and `[kv_heads, head_dim]` its window: with the layers in the window, a device holding one
  kv head (tensor parallel over all of them) saw `[layers, head_dim]` windows, and XLA:TPU kept its cache with the
  layers second-minor, relayouting it for the decoding kernel at every forward. On a mesh (`sharding`, the
  cache's) each device scatters into its own rows (`shard_map`): the partitioner would all-gather a scatter's
  global row indices and updates.
  """
  cache, kv = pinned(cache, sharding), pinned(kv, sharding)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return _scatter(cache, kv, starts, enabled)
  spec = sharding.spec
  rows = jax.sharding.PartitionSpec(spec[1] if len(spec) > 1 else None)
  local = jax.shard_map(_scatter, mesh=sharding.mesh, in_specs=(spec, spec, rows, rows), out_specs=spec,
                        check_vma=False)
  return local(cache, kv, starts, enabled)


def _scatter(cache: KV, kv: KV, starts: jax.Array, enabled: jax.Array) -> KV:
  layers, b, n, max_len = kv[0].shape[:3] + cache[0].shape[2:3]
  starts = jnp.clip(starts, 0, max_len - n)
  slots = jnp.where(enabled[:, None], starts[:, None], max_len) + jnp.arange(n)  # [B, n]
  rows, layer = jnp.arange(b)[:, None], jnp.arange(layers)[:, None, None]
  return tuple(c.at[layer, rows, slots].set(x.astype(c.dtype), mode="drop", unique_indices=True)
               for c, x in zip(cache, kv))


def put_row(cache: KV, row: KV, index: jax.Array) -> KV:
  """A one-row cache `[layers, 1, max_len, ...]` written over row `index` `[]` (a serving slot)."""
  return tuple(jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), index, axis=1) for c, r in zip(cache, row))


def pinned(kv: KV, sharding: jax.sharding.Sharding | None) -> KV:
  """`kv` (a cache or new K/V, `[layers, B, n, kv_heads, head_dim]`) constrained to `sharding` if given."""
  return kv if sharding is None else jax.lax.with_sharding_constraint(kv, sharding)


def window_spec(slots: jax.Array, valid: jax.Array, cache_end: jax.Array, max_len: int, *, kind: str,
                block_size: int = 1) -> AttentionSpec:
  """Queries at absolute `slots` `[B, n]` against `[cache ; themselves]` (the decoder's prefix layout).

  Keys: cache slots `< cache_end[b]` and the window's own `valid` `[B, n]` tokens; `kind` (causal or
  block_causal over absolute indices) orders them.
  """
  b = slots.shape[0]
  cache_idx = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
  kv_idx = jnp.concatenate([cache_idx, slots.astype(jnp.int32)], axis=1)
  kv_seg = jnp.concatenate([cache_idx < cache_end[:, None], valid], axis=1).astype(jnp.int32)
  return AttentionSpec(q_idx=slots.astype(jnp.int32), kv_idx=kv_idx, q_seg=valid.astype(jnp.int32), kv_seg=kv_seg,
                       kind=kind, block_size=block_size)


def checked(cache: KV | None, cfg: ModelConfig, batch: int, max_len: int,
            sharding: jax.sharding.Sharding | None = None) -> KV:
  """`cache` if it fits (`batch` rows, `max_len` slots, `sharding` if given), a new zeroed one if None."""
  if cache is None:
    return init(cfg, batch, max_len, sharding)
  if any(isinstance(c, jax.Array) and c.is_deleted() for c in cache):  # (lowering passes abstract caches)
    raise ValueError("cache was donated to an earlier call and is gone: pass the .cache of the latest output "
                     "(each call hands its cache on), or none")
  want = _shape(cfg, batch, max_len)
  if tuple(cache[0].shape) != want:
    raise ValueError(f"cache has shape {tuple(cache[0].shape)}, these prompts need {want}")
  if sharding is not None and not all(c.sharding.is_equivalent_to(sharding, c.ndim) for c in cache):
    raise ValueError(f"cache is sharded as {cache[0].sharding}, this model's mesh needs {sharding}")
  return cache
