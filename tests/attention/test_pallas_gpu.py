"""The Pallas GPU kernel (interpreted on CPU) against the dense reference, and its tile skipping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dvl_jax.attention import block_table, pallas_gpu
from dvl_jax.attention.reference import attend_dense
from dvl_jax.parallel.mesh import make_mesh
from tests.attention.cases import (Case, assert_reads_the_prefix_layer, cache_prefix_window, cache_window,
                                   max_errors, problem, targeting)

TILE = 16  # small tiles: several per sequence, so skipping and tile boundaries are exercised

CASES = {
    "bd3-L20-bs4-gqa4:1-d64-padded": Case("bd3_train", 40, (4, 1), 64, block_size=4, pad=6),
    "bd3-L37-bs8-gqa2:1-d80": Case("bd3_train", 74, (4, 2), 80, block_size=8),
    "bd3-L64-bs16-mha-d128-padded": Case("bd3_train", 128, (2, 2), 128, block_size=16, pad=21),
    "prefill-L45-bs8-gqa4:1-padded": Case("block_causal", 45, (4, 1), 64, block_size=8, pad=13),
    "causal-L33-gqa2:1-padded": Case("causal", 33, (4, 2), 64, pad=5),
    "vision-windows-L50-d80-padded": Case("full", 50, (2, 2), 80, block_size=8, pad=7, batch=1),
}


def test_default_tiles_match_reference():
  """First in the file: on a GPU host, where each test compiles its kernels, the default tiles' parity is the
  check a time limit must not cut."""
  q, k, v, spec = problem(Case("bd3_train", 150, (4, 2), 64, block_size=8, pad=9))  # 128 x 64 tiles, last ones partial
  fwd, bwd = max_errors(functools.partial(pallas_gpu.attend, spec=spec), q, k, v, spec)
  assert fwd <= 1e-5 and bwd <= 1e-4, (fwd, bwd)


def test_default_tiles_shrink_with_the_row_bytes_so_the_backward_fits_shared_memory():
  """128 x 64 for bf16 rows up to head_dim 128 (the H200-tuned tiles); fp32 at 128 or bf16 at 256 take 64 x 64
  and fp32 at 256 32 x 32, which compile for an A100 and an H200 where 128 x 64 did not."""
  assert pallas_gpu.default_tiles(4096, 4096, 2 * 128) == (128, 64)
  assert pallas_gpu.default_tiles(4096, 4096, 4 * 64) == (128, 64)
  assert pallas_gpu.default_tiles(4096, 4096, 4 * 128) == pallas_gpu.default_tiles(4096, 4096, 2 * 256) == (64, 64)
  assert pallas_gpu.default_tiles(4096, 4096, 4 * 256) == (32, 32)
  assert pallas_gpu.default_tiles(20, 40, 4 * 256) == (32, 32) and pallas_gpu.default_tiles(20, 40) == (32, 64)
  q, k, v, spec = problem(Case("causal", 40, (2, 1), 128, pad=3))  # fp32 x 128: 64 x 64 tiles, the last partial
  fwd, bwd = max_errors(functools.partial(pallas_gpu.attend, spec=spec), q, k, v, spec)
  assert fwd <= 1e-5 and bwd <= 1e-4, (fwd, bwd)


@pytest.mark.parametrize("name", CASES)
def test_matches_reference_fp32(name):
  q, k, v, spec = problem(CASES[name])
  fwd, bwd = max_errors(functools.partial(pallas_gpu.attend, spec=spec, block_q=TILE, block_k=TILE), q, k, v, spec)
  assert fwd <= 1e-5 and bwd <= 1e-4, (fwd, bwd)


def test_cache_window_matches_reference():
  q, k, v, spec = cache_window()
  fwd, bwd = max_errors(functools.partial(pallas_gpu.attend, spec=spec, block_q=TILE, block_k=TILE), q, k, v, spec)
  assert fwd <= 1e-5 and bwd <= 1e-4, (fwd, bwd)


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_half_precision_inputs(dtype, tol):
  q, k, v, spec = problem(CASES["bd3-L20-bs4-gqa4:1-d64-padded"], dtype=dtype)
  fwd, bwd = max_errors(functools.partial(pallas_gpu.attend, spec=spec, block_q=TILE, block_k=TILE), q, k, v, spec)
  assert fwd <= tol and bwd <= 10 * tol, (fwd, bwd)


def _exact_tiles(spec, tile):
  """`[B, nq, nk]`: tiles holding at least one allowed entry, from the dense mask."""
  m = np.asarray(spec.dense())
  b, lq, lk = m.shape
  m = np.pad(m, ((0, 0), (0, -lq % tile), (0, -lk % tile)))
  return m.reshape(b, m.shape[1] // tile, tile, m.shape[2] // tile, tile).any(axis=(2, 4))


@pytest.mark.parametrize("name", ["bd3-L64-bs16-mha-d128-padded", "vision-windows-L50-d80-padded", "cache-window"])
def test_kernels_visit_exactly_the_live_tiles(name):
  q, k, v, spec = cache_window() if name == "cache-window" else problem(CASES[name])
  do = jnp.ones_like(q)
  visits = jax.jit(functools.partial(pallas_gpu.tile_visits, block_q=TILE, block_k=TILE))(q, k, v, spec, do)
  live = np.asarray(block_table.live_tiles(spec, TILE, TILE)).astype(np.int32)
  group = q.shape[2] // k.shape[2]
  np.testing.assert_array_equal(visits["forward"], np.broadcast_to(live[:, None], visits["forward"].shape))
  np.testing.assert_array_equal(visits["dq"], np.broadcast_to(live[:, None], visits["dq"].shape))
  np.testing.assert_array_equal(visits["dkv"], group * np.broadcast_to(live.transpose(0, 2, 1)[:, None],
                                                                       visits["dkv"].shape))
  exact = _exact_tiles(spec, TILE)
  assert (live >= exact).all()  # never skips a tile with an allowed entry
  # Segments here are contiguous runs, so the table is exact; and skipping is real.
  np.testing.assert_array_equal(live, exact)
  assert live.mean() < 0.75, live.mean()


def test_bd3_structure_skips_three_quarters_at_scale():
  tiles = block_table.structural_tiles("bd3_train", 8, 4096, True, 8192, 8192, 64, 64)
  assert 0.70 < 1 - tiles.mean() < 0.76


def test_lowers_to_triton_for_gpu():
  """The Triton lowering (power-of-two tensors, supported primitives) runs without a GPU: bf16, GQA 7:1, d=80."""
  q, k, v, spec = problem(Case("bd3_train", 74, (14, 2), 80, block_size=8), dtype=jnp.bfloat16)
  loss = lambda q, k, v: pallas_gpu.attend(q, k, v, spec, interpret=False).astype(jnp.float32).sum()
  with targeting("NVIDIA H100 80GB HBM3", "gpu"):  # JAX >= 0.11 asks for the GPU's compute capability
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


CACHED = {  # (cache slots, new keys, mask kind, key tile): the samplers' steps; caches of 44 and 70 end in a tile
    # that overlaps the one before it and holds valid keys on both sides of the tile boundary
    "block-diffusion-window-cache40": (40, 8, "block_causal", None),
    "block-diffusion-window-cache44-tiles16": (44, 8, "block_causal", TILE),
    "ar-step-cache70-tiles16": (70, 1, "causal", TILE),
    "fused-window-cache37-tiles16": (37, 16, "block_causal", TILE),
    "cache-of-one-tile": (16, 8, "block_causal", None),
}


@pytest.mark.parametrize("name", CACHED)
def test_a_cache_prefix_read_in_place_matches_the_reference_over_the_concatenation(name):
  cache, window, kind, tile = CACHED[name]
  q, k, v, spec, prefix = cache_prefix_window(cache, window, kind)
  out = jax.jit(functools.partial(pallas_gpu.attend_prefixed, spec=spec, block_k=tile))(q, k, v, prefix=prefix)
  assert_reads_the_prefix_layer(out, q, k, v, spec, prefix)


def test_queries_keys_and_values_read_from_one_array_give_the_numbers_of_three():
  """The decoder hands a decoding step's q, k and v as one array (one fused epilogue, no copies of its parts)."""
  q, k, v, spec, prefix = cache_prefix_window(44, 8, "block_causal")
  joint = jax.jit(lambda qkv, prefix: pallas_gpu.attend_prefixed_joint(qkv, q.shape[2], spec, prefix, block_k=TILE))
  apart = jax.jit(lambda q, k, v, prefix: pallas_gpu.attend_prefixed(q, k, v, spec, prefix, block_k=TILE))
  np.testing.assert_array_equal(np.asarray(joint(jnp.concatenate([q, k, v], axis=2), prefix)),
                                np.asarray(apart(q, k, v, prefix)))


def test_a_cache_prefix_in_bf16_matches_the_reference():
  q, k, v, spec, prefix = cache_prefix_window(48, 8, "block_causal", dtype=jnp.bfloat16, head_dim=32)
  out = jax.jit(functools.partial(pallas_gpu.attend_prefixed, spec=spec))(q, k, v, prefix=prefix)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref = attend_dense(f32(q), *(f32(x) for x in prefix.joined(k, v)), spec)
  rows = np.asarray(spec.dense().any(-1))
  assert np.abs(np.asarray(out, np.float32) - np.asarray(ref))[rows].max() <= 3e-2


def test_a_cache_prefix_the_kernel_cannot_read_in_place_is_concatenated():
  """Shorter than a tile, or a head dim that would need padding (80): the same numbers as `attend` over the
  concatenation, and the cache is copied (a concatenate in the program) only then."""
  for cache, head_dim, in_place in ((12, 16, False), (40, 80, False), (40, 16, True)):
    q, k, v, spec, prefix = cache_prefix_window(cache, 8, "block_causal", head_dim=head_dim)
    run = functools.partial(pallas_gpu.attend_prefixed, spec=spec)
    np.testing.assert_allclose(np.asarray(run(q, k, v, prefix=prefix)),
                               np.asarray(pallas_gpu.attend(q, *prefix.joined(k, v), spec)), atol=1e-6, rtol=0)
    assert ("concatenate" not in str(jax.make_jaxpr(run)(q, k, v, prefix=prefix))) == in_place


@pytest.mark.skipif(jax.device_count() < 8, reason="8 devices: the CPU suite fakes them, a one-GPU host has one")
def test_on_a_mesh_each_device_runs_its_own_rows_and_heads():
  """XLA cannot split a Pallas custom call: without `shard_map` every GPU gathered the whole batch and ran the kernel
  on all of it (training) or gathered the whole KV cache every step (decoding). Under `jax.set_mesh` each device
  runs its rows and kv heads, with the same numbers as one device."""
  q, k, v, spec = problem(Case("bd3_train", 40, (4, 2), 64, block_size=4, pad=6, batch=4))
  weight = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

  def train(q, k, v, spec):
    out, pull = jax.vjp(lambda q, k, v: pallas_gpu.attend(q, k, v, spec, block_q=TILE, block_k=TILE), q, k, v)
    return out, pull(weight)

  dq, dk, dv, dspec, prefix = cache_prefix_window(40, 8, "block_causal", batch=4)
  decode = lambda q, k, v, spec, prefix: pallas_gpu.attend_prefixed(q, k, v, spec, prefix, block_k=TILE)  # noqa: E731
  expected = jax.jit(train)(q, k, v, spec), jax.jit(decode)(dq, dk, dv, dspec, prefix)
  mesh = make_mesh((2, 2, 2))
  rows_heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  with jax.set_mesh(mesh):
    assert str(jax.make_jaxpr(train)(q, k, v, spec)).count("shard_map") == 2  # forward and backward
    assert "shard_map" in str(jax.make_jaxpr(decode)(dq, dk, dv, dspec, prefix))
    got = (jax.jit(train)(*(jax.device_put(x, rows_heads) for x in (q, k, v)), spec),
           jax.jit(decode)(*(jax.device_put(x, rows_heads) for x in (dq, dk, dv)), dspec, prefix))
  rows = np.asarray(dspec.dense().any(-1))
  np.testing.assert_allclose(np.asarray(got[1])[rows], np.asarray(expected[1])[rows], atol=1e-6, rtol=0)
  for g, e in zip(jax.tree.leaves(got[0]), jax.tree.leaves(expected[0])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=0)
