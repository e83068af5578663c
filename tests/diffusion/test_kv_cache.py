"""`kv_cache.write`: the enabled rows' windows land where they should, nothing else changes, on one device or a
mesh, and the write reads nothing back from the cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dvl_jax.diffusion import kv_cache
from dvl_jax.parallel.mesh import make_mesh

LAYERS, ROWS, SLOTS, HEADS, DIM, WINDOW = 2, 4, 12, 2, 3, 4


def _expected(cache: np.ndarray, new: np.ndarray, starts: np.ndarray, enabled: np.ndarray) -> np.ndarray:
  out = cache.copy()
  for b in np.flatnonzero(enabled):
    s = min(max(int(starts[b]), 0), SLOTS - WINDOW)
    out[:, b, s:s + WINDOW] = new[:, b]
  return out


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  cache = tuple(rng.normal(size=(LAYERS, ROWS, SLOTS, HEADS, DIM)).astype(np.float32) for _ in "kv")
  new = tuple(rng.normal(size=(LAYERS, ROWS, WINDOW, HEADS, DIM)).astype(np.float32) for _ in "kv")
  starts = np.array([0, 5, 10, 3], np.int32)  # row 2's window is clipped to the cache's last slots
  enabled = np.array([True, False, True, True])
  return cache, new, starts, enabled


def test_enabled_rows_write_their_windows_and_the_rest_stays():
  cache, new, starts, enabled = _inputs()
  out = jax.jit(kv_cache.write)(tuple(map(jnp.asarray, cache)), tuple(map(jnp.asarray, new)), starts, enabled)
  for got, c, x in zip(out, cache, new):
    np.testing.assert_array_equal(np.asarray(got), _expected(c, x, starts, enabled))


def test_the_write_reads_nothing_back_from_the_cache():
  """A disabled row used to write back what its window held: a gather over the cache, which XLA:TPU served by
  relayouting the whole stacked cache (twice per AR step, compiled for a v5e)."""
  cache, new, starts, enabled = _inputs()
  jaxpr = str(jax.make_jaxpr(kv_cache.write)(cache, new, starts, enabled))
  assert "gather" not in jaxpr and "scatter" in jaxpr


def test_every_layer_row_and_slot_is_an_index_and_only_heads_and_dims_a_window():
  """With the layers inside the scatter's window a device holding one kv head saw `[layers, head_dim]` windows,
  and XLA:TPU kept its cache layers-second-minor, relayouting it for the decoding kernel at every forward."""
  cache, new, starts, enabled = _inputs()
  text = jax.jit(kv_cache.write).lower(cache, new, starts, enabled).as_text()
  dims = re.findall(r"update_window_dims = \[([\d, ]*)\], inserted_window_dims = \[([\d, ]*)\]", text)
  assert len(dims) == 2 and all(inserted == "0, 1, 2" for _, inserted in dims), dims


def test_on_a_mesh_each_device_writes_its_own_rows_without_collectives():
  cache, new, starts, enabled = _inputs(1)
  mesh = make_mesh((2, 1, 2), jax.devices()[:4])
  sharding = NamedSharding(mesh, P(None, "data", None, "tensor", None))
  put = lambda xs: tuple(jax.device_put(x, sharding) for x in xs)  # noqa: E731
  write = jax.jit(lambda c, x, s, e: kv_cache.write(c, x, s, e, sharding))
  compiled = write.lower(put(cache), put(new), starts, enabled).compile().as_text()
  assert not any(op in compiled for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"))
  out = write(put(cache), put(new), starts, enabled)
  for got, c, x in zip(out, cache, new):
    assert got.sharding.is_equivalent_to(sharding, 5)
    np.testing.assert_array_equal(np.asarray(got), _expected(c, x, starts, enabled))
