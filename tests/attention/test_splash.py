"""Splash attention (interpreted on CPU) against the dense reference, its block structure, and shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dvl_jax.attention import block_table, splash
from dvl_jax.parallel.mesh import make_mesh
from tests.attention.cases import Case, max_errors, problem, targeting

CASES = {
    "bd3-L20-bs4-gqa4:1-d64-padded": Case("bd3_train", 40, (4, 1), 64, block_size=4, pad=6),
    "bd3-L150-bs8-gqa2:1-d80-padded": Case("bd3_train", 300, (4, 2), 80, block_size=8, pad=40),
    "bd3-L64-bs16-mha-d128": Case("bd3_train", 128, (2, 2), 128, block_size=16),
    "prefill-L45-bs8-gqa4:1-padded": Case("block_causal", 45, (4, 1), 64, block_size=8, pad=13),
    "vision-windows-L50-d80-padded": Case("full", 50, (2, 2), 80, block_size=8, pad=7, batch=1),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference_fp32(name):
  q, k, v, spec = problem(CASES[name])
  fwd, bwd = max_errors(functools.partial(splash.attend, spec=spec), q, k, v, spec)
  assert fwd <= 1e-5 and bwd <= 1e-4, (fwd, bwd)


@pytest.mark.parametrize("kind, block_size, half_len", [("bd3_train", 8, 192), ("block_causal", 8, 0),
                                                        ("causal", 1, 0)])
def test_splash_skips_the_blocks_the_host_table_calls_empty(kind, block_size, half_len):
  """Splash's MaskInfo (from `KindMask`) and our structural table agree block for block."""
  length = 384
  info = splash._kernel(length, kind, block_size, half_len, 2, True).fwd_mask_info  # pylint: disable=protected-access
  block = splash.block_for(length)
  ours = block_table.structural_tiles(kind, block_size, half_len, True, length, length, block, block)
  visited = np.zeros_like(ours)  # splash compacts each row: data_next names the kv block of each step
  for i, (steps, blocks) in enumerate(zip(np.asarray(info.block_mask)[0], np.asarray(info.data_next)[0])):
    visited[i, blocks[steps > 0]] = True
  np.testing.assert_array_equal(visited, ours)
  assert not ours.all()


def test_shard_map_on_8_devices_equals_single_device():
  q, k, v, spec = problem(Case("bd3_train", 40, (4, 2), 64, block_size=4, pad=6, batch=4))
  weight = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

  def run(q, k, v, spec):
    out, pull = jax.vjp(lambda q, k, v: splash.attend(q, k, v, spec), q, k, v)
    return out, pull(weight)

  expected = jax.jit(run)(q, k, v, spec)
  mesh = make_mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, spec))
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    got = jax.jit(run)(*(jax.device_put(x, heads) for x in (q, k, v)), spec)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6, rtol=0)


def test_lowers_to_mosaic_for_tpu():
  """The Mosaic lowering runs without a TPU (bf16, GQA, d=80, bd3 mask), for an abstract v5e: some lowering
  rules ask for the chip's generation."""
  q, k, v, spec = problem(Case("bd3_train", 74, (4, 2), 80, block_size=8), dtype=jnp.bfloat16)
  loss = lambda q, k, v: splash.attend(q, k, v, spec, interpret=False).astype(jnp.float32).sum()
  with targeting("TPU v5 lite", "tpu", num_cores=1):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 2  # forward, fused dQ/dK/dV
