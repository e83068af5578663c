"""TPU decoding attention: a Pallas (Mosaic) kernel that reads the samplers' stacked KV cache in place.

Splash masks are static functions of positions, so a decoding step's keys `[cache ; window]` went to the dense
XLA path, and XLA:TPU copied each layer's cache slice every step, twice: once into the layout its batched dot
wants (`[B, Hkv, L, D]` against the cache's `[B, L, Hkv, D]`), once concatenated with the window's keys (72 copies
each per step for a 36-layer model, all of the cache's bytes moved twice more per step). This kernel DMAs the
layer's cache tiles straight from the stacked array (the layer index is a scalar-prefetch operand), a row's tile
with all its kv heads at a time, with an online softmax over the tiles and the window's own keys last; tiles past
a row's last valid slot are neither loaded nor computed. Queries of a kv head's group are rows of one matrix
(`group x window` rows), so GQA costs no repeated keys. Masks are `masks.allowed` of the spec's arrays, as in every
backend. Forward only (decoding); runs in the Pallas interpreter off TPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dvl_jax.attention import masks, shards, splash
from dvl_jax.attention.cache_prefix import CachePrefix
from dvl_jax.attention.spec import AttentionSpec

LANES = splash.LANES  # a kv-index tile is a row of lanes
_NEG = -1e30  # finite: a row with no allowed key stays finite (its output is 0)


def cache_tile(length: int, tile: int | None = None) -> int:
  """Cache slots per tile: `tile` (a multiple of 128: a kv-index tile's lanes) or, by default, 512; the whole cache
  when it is no longer than that. The last tile may run past the cache (its slots there are masked)."""
  tile = tile or 512
  if tile % LANES:
    raise ValueError(f"cache tile {tile} must be a multiple of {LANES}")
  return length if length <= tile else tile


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> str | None:
  """Why this kernel cannot read these inputs' cache prefix here, or None."""
  del k, v, spec
  if jax.default_backend() == "gpu":
    return "a KV-cache window with its TPU decoding kernel (pallas_gpu is the GPU kernel)"
  if q.dtype not in splash.DTYPES:
    return f"a KV-cache window in {q.dtype} (supported: float32, bfloat16)"
  if q.shape[-1] % LANES and jax.default_backend() == "tpu":
    return (f"a KV-cache window at head_dim {q.shape[-1]}: the decoding kernel takes multiples of {LANES} (any "
            "other would relayout the whole cache every call)")
  return None


def _precision(x: jax.Array) -> jax.lax.Precision | None:
  """float32 operands multiply in float32 (Mosaic's default would round them to bf16); bf16 ones need nothing."""
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _kernel(tiles_ref, layer_ref, q_ref, q_idx_ref, q_seg_ref, k_ref, v_ref, k_idx_ref, k_seg_ref, new_k_ref,
            new_v_ref, new_idx_ref, new_seg_ref, o_ref, m_ref, l_ref, acc_ref, *, kind: str, block_size: int,
            half_len: int, scale: float, length: int):
  """One row's tile of the cache (all kv heads: a block of one head would split the `(Hkv, D)` minor dims, which
  Mosaic's blocks cannot), then the window's own keys after the last tile."""
  del layer_ref  # read by the index maps
  b, t = pl.program_id(0), pl.program_id(1)
  heads, tile = q_ref.shape[0], k_ref.shape[0]

  @pl.when(t == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  q_idx, q_seg = q_idx_ref[...], q_seg_ref[...]  # [R, 1]

  def update(h, keys, values, k_idx, k_seg):  # kv head h: keys / values [T, D], k_idx / k_seg [1, T]
    queries = q_ref[h]
    if keys.shape[0] < 8:  # Mosaic lowers a product this thin as a broadcast that drops the f32 cast; these
      queries, keys = queries.astype(jnp.float32), keys.astype(jnp.float32)  # products are exact in f32 either way
      values = values.astype(jnp.float32)
    s = jax.lax.dot_general(queries, keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=_precision(keys))
    s = s * scale
    allowed = masks.allowed(kind, q_idx, k_idx, block_size=block_size, half_len=half_len)
    allowed = allowed & masks.segment_allowed(q_seg, k_seg)
    s = jnp.where(allowed, s, _NEG)
    m_prev = m_ref[h][:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_ref[h] = jnp.broadcast_to(alpha * l_ref[h][:, :1] + jnp.sum(p, axis=1, keepdims=True), l_ref.shape[1:])
    m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
    p = p.astype(o_ref.dtype).astype(values.dtype)  # rounded to the inputs' dtype, as the reference's probabilities
    pv = jnp.dot(p, values, preferred_element_type=jnp.float32, precision=_precision(values))
    acc_ref[h] = alpha * acc_ref[h] + pv

  @pl.when(t < tiles_ref[b])
  def _():  # a last tile past the cache's end holds unspecified values there: masked, and its values zeroed
    inside = t * tile + jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1) < length
    inside_rows = t * tile + jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0) < length
    k_seg = jnp.where(inside, k_seg_ref[...], 0)
    head = lambda ref, h: ref[...] if ref.ndim == 2 else ref[:, h, :]  # noqa: E731  (one kv head: squeezed)
    for h in range(heads):
      values = jnp.where(inside_rows, head(v_ref, h), 0).astype(v_ref.dtype)
      update(h, head(k_ref, h), values, k_idx_ref[...], k_seg)

  @pl.when(t == pl.num_programs(1) - 1)
  def _():
    for h in range(heads):
      update(h, new_k_ref[h], new_v_ref[h], new_idx_ref[...], new_seg_ref[...])
      total = l_ref[h][:, :1]
      o_ref[h] = (acc_ref[h] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


def attend_prefixed(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, prefix: CachePrefix, *,
                    block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """`attend` over keys `[prefix ; k]` (`spec`'s key arrays `[B, Lp + Lk]`), the cache prefix read in place:
  q `[B, Lq, Hq, D]`, k / v `[B, Lk, Hkv, D]`, prefix `[layers, B, Lp, Hkv, D]` -> `[B, Lq, Hq, D]`.

  `block_k`: cache slots per tile (`cache_tile`). `interpret`: the Pallas interpreter (default: unless on a TPU).
  Rows with no allowed key give 0. Under a split (`shards`) each device reads its own rows and kv heads.
  """
  read = functools.partial(_attend_local, block_k=block_k, interpret=interpret)
  return shards.per_device(read, q, k, v, spec, prefix)


def _attend_local(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, prefix: CachePrefix, *,
                  block_k: int | None, interpret: bool | None) -> jax.Array:
  b, lq, hq, d = q.shape
  lk, hkv, lp = k.shape[1], k.shape[2], prefix.length
  group, rows = hq // hkv, (hq // hkv) * lq
  tile = cache_tile(lp, block_k)
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  cache_idx, new_idx = spec.kv_idx[:, :lp], spec.kv_idx[:, lp:]
  cache_seg, new_seg = spec.kv_seg[:, :lp], spec.kv_seg[:, lp:]
  valid = jnp.where(cache_seg != 0, jnp.arange(lp, dtype=jnp.int32) + 1, 0).max(axis=1)
  tiles = (valid + tile - 1) // tile  # [B] tiles holding a valid slot; the rest are skipped
  by_group = lambda x: jnp.tile(x, (1, group))[:, :, None]  # [B, Lq] -> [B, R, 1], row r is query r % Lq
  lane_row = lambda x: x[:, None, :]  # [B, L] -> [B, 1, L]
  q_rows = q.reshape(b, lq, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, rows, d)
  heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [B, Lk, Hkv, D] -> [B, Hkv, Lk, D]

  per_row = lambda *shape: pl.BlockSpec((None, *shape), lambda n, t, *_: (n,) + (0,) * len(shape))  # noqa: E731
  # One kv head (a device's share under tensor parallelism) drops its axis: XLA:TPU keeps a `[..., 1, D]` array in
  # a layout whose last two dims are not (1, D) (those would pad 8x), and relayouted the whole cache for the kernel.
  cache_block = (None, None, tile, d) if hkv == 1 else (None, None, tile, hkv, d)
  keys, values = (c.reshape(c.shape[:3] + c.shape[4:]) if hkv == 1 else c for c in (prefix.keys, prefix.values))
  last = lambda n, t, tiles_ref: jnp.minimum(t, jnp.maximum(tiles_ref[n] - 1, 0))  # noqa: E731  (no new DMA past it)
  cache_spec = pl.BlockSpec(cache_block, lambda n, t, tiles_ref, layer_ref: (
      layer_ref[0], n, last(n, t, tiles_ref), *(0,) * (len(cache_block) - 3)))
  cache_row = pl.BlockSpec((None, 1, tile), lambda n, t, tiles_ref, _: (n, 0, last(n, t, tiles_ref)))
  kernel = functools.partial(_kernel, kind=spec.kind, block_size=spec.block_size or 1, half_len=spec.half_len,
                             scale=d ** -0.5, length=lp)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, pl.cdiv(lp, tile)),
          in_specs=[per_row(hkv, rows, d), per_row(rows, 1), per_row(rows, 1), cache_spec, cache_spec, cache_row,
                    cache_row, per_row(hkv, lk, d), per_row(hkv, lk, d), per_row(1, lk), per_row(1, lk)],
          out_specs=per_row(hkv, rows, d),
          scratch_shapes=[pltpu.VMEM((hkv, rows, LANES), jnp.float32), pltpu.VMEM((hkv, rows, LANES), jnp.float32),
                          pltpu.VMEM((hkv, rows, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="dvl_tpu_decode",
  )(tiles.astype(jnp.int32), jnp.reshape(prefix.layer, (1,)).astype(jnp.int32), q_rows,
    by_group(spec.q_idx), by_group(spec.q_seg), keys, values, lane_row(cache_idx),
    lane_row(cache_seg), heads_major(k), heads_major(v), lane_row(new_idx), lane_row(new_seg))
  return out.reshape(b, hkv, group, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)
