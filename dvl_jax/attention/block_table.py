"""Which (query tile, key tile) pairs can attend: the block tables the Pallas GPU kernel iterates over.

Two parts. The structure (mask kind, block size, lengths, tile sizes) is static, so the host
evaluates `masks.allowed` over every tile pair once per shape (cached) — exact, and the same
function the dense reference uses. Segment ids are data: in the graph, a pair is dropped when the
tiles' non-padding segment ranges do not overlap (padding tiles, other images or windows, stale
cache slots). Each query tile then gets the compacted list of its live key tiles (and each key tile
the list of its query tiles, for dK/dV); the kernels loop over these lists only, so a dropped tile is
never loaded. A non-positional spec (a cache window) has no static structure: every pair is a
candidate and only the segment test prunes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.attention import masks
from dvl_jax.attention.spec import AttentionSpec

_NO_SEGMENT = np.iinfo(np.int32).max


class TileLists(NamedTuple):
  """Per-row tile lists; entries past a tile's count are padding and never read.

  `kv_tiles` `[B, nq, Wq]`, `kv_counts` `[B, nq]`: key tiles of each query tile (forward, dQ).
  `q_tiles` `[B, nk, Wk]`, `q_counts` `[B, nk]`: query tiles of each key tile (dK, dV).
  """

  kv_tiles: jax.Array
  kv_counts: jax.Array
  q_tiles: jax.Array
  q_counts: jax.Array


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@functools.lru_cache(maxsize=128)
def structural_tiles(kind: str, block_size: int, half_len: int, positional: bool, lq: int, lk: int,
                     block_q: int, block_k: int) -> np.ndarray:
  """`[nq, nk]` bool: the tile pair holds a (q, kv) pair the mask kind allows (real positions only)."""
  nq, nk = _cdiv(lq, block_q), _cdiv(lk, block_k)
  if not positional:
    return np.ones((nq, nk), bool)
  kv = np.arange(nk * block_k)
  tiles = np.zeros((nq, nk), bool)
  for i in range(nq):
    q = np.arange(i * block_q, min((i + 1) * block_q, lq))
    hit = masks.allowed(kind, q[:, None], kv[None, :], block_size=block_size, half_len=half_len)
    tiles[i] = (hit.any(0) & (kv < lk)).reshape(nk, block_k).any(1)
  return tiles


def _segment_ranges(seg: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
  """`[B, L]` (L a multiple of `tile`) -> smallest and largest non-zero segment per tile `[B, L / tile]`."""
  s = seg.reshape(seg.shape[0], -1, tile)
  live = s != 0
  return (jnp.min(jnp.where(live, s, _NO_SEGMENT), axis=-1),
          jnp.max(jnp.where(live, s, -_NO_SEGMENT), axis=-1))


def _pad_to(x: jax.Array, tile: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, _cdiv(x.shape[1], tile) * tile - x.shape[1])))


def live_tiles(spec: AttentionSpec, block_q: int, block_k: int) -> jax.Array:
  """`[B, nq, nk]` bool: tile pairs that may hold an allowed entry (a superset of the exact set;
  equal to it when segments are contiguous runs, as for padding, windows and images)."""
  lq, lk = spec.q_seg.shape[1], spec.kv_seg.shape[1]
  structure = structural_tiles(spec.kind, spec.block_size, spec.half_len, spec.positional, lq, lk,
                               block_q, block_k)
  q_lo, q_hi = _segment_ranges(_pad_to(spec.q_seg, block_q), block_q)
  k_lo, k_hi = _segment_ranges(_pad_to(spec.kv_seg, block_k), block_k)
  overlap = (jnp.maximum(q_lo[:, :, None], k_lo[:, None, :]) <= jnp.minimum(q_hi[:, :, None], k_hi[:, None, :]))
  return overlap & structure[None]


def _compact(live: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """`[B, n, m]` bool -> indices of the true entries first `[B, n, width]`, and their counts `[B, n]`."""
  order = jnp.argsort(~live, axis=-1, stable=True)[..., :width]
  return order.astype(jnp.int32), live.sum(axis=-1, dtype=jnp.int32)


def tile_lists(spec: AttentionSpec, block_q: int, block_k: int) -> TileLists:
  """The lists the kernels loop over; widths are static (the structural maximum)."""
  lq, lk = spec.q_seg.shape[1], spec.kv_seg.shape[1]
  structure = structural_tiles(spec.kind, spec.block_size, spec.half_len, spec.positional, lq, lk,
                               block_q, block_k)
  live = live_tiles(spec, block_q, block_k)
  kv_tiles, kv_counts = _compact(live, max(1, int(structure.sum(1).max())))
  q_tiles, q_counts = _compact(jnp.swapaxes(live, 1, 2), max(1, int(structure.sum(0).max())))
  return TileLists(kv_tiles, kv_counts, q_tiles, q_counts)
