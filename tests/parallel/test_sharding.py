"""Params sharded over (data, fsdp, tensor) meshes give the single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.core.vision_layout import vision_layout
from dvl_jax.models.families import abstract_model
from dvl_jax.testing.tiny import tiny_model
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import abstract_arrays, logical_shardings, partition_spec


def _inputs(cfg):
  rng = np.random.default_rng(0)
  grid = np.array([[1, 4, 8]])
  n_img = int(grid.prod() // 4)
  ids = rng.integers(3, 200, (4, n_img + 6))
  ids[0, 2:2 + n_img] = cfg.image_token_id
  pixels = rng.normal(size=(int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(pixels), vision_layout(grid, cfg.vision)


def test_partition_spec_rules():
  mesh = make_mesh((2, 2, 2))
  assert partition_spec(("layers", "embed", "heads"), (2, 64, 64), mesh) == PartitionSpec(None, "fsdp", "tensor")
  # A dimension the mesh axis does not divide stays replicated instead of failing.
  assert partition_spec(("vocab", "embed"), (255, 64), mesh) == PartitionSpec(None, "fsdp")
  with pytest.raises(KeyError, match="no sharding rule"):
    partition_spec(("bogus",), (4,), mesh)
  with pytest.raises(ValueError, match="needs 8 devices"):
    make_mesh((2, 2, 2), devices=jax.devices()[:4])


@pytest.mark.parametrize("shape", [(1, 4, 2), (1, 2, 4), (1, 1, 8), (2, 2, 2)])
def test_sharded_forward_equals_single_device(shape):
  cfg = tiny_config()
  model = tiny_model(cfg)
  graphdef, state = nnx.split(model)
  ids, pixels, layout = _inputs(cfg)

  @jax.jit
  def forward(state, ids, pixels, layout):
    return nnx.merge(graphdef, state)(ids, pixels, positions="flat", vision=layout)

  expected = np.asarray(forward(state, ids, pixels, layout))
  mesh = make_mesh(shape)
  shardings = logical_shardings(state, mesh)
  sharded = jax.device_put(state, shardings)
  kernel = sharded["text"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.size < kernel.size
  batch = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  out = forward(sharded, jax.device_put(ids, batch), pixels, layout)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_abstract_arrays_carry_shardings():
  cfg = tiny_config()
  abstract = nnx.split(abstract_model(cfg))[1]
  mesh = make_mesh((1, 4, 2))
  leaves = jax.tree.leaves(abstract_arrays(abstract, mesh))
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding.mesh == mesh for x in leaves)
