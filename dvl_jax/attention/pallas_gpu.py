"""GPU attention: our Pallas flash-attention kernel (Triton lowering; interpreted on CPU) that skips empty tiles.

Each program owns one query tile (forward, dQ) or one key/value tile (dK/dV) of one head and loops
over that tile's list of live partner tiles from `block_table`, so a fully masked tile is never
loaded. Inside a tile the mask is computed from the spec's index and segment arrays with
`masks.allowed` / `masks.segment_allowed`, the functions of the dense reference. Online softmax and
every accumulation in fp32; inputs fp32, bf16 or fp16. GQA reads key/value head `h // group` instead
of repeating it, and a dK/dV program accumulates over its group's query heads. A row with no allowed
key returns 0 and passes no gradient (the dense reference returns a uniform average there; callers
never read such rows). Sequences are padded to whole tiles (segment 0) and head dims to a power of
two (zeros), as Triton needs. Decoding (`attend_prefixed`, forward only) pads nothing: it reads the layer's KV
cache in place from the stacked cache, then the step's own keys, with masked loads and stores at the arrays'
ends, and takes q / k / v from one array where the decoder made one; under a mesh every kernel runs per device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # JAX 0.11 deprecated Pallas' Triton backend for removal: without it the kernel only runs interpreted
  from jax.experimental.pallas import triton as plgpu
except ImportError:
  plgpu = None

from dvl_jax.attention import block_table, masks, shards
from dvl_jax.attention.cache_prefix import CachePrefix
from dvl_jax.attention.spec import AttentionSpec

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256
_MASKED = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static kernel parameters (hashable: the custom_vjp's non-differentiable argument)."""

  kind: str
  block_size: int
  half_len: int
  scale: float
  block_q: int
  block_k: int
  interpret: bool
  count_visits: bool = False

  def mask(self, q_idx, q_seg, kv_idx, kv_seg) -> jax.Array:
    """`[bq]`, `[bq]`, `[bk]`, `[bk]` -> `[bq, bk]` allowed entries of one tile pair."""
    allowed = masks.allowed(self.kind, q_idx[:, None], kv_idx[None, :], block_size=self.block_size,
                            half_len=self.half_len)
    return allowed & masks.segment_allowed(q_seg[:, None], kv_seg[None, :])

  def compiler_params(self, head_dim: int) -> pl.CompilerParams | None:
    """Triton's launch settings; the interpreter takes none (and a JAX without the Triton backend has none)."""
    if self.interpret or plgpu is None:
      return None
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# Query x key tile, measured fwd+bwd on an H200 (bf16, 16 / 2 heads, head_dim 128, BD3 mask at 2L = 8k / 16k):
# 128 x 64 took 4.6 / 12.8 ms, 64 x 64 8.3 / 23.4, 128 x 128 7.4 / 18.1, 64 x 128 19.7 at 8k.
DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K = 128, 64
# Wider rows (bytes of a padded head: itemsize x head dim) need smaller tiles: the backward's shared memory grows
# with both. Compiled for an A100 (163 KiB a block) and an H200 (227 KiB) without them (benchmarks/deviceless.py),
# fp32 at head_dim 128 asked 194 / 354 KiB at 128 x 64, and fp32 at 256 fits an A100 only at 32 x 32.
_TILES_BY_ROW_BYTES = ((256, (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)), (512, (64, 64)), (1024, (32, 32)))


def default_tiles(lq: int, lk: int, row_bytes: int = 256) -> tuple[int, int]:
  """(block_q, block_k) for `row_bytes` per padded head row (itemsize x power-of-two head dim): the largest tiles
  whose fused backward fits an A100's and an H100's shared memory, or the smallest power of two >= 16 that
  covers a shorter sequence (Triton needs powers of two)."""
  largest_q, largest_k = next(tiles for limit, tiles in _TILES_BY_ROW_BYTES if row_bytes <= limit)
  fit = lambda length, largest: min(largest, max(16, pl.next_power_of_2(length)))  # noqa: E731
  return fit(lq, largest_q), fit(lk, largest_k)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=jnp.float32)


def _probs(cfg: _Config, q: jax.Array, k: jax.Array, lse: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax probabilities `[bq, bk]` recomputed from the forward's log-sum-exp."""
  return jnp.where(mask, jnp.exp(_dot(q, k, (1, 1)) * cfg.scale - lse[:, None]), 0.0)


def _count(visit_refs, tile) -> None:
  if visit_refs:
    visit_refs[0][pl.ds(tile, 1)] += 1


def _online_softmax(cfg: _Config, q, q_idx, q_seg, carry, k_idx, k_seg, k, v, keep=None):
  """One key tile `[bk, D]` folded into the forward's running (sum of p x v, max, sum of p); `keep` `[bk]` drops
  keys the tile loaded but does not own."""
  acc, m, l = carry
  mask = cfg.mask(q_idx, q_seg, k_idx, k_seg)
  if keep is not None:
    mask = mask & keep[None, :]
  s = jnp.where(mask, _dot(q, k, (1, 1)) * cfg.scale, _MASKED)
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
  alpha = jnp.exp(m - m_new)
  return acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0)), m_new, l * alpha + p.sum(axis=-1)


def _fold_tiles(cfg: _Config, count, tiles_ref, ki_ref, ks_ref, k_ref, v_ref, q, q_idx, q_seg, carry,
                visit_refs=(), length: int | None = None):
  """The live key tiles of one query tile (`count` entries of `tiles_ref`) folded into `carry`; `length`: the
  keys' true length when `k_ref` / `v_ref` are not padded to whole tiles."""

  def body(j, carry):
    tile = tiles_ref[j]
    cols = pl.ds(tile * cfg.block_k, cfg.block_k)
    live = None if length is None else tile * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32) < length
    _count(visit_refs, tile)
    return _online_softmax(cfg, q, q_idx, q_seg, carry, ki_ref[cols], ks_ref[cols], _rows(k_ref, cols, live),
                           _rows(v_ref, cols, live))

  return lax.fori_loop(0, count, body, carry)


def _rows(ref, rows, live: jax.Array | None = None) -> jax.Array:
  """`ref[rows, :]`, rows where `live` `[n]` is False read as 0: a block may run past the end of an unpadded array,
  where Triton would read whatever lies there (the interpreter pads such blocks itself)."""
  if live is None or plgpu is None:
    return ref[rows, :]
  view = ref.at[rows, :]
  return plgpu.load(view, mask=jnp.broadcast_to(live[:, None], view.shape), other=0)


def _no_keys(q: jax.Array):
  return (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:1], _MASKED, jnp.float32),
          jnp.zeros(q.shape[:1], jnp.float32))


def _write_out(carry, o_ref, lse_ref=None, live: jax.Array | None = None) -> None:
  """The normalised output (and log-sum-exp); `live` `[bq]`: store only these rows (`_rows`' unpadded arrays)."""
  acc, m, l = carry
  empty = l == 0.0
  out = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  if live is None or plgpu is None:
    o_ref[...] = out
  else:
    plgpu.store(o_ref, out, mask=jnp.broadcast_to(live[:, None], out.shape))
  if lse_ref is not None:
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l))


def _forward_kernel(counts_ref, tiles_ref, qi_ref, qs_ref, ki_ref, ks_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *visit_refs, cfg: _Config):
  if visit_refs:
    visit_refs[0][...] = jnp.zeros(visit_refs[0].shape, jnp.int32)
  q = q_ref[...]
  carry = _fold_tiles(cfg, counts_ref[pl.program_id(0)], tiles_ref, ki_ref, ks_ref, k_ref, v_ref, q, qi_ref[...],
                      qs_ref[...], _no_keys(q), visit_refs)
  _write_out(carry, o_ref, lse_ref)


def _prefixed_forward_kernel(layer_ref, p_counts_ref, p_tiles_ref, counts_ref, tiles_ref, qi_ref, qs_ref, pki_ref,
                             pks_ref, ki_ref, ks_ref, q_ref, pk_ref, pv_ref, k_ref, v_ref, o_ref, *, cfg: _Config,
                             prefix_block: int, group: int, lq: int, lk: int):
  """The forward over `[cache ; new]` keys: first the cache tiles, read in place from the whole stacked cache
  (`pk_ref` `[layers, B, Lp, Hkv, D]` at `layer_ref[0]`), then the new keys' tiles, in the concatenation's order.
  The cache need not be a whole number of tiles: its last tile ends at its end and keeps only the keys past the
  tile before it. Queries (`lq`), new keys (`lk`) and the output are unpadded (no copies around the kernel)."""
  i, n, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_live = i * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32) < lq
  q, q_idx, q_seg = _rows(q_ref, slice(None), q_live), qi_ref[...], qs_ref[...]
  layer, kv_head, length = layer_ref[0], h // group, pki_ref.shape[0]

  def cache_tile(j, carry):
    first = p_tiles_ref[j] * prefix_block
    start = jnp.minimum(first, length - prefix_block)
    rows = pl.ds(start, prefix_block)
    keep = start + jnp.arange(prefix_block, dtype=jnp.int32) >= first
    return _online_softmax(cfg, q, q_idx, q_seg, carry, pki_ref[rows], pks_ref[rows],
                           pk_ref[layer, n, rows, kv_head, :], pv_ref[layer, n, rows, kv_head, :], keep)

  carry = lax.fori_loop(0, p_counts_ref[i], cache_tile, _no_keys(q))
  carry = _fold_tiles(cfg, counts_ref[i], tiles_ref, ki_ref, ks_ref, k_ref, v_ref, q, q_idx, q_seg, carry,
                      length=lk)
  _write_out(carry, o_ref, live=q_live)


def _dq_kernel(counts_ref, tiles_ref, qi_ref, qs_ref, ki_ref, ks_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *visit_refs, cfg: _Config):
  if visit_refs:
    visit_refs[0][...] = jnp.zeros(visit_refs[0].shape, jnp.int32)
  q, do, q_idx, q_seg = q_ref[...], do_ref[...], qi_ref[...], qs_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    tile = tiles_ref[j]
    cols = pl.ds(tile * cfg.block_k, cfg.block_k)
    k = k_ref[cols, :]
    p = _probs(cfg, q, k, lse, cfg.mask(q_idx, q_seg, ki_ref[cols], ks_ref[cols]))
    ds = p * (_dot(do, v_ref[cols, :], (1, 1)) - delta[:, None])
    _count(visit_refs, tile)
    return dq + _dot(ds.astype(k.dtype), k, (1, 0))

  dq = lax.fori_loop(0, counts_ref[pl.program_id(0)], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(counts_ref, tiles_ref, qi_ref, qs_ref, ki_ref, ks_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *visit_refs, cfg: _Config):
  """One key/value tile of one kv head; q/do/lse/delta refs hold the whole sequence of its query heads."""
  if visit_refs:
    visit_refs[0][...] = jnp.zeros(visit_refs[0].shape, jnp.int32)
  k, v, kv_idx, kv_seg = k_ref[...], v_ref[...], ki_ref[...], ks_ref[...]
  count = counts_ref[pl.program_id(0)]

  def head(r, carry):
    def body(j, carry):
      dk, dv = carry
      tile = tiles_ref[j]
      rows = pl.ds(tile * cfg.block_q, cfg.block_q)
      q, do = q_ref[rows, r, :], do_ref[rows, r, :]
      p = _probs(cfg, q, k, lse_ref[r, rows], cfg.mask(qi_ref[rows], qs_ref[rows], kv_idx, kv_seg))
      ds = p * (_dot(do, v, (1, 1)) - delta_ref[r, rows][:, None])
      _count(visit_refs, tile)
      return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0))

    return lax.fori_loop(0, count, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _visits_out(count_visits: bool, shape: tuple[int, ...], index_map) -> tuple[list, list]:
  """Optional `[..., tiles]` int32 output counting how often each partner tile was loaded."""
  if not count_visits:
    return [], []
  return [jax.ShapeDtypeStruct(shape, jnp.int32)], [pl.BlockSpec((None, None, None, shape[-1]), index_map)]


def _query_major_specs(lists: block_table.TileLists, nq: int, bq: int, lk: int) -> list:
  """Specs on a (query tile, batch, head) grid: live-tile count and list, query and key index/segment rows."""
  return [
      pl.BlockSpec((None, nq), lambda i, n, h: (n, 0)),
      pl.BlockSpec((None, None, lists.kv_tiles.shape[-1]), lambda i, n, h: (n, i, 0)),
      pl.BlockSpec((None, bq), lambda i, n, h: (n, i)),
      pl.BlockSpec((None, bq), lambda i, n, h: (n, i)),
      pl.BlockSpec((None, lk), lambda i, n, h: (n, 0)),
      pl.BlockSpec((None, lk), lambda i, n, h: (n, 0)),
  ]


def _forward(cfg: _Config, lists: block_table.TileLists, pos: tuple[jax.Array, ...], q, k, v):
  """Padded q `[B, Lq, Hq, D]`, k/v `[B, Lk, Hkv, D]` -> out, lse `[B, Hq, Lq]` fp32, visits or None."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group, bq, nq, nk = hq // hkv, cfg.block_q, lq // cfg.block_q, lk // cfg.block_k
  visit_shape, visit_spec = _visits_out(cfg.count_visits, (b, hq, nq, nk), lambda i, n, h: (n, h, i, 0))
  out = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(nq, b, hq),
      in_specs=[
          *_query_major_specs(lists, nq, bq, lk),
          pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0)),
          pl.BlockSpec((None, lk, None, d), lambda i, n, h: (n, 0, h // group, 0)),
          pl.BlockSpec((None, lk, None, d), lambda i, n, h: (n, 0, h // group, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i)),
          *visit_spec,
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq), jnp.float32),
                 *visit_shape],
      compiler_params=cfg.compiler_params(d),
      interpret=cfg.interpret,
      name="dvl_flash_forward",
  )(lists.kv_counts, lists.kv_tiles, pos[0], pos[1], pos[2], pos[3], q, k, v)
  return out[0], out[1], (out[2] if cfg.count_visits else None)


def _prefixed_forward(cfg: _Config, prefix_block: int, lists: block_table.TileLists,
                      prefix_lists: block_table.TileLists, pos: tuple[jax.Array, ...], prefix_pos: tuple[jax.Array, ...],
                      qkv: _Heads, prefix: CachePrefix):
  """Queries and new keys / values (`_Heads`) and the cache prefix, none padded (`pos` is) -> out `[B, Lq, Hq,
  D]`."""
  q, k, v = qkv.arrays
  (b, lq, _, d), hq, first = q.shape, qkv.num_heads, qkv.first
  lk, lp, group, bq = k.shape[1], prefix.length, qkv.num_heads // qkv.num_kv_heads, cfg.block_q
  nq, lk_tiles = pl.cdiv(lq, bq), pl.cdiv(lk, cfg.block_k) * cfg.block_k
  whole = pl.BlockSpec()  # the kernel indexes the stacked cache itself: its layer is data, not a grid index
  cache_keys = [pl.BlockSpec((None, lp), lambda i, n, h: (n, 0))] * 2
  new_keys, new_values = (pl.BlockSpec((None, lk_tiles, None, d), lambda i, n, h, f=f: (n, 0, f + h // group, 0))
                          for f in first[1:])
  new_lists = _query_major_specs(lists, nq, bq, lk_tiles)  # tile count and list, query rows, then new keys' rows
  return pl.pallas_call(
      functools.partial(_prefixed_forward_kernel, cfg=cfg, prefix_block=prefix_block, group=group, lq=lq, lk=lk),
      grid=(nq, b, hq),
      in_specs=[
          whole,
          *_query_major_specs(prefix_lists, nq, bq, lp)[:2],
          *new_lists[:4],
          *cache_keys,
          *new_lists[4:],
          pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, first[0] + h, 0)),
          whole, whole, new_keys, new_values,
      ],
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct((b, lq, hq, d), q.dtype),
      compiler_params=cfg.compiler_params(d),
      interpret=cfg.interpret,
      name="dvl_flash_forward_cached",
  )(jnp.reshape(prefix.layer, (1,)).astype(jnp.int32), prefix_lists.kv_counts, prefix_lists.kv_tiles,
    lists.kv_counts, lists.kv_tiles, pos[0], pos[1], *prefix_pos, pos[2], pos[3], q, prefix.keys, prefix.values, k, v)


def _backward(cfg: _Config, lists: block_table.TileLists, pos: tuple[jax.Array, ...], q, k, v, o, lse, do):
  """-> dq, dk, dv (input dtypes), and the dQ / dK-dV visit counts or None."""
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group, bq, bk, nq, nk = hq // hkv, cfg.block_q, cfg.block_k, lq // cfg.block_q, lk // cfg.block_k
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  index_args = (pos[0], pos[1], pos[2], pos[3])

  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, n, h: (n, i, h, 0))
  kv_all = pl.BlockSpec((None, lk, None, d), lambda i, n, h: (n, 0, h // group, 0))
  row_stat = pl.BlockSpec((None, None, bq), lambda i, n, h: (n, h, i))
  visit_shape, visit_spec = _visits_out(cfg.count_visits, (b, hq, nq, nk), lambda i, n, h: (n, h, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(nq, b, hq),
      in_specs=[
          *_query_major_specs(lists, nq, bq, lk),
          q_tile, kv_all, kv_all, q_tile, row_stat, row_stat,
      ],
      out_specs=[q_tile, *visit_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *visit_shape],
      compiler_params=cfg.compiler_params(d),
      interpret=cfg.interpret,
      name="dvl_flash_dq",
  )(lists.kv_counts, lists.kv_tiles, *index_args, q, k, v, do, lse, delta)

  kv_tile = pl.BlockSpec((None, bk, None, d), lambda j, n, h: (n, j, h, 0))
  q_group = pl.BlockSpec((None, lq, group, d), lambda j, n, h: (n, 0, h, 0))
  group_stat = pl.BlockSpec((None, group, lq), lambda j, n, h: (n, h, 0))
  visit_shape_t, visit_spec_t = _visits_out(cfg.count_visits, (b, hkv, nk, nq), lambda j, n, h: (n, h, j, 0))
  dkv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(nk, b, hkv),
      in_specs=[
          pl.BlockSpec((None, nk), lambda j, n, h: (n, 0)),
          pl.BlockSpec((None, None, lists.q_tiles.shape[-1]), lambda j, n, h: (n, j, 0)),
          pl.BlockSpec((None, lq), lambda j, n, h: (n, 0)),
          pl.BlockSpec((None, lq), lambda j, n, h: (n, 0)),
          pl.BlockSpec((None, bk), lambda j, n, h: (n, j)),
          pl.BlockSpec((None, bk), lambda j, n, h: (n, j)),
          q_group, kv_tile, kv_tile, q_group, group_stat, group_stat,
      ],
      out_specs=[kv_tile, kv_tile, *visit_spec_t],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), *visit_shape_t],
      compiler_params=cfg.compiler_params(d),
      interpret=cfg.interpret,
      name="dvl_flash_dkv",
  )(lists.q_counts, lists.q_tiles, *index_args, q, k, v, do, lse, delta)
  visits = (dq[1], dkv[2]) if cfg.count_visits else (None, None)
  return dq[0], dkv[0], dkv[1], visits


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, lists: block_table.TileLists, pos: tuple[jax.Array, ...], q, k, v):
  return _forward(cfg, lists, pos, q, k, v)[0]


def _flash_fwd(cfg, lists, pos, q, k, v):
  o, lse, _ = _forward(cfg, lists, pos, q, k, v)
  return o, (lists, pos, q, k, v, o, lse)


def _flash_bwd(cfg, residuals, do):
  lists, pos, q, k, v, o, lse = residuals
  dq, dk, dv, _ = _backward(cfg, lists, pos, q, k, v, o, lse, do)
  return None, None, dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> str | None:
  """Why this backend cannot run these inputs here, or None."""
  if jax.default_backend() == "tpu":
    return "its Triton kernels need a GPU (splash is the TPU kernel)"
  if jax.default_backend() == "gpu" and plgpu is None:
    return (f"inputs with this JAX ({jax.__version__}), which has no Pallas Triton backend for the kernel "
            "(JAX <= 0.11 has it)")
  if q.dtype not in DTYPES:
    return f"dtype {q.dtype} (supported: float32, bfloat16, float16)"
  if pl.next_power_of_2(q.shape[-1]) > MAX_HEAD_DIM:
    return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
  return None


def _plan(spec: AttentionSpec, dtype, d: int, block_q: int | None, block_k: int | None, interpret: bool | None,
          count_visits: bool = False) -> tuple[_Config, block_table.TileLists, tuple[jax.Array, ...]]:
  """The tiles for `spec`'s lengths and `dtype` x head dim `d`: (config, tile lists, index and segment arrays
  padded to whole tiles)."""
  lq, lk = spec.q_idx.shape[1], spec.kv_idx.shape[1]
  default_q, default_k = default_tiles(lq, lk, max(16, pl.next_power_of_2(d)) * jnp.dtype(dtype).itemsize)
  bq, bk = block_q or default_q, block_k or default_k
  lq_p, lk_p = -(-lq // bq) * bq, -(-lk // bk) * bk
  cfg = _Config(kind=spec.kind, block_size=spec.block_size, half_len=spec.half_len, scale=d ** -0.5,
                block_q=bq, block_k=bk, count_visits=count_visits,
                interpret=jax.default_backend() != "gpu" if interpret is None else interpret)
  seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])))  # noqa: E731
  pos = (seq(spec.q_idx, lq_p), seq(spec.q_seg, lq_p), seq(spec.kv_idx, lk_p), seq(spec.kv_seg, lk_p))
  return cfg, block_table.tile_lists(spec, bq, bk), pos


def _prepare(q, k, v, spec: AttentionSpec, block_q: int | None, block_k: int | None, interpret: bool | None,
             count_visits: bool = False):
  """`_plan`, and q, k, v padded to whole tiles / a power-of-two head dim; -> (config, tile lists, index arrays, q,
  k, v)."""
  d = q.shape[-1]
  dp = max(16, pl.next_power_of_2(d))
  cfg, lists, pos = _plan(spec, q.dtype, d, block_q, block_k, interpret, count_visits)
  lq_p, lk_p = pos[0].shape[1], pos[2].shape[1]
  heads = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))  # noqa: E731
  return cfg, lists, pos, heads(q, lq_p), heads(k, lk_p), heads(v, lk_p)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, *, block_q: int | None = None,
           block_k: int | None = None, interpret: bool | None = None) -> jax.Array:
  """q `[B, Lq, Hq, D]`, k/v `[B, Lk, Hkv, D]` -> `[B, Lq, Hq, D]`; differentiable in q, k, v.

  `block_q`/`block_k`: tile sizes (powers of two >= 16; default 128 / 64, less for wide rows (`default_tiles`) and
  shorter sequences). `interpret`: run the kernels in the Pallas interpreter (default: unless the platform is a
  GPU). Under a mesh context each device runs its own rows and heads (`shards`).
  """

  def local(q, k, v, spec):
    cfg, lists, pos, qp, kp, vp = _prepare(q, k, v, spec, block_q, block_k, interpret)
    return _flash(cfg, lists, pos, qp, kp, vp)[:, :q.shape[1], :, :q.shape[-1]]

  return shards.per_device(local, q, k, v, spec)


class _Heads(NamedTuple):
  """Queries, new keys and new values as the kernel reads them: three arrays `[B, L, H, D]` and the first head of
  each in its array (one `[B, L, Hq + 2 Hkv, D]` array three times: no copies of its parts)."""

  arrays: tuple[jax.Array, jax.Array, jax.Array]
  num_heads: int
  num_kv_heads: int
  first: tuple[int, int, int] = (0, 0, 0)

  @classmethod
  def joint(cls, qkv: jax.Array, num_heads: int) -> "_Heads":
    hkv = (qkv.shape[2] - num_heads) // 2
    return cls((qkv, qkv, qkv), num_heads, hkv, (0, num_heads, num_heads + hkv))

  def on(self, arrays: tuple[jax.Array, jax.Array, jax.Array]) -> "_Heads":
    """The same parts of `arrays` (a device's share: separate arrays may hold fewer heads there)."""
    if self.first == (0, 0, 0):
      return _Heads(arrays, arrays[0].shape[2], arrays[1].shape[2])
    return self._replace(arrays=arrays)

  def split(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The three parts as arrays of their own."""
    sizes = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
    return tuple(x[:, :, f:f + size] for x, f, size in zip(self.arrays, self.first, sizes))


def attend_prefixed(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, prefix: CachePrefix, *,
                    block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None
                    ) -> jax.Array:
  """`attend` over keys `[prefix ; k]` (`spec`'s key arrays `[B, Lp + Lk]`), the cache prefix read in place:
  forward only (decoding). A prefix it cannot read in place (`reads_prefix_in_place`) is concatenated instead."""
  return _attend_prefixed(_Heads((q, k, v), q.shape[2], k.shape[2]), spec, prefix, block_q, block_k, interpret)


def reads_prefix_in_place(length: int, head_dim: int, cache_dtype: Any, query_dtype: Any) -> bool:
  """Whether `attend_prefixed` reads a cache prefix of `length` slots where it is; else it concatenates it: a prefix
  shorter than one tile (16), a head dim that is not a power of two >= 16 (the cache would need padding), a cache
  in another dtype than the queries."""
  return (length >= 16 and head_dim == max(16, pl.next_power_of_2(head_dim))
          and jnp.dtype(cache_dtype) == jnp.dtype(query_dtype))


def attend_prefixed_joint(qkv: jax.Array, num_heads: int, spec: AttentionSpec, prefix: CachePrefix, *,
                          block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None
                          ) -> jax.Array:
  """`attend_prefixed` for queries, new keys and values as one array `[B, L, Hq + 2 Hkv, D]` (heads in that order),
  which the kernel reads where they are: separate arrays cut from one would each be a copy (a kernel each)."""
  return _attend_prefixed(_Heads.joint(qkv, num_heads), spec, prefix, block_q, block_k, interpret)


def _attend_prefixed(qkv: _Heads, spec: AttentionSpec, prefix: CachePrefix, block_q: int | None,
                     block_k: int | None, interpret: bool | None) -> jax.Array:
  q = qkv.arrays[0]
  lq, lp, d = q.shape[1], prefix.length, q.shape[-1]
  if not reads_prefix_in_place(lp, d, prefix.keys.dtype, q.dtype):
    q, k, v = qkv.split()
    keys, values = prefix.joined(k, v)
    return attend(q, keys, values, spec, block_q=block_q, block_k=block_k, interpret=interpret)
  where = shards.split(q.shape[0], qkv.num_kv_heads)
  if where is not None and where.heads is not None and qkv.first != (0, 0, 0):  # heads split: each part apart
    qkv = _Heads(qkv.split(), qkv.num_heads, qkv.num_kv_heads)

  def local(q, k, v, spec, prefix):
    cached, new = (spec.replace(kv_idx=spec.kv_idx[:, part], kv_seg=spec.kv_seg[:, part])
                   for part in (slice(None, lp), slice(lp, None)))
    cfg, lists, pos = _plan(new, q.dtype, d, block_q, block_k, interpret)
    prefix_block = min(block_k or default_tiles(lq, lp, d * q.dtype.itemsize)[1], 1 << (lp.bit_length() - 1))
    prefix_lists = block_table.tile_lists(cached, cfg.block_q, prefix_block)
    return _prefixed_forward(cfg, prefix_block, lists, prefix_lists, pos, (cached.kv_idx, cached.kv_seg),
                             qkv.on((q, k, v)), prefix)

  return shards.per_device(local, *qkv.arrays, spec, prefix, kv_heads=qkv.num_kv_heads)


def tile_visits(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, do: jax.Array, *,
                block_q: int | None = None, block_k: int | None = None) -> dict[str, jax.Array]:
  """How often each kernel loaded each partner tile (interpreted), to check skipping against the table.

  -> `forward`, `dq`: `[B, Hq, nq, nk]`; `dkv`: `[B, Hkv, nk, nq]` (summed over the group's heads).
  """
  cfg, lists, pos, qp, kp, vp = _prepare(q, k, v, spec, block_q, block_k, True, count_visits=True)
  do = jnp.pad(do, [(0, n - m) for n, m in zip(qp.shape, do.shape)])
  o, lse, forward = _forward(cfg, lists, pos, qp, kp, vp)
  *_, (dq, dkv) = _backward(cfg, lists, pos, qp, kp, vp, o, lse, do)
  return {"forward": forward, "dq": dq, "dkv": dkv}
