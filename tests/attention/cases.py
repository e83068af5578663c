"""Random attention problems for every mask kind, and the comparison of a backend with the dense reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.attention.cache_prefix import CachePrefix
from dvl_jax.attention.reference import attend_dense
from dvl_jax.attention.spec import AttentionSpec


@dataclasses.dataclass(frozen=True)
class Case:
  """`length` is the attended sequence (`2 * half_len` for bd3_train); `pad` right-pads the last row."""

  kind: str
  length: int
  heads: tuple[int, int] = (4, 2)
  head_dim: int = 64
  block_size: int = 4
  pad: int = 0
  batch: int = 2


def _segments(case: Case) -> np.ndarray:
  """`[B, length]` segment ids: 1 (0 for padding); bd3 pads both halves; `full` = windows of `block_size`."""
  b, n = case.batch, case.length
  if case.kind == "bd3_train":
    half = np.ones((b, n // 2), np.int32)
    half[-1, n // 2 - case.pad:] = 0
    return np.concatenate([half, half], axis=1)
  if case.kind == "full":  # vision: one segment per window of `block_size` patches
    seg = np.broadcast_to(np.arange(n, dtype=np.int32) // case.block_size + 1, (b, n)).copy()
  else:
    seg = np.ones((b, n), np.int32)
  seg[-1, n - case.pad:] = 0
  return seg


def problem(case: Case, dtype=jnp.float32, seed: int = 0):
  """-> q `[B, L, Hq, D]`, k, v `[B, L, Hkv, D]`, positional spec."""
  rng = np.random.default_rng(seed)
  hq, hkv = case.heads
  shape = lambda h: (case.batch, case.length, h, case.head_dim)
  q, k, v = (jnp.asarray(rng.normal(size=shape(h)), dtype) for h in (hq, hkv, hkv))
  static = dict(block_size=case.block_size, half_len=case.length // 2 if case.kind == "bd3_train" else 0)
  return q, k, v, AttentionSpec.self_attention(jnp.asarray(_segments(case)), kind=case.kind, **static)


def cache_window(batch: int = 2, window: int = 8, cache: int = 64, heads=(4, 2), head_dim: int = 64, seed: int = 0):
  """A sampler-style non-positional spec: queries at absolute slots `start + arange(window)` against
  `[cache slots ; the window]`, block-causal over absolute indices, cache valid below `start`."""
  rng = np.random.default_rng(seed)
  start = np.array([16, 24])[:batch]
  slots = start[:, None] + np.arange(window)
  cache_idx = np.broadcast_to(np.arange(cache), (batch, cache))
  kv_idx = np.concatenate([cache_idx, slots], axis=1)
  kv_seg = np.concatenate([cache_idx < start[:, None], np.ones_like(slots)], axis=1)
  spec = AttentionSpec(q_idx=jnp.asarray(slots, jnp.int32), kv_idx=jnp.asarray(kv_idx, jnp.int32),
                       q_seg=jnp.ones((batch, window), jnp.int32), kv_seg=jnp.asarray(kv_seg, jnp.int32),
                       kind="block_causal", block_size=8)
  q = jnp.asarray(rng.normal(size=(batch, window, heads[0], head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, cache + window, heads[1], head_dim)), jnp.float32) for _ in "kv")
  return q, k, v, spec


def _forward_and_grads(attend, weight: jax.Array):
  """Jitted `(q, k, v) -> (out, d(sum(out * weight))/d(q, k, v))`."""

  def run(q, k, v):
    out, pull = jax.vjp(attend, q, k, v)
    return out, pull(weight.astype(out.dtype))

  return jax.jit(run)


def max_errors(attend, q, k, v, spec: AttentionSpec, seed: int = 1) -> tuple[float, float]:
  """Max |forward - reference| and max |grad - reference grad| over q, k, v (fp32 reference).

  Only rows with at least one allowed key are compared (other rows are unspecified); they must
  still be finite, and the cotangent gives them no weight.
  """
  rows = np.asarray(spec.dense().any(-1))
  weight = np.random.default_rng(seed).normal(size=q.shape) * rows[:, :, None, None]
  weight = jnp.asarray(weight, q.dtype).astype(jnp.float32)  # exactly representable in q's dtype
  out, grads = _forward_and_grads(attend, weight)(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref, ref_grads = _forward_and_grads(lambda q, k, v: attend_dense(q, k, v, spec), weight)(*f32)
  out = np.asarray(out, np.float32)
  assert np.isfinite(out).all() and all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
  fwd = float(np.abs(out - np.asarray(ref))[rows].max())
  bwd = max(float(jnp.abs(g.astype(jnp.float32) - r).max()) for g, r in zip(grads, ref_grads))
  return fwd, bwd


def targeting(device_kind: str, platform: str, num_cores: int | None = None):
  """A context in which a lowering without that hardware targets a `device_kind` chip: the Pallas lowerings ask the
  abstract mesh's device for the chip's generation (TPU tiling, GPU compute capability)."""
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform=platform)
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("device",), (auto,), abstract_device=device))


def cache_prefix_window(cache: int, window: int, kind: str, *, layers: int = 3, batch: int = 2, heads=(4, 2),
                        head_dim: int = 16, dtype=jnp.float32, seed: int = 0):
  """A decoding step's attention as the samplers call it: queries at slots `end + arange(window)` (the second
  row's last one invalid) against `[layer 1 of a stacked cache ; the window]`, cache valid below each row's
  `end` (the first row's window is the cache's last). -> q, new k, v, spec over `cache + window` keys,
  `CachePrefix`."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
  end = np.minimum([cache - window, 5, 11, 2][:batch], cache - window)
  slots = end[:, None] + np.arange(window)
  valid = np.ones((batch, window), bool)
  valid[1:, -1] = False
  cache_idx = np.broadcast_to(np.arange(cache), (batch, cache))
  spec = AttentionSpec(q_idx=jnp.asarray(slots, jnp.int32),
                       kv_idx=jnp.asarray(np.concatenate([cache_idx, slots], 1), jnp.int32),
                       q_seg=jnp.asarray(valid, jnp.int32),
                       kv_seg=jnp.asarray(np.concatenate([cache_idx < end[:, None], valid], 1), jnp.int32),
                       kind=kind, block_size=8)
  prefix = CachePrefix(normal(layers, batch, cache, heads[1], head_dim), normal(layers, batch, cache, heads[1],
                                                                                head_dim), jnp.int32(1))
  q, k, v = (normal(batch, window, h, head_dim) for h in (heads[0], heads[1], heads[1]))
  return q, k, v, spec, prefix


def assert_reads_the_prefix_layer(out: jax.Array, q, k, v, spec: AttentionSpec, prefix: CachePrefix) -> np.ndarray:
  """`out` of a cache-prefix kernel equals the dense reference over `[layer of the cache ; k]` on the rows with an
  allowed key (within 1e-5), and that layer is the prefix's (another layer's numbers differ); -> those rows."""
  ref = np.asarray(attend_dense(q, *prefix.joined(k, v), spec))
  rows = np.asarray(spec.dense().any(-1))
  assert rows.sum() < rows.size  # an invalid query row, whose output nobody reads
  np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], atol=1e-5, rtol=0)
  other_layer = attend_dense(q, *prefix._replace(layer=jnp.int32(2)).joined(k, v), spec)
  assert np.abs(np.asarray(other_layer) - ref)[rows].max() > 1e-2  # the layer index is read
  return rows
