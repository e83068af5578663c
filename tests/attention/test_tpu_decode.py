"""The TPU decoding kernel (interpreted on CPU) against the dense reference over `[cache ; window]`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvl_jax.attention import tpu_decode
from dvl_jax.attention.reference import attend_dense
from tests.attention.cases import assert_reads_the_prefix_layer, cache_prefix_window, targeting

CASES = {  # (cache slots, window, mask kind, cache tile, (query heads, kv heads)): the samplers' steps
    "block-diffusion-window-cache40-one-tile": (40, 8, "block_causal", None, (4, 2)),
    "block-diffusion-cache300-last-tile-past-the-end": (300, 8, "block_causal", 128, (4, 2)),
    "ar-step-cache130-gqa7": (130, 1, "causal", 128, (14, 2)),
    "fused-window-cache256-mqa": (256, 16, "block_causal", 128, (8, 1)),
}


@pytest.mark.parametrize("name", CASES)
def test_a_cache_read_in_place_matches_the_reference_over_the_concatenation(name):
  cache, window, kind, tile, heads = CASES[name]
  q, k, v, spec, prefix = cache_prefix_window(cache, window, kind, heads=heads)
  out = np.asarray(jax.jit(functools.partial(tpu_decode.attend_prefixed, spec=spec, block_k=tile))(q, k, v,
                                                                                                  prefix=prefix))
  rows = assert_reads_the_prefix_layer(out, q, k, v, spec, prefix)
  np.testing.assert_array_equal(out[~rows], 0)  # an invalid query row: 0 here, a uniform average in the reference


def test_stale_slots_get_no_weight_at_all():
  """Slots past a row's end (stale: masked by the spec) poisoned, NaN keys and huge values: their weights are
  exactly 0, in a last tile that runs past the cache too."""
  q, k, v, spec, prefix = cache_prefix_window(300, 8, "block_causal")
  stale = jnp.asarray(np.asarray(spec.kv_seg[:, :300]) == 0)[None, :, :, None, None]
  poisoned = prefix._replace(keys=jnp.where(stale, jnp.nan, prefix.keys), values=jnp.where(stale, 1e30, prefix.values))
  out = np.asarray(tpu_decode.attend_prefixed(q, k, v, spec, poisoned, block_k=256))
  ref = np.asarray(attend_dense(q, *prefix.joined(k, v), spec))
  rows = np.asarray(spec.dense().any(-1))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[rows], ref[rows], atol=1e-5, rtol=0)


def test_bf16_matches_the_reference():
  q, k, v, spec, prefix = cache_prefix_window(200, 8, "block_causal", dtype=jnp.bfloat16, head_dim=128)
  out = tpu_decode.attend_prefixed(q, k, v, spec, prefix, block_k=128)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref = attend_dense(f32(q), *(f32(x) for x in prefix.joined(k, v)), spec)
  rows = np.asarray(spec.dense().any(-1))
  assert np.abs(np.asarray(out, np.float32) - np.asarray(ref))[rows].max() <= 3e-2


def test_cache_tiles_are_whole_lane_multiples_or_the_whole_cache():
  assert tpu_decode.cache_tile(300) == 300 and tpu_decode.cache_tile(4104) == 512
  assert tpu_decode.cache_tile(4104, 384) == 384
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu_decode.cache_tile(4104, 100)


def test_refuses_what_it_would_run_badly_on_a_tpu(monkeypatch):
  """A head dim off the 128 lanes would relayout the whole stacked cache at every call on a TPU (seen compiled for
  a v5e at head_dim 64), so there it hands the step to the dense path; interpreted it runs any."""
  q, k, v, spec, _ = cache_prefix_window(40, 8, "block_causal", head_dim=64)
  assert tpu_decode.unsupported(q, k, v, spec) is None
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert "head_dim 64" in tpu_decode.unsupported(q, k, v, spec)
  assert tpu_decode.unsupported(*(jnp.zeros((2, 8, 2, 128), jnp.float16),) * 3, spec) is not None
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "pallas_gpu" in tpu_decode.unsupported(q, k, v, spec)


def test_lowers_to_mosaic_for_a_tpu():
  """The Mosaic lowering (block shapes whose last two dims are whole or (8, 128)-tiled, scalar-prefetched layer
  and tile counts) runs without a TPU: bf16, GQA 7:1, a last tile past the cache."""
  q, k, v, spec, prefix = cache_prefix_window(300, 8, "block_causal", heads=(14, 2), head_dim=128,
                                              dtype=jnp.bfloat16)
  run = functools.partial(tpu_decode.attend_prefixed, spec=spec, block_k=128, interpret=False)
  with targeting("TPU v5 lite", "tpu"):
    lowered = jax.jit(run).trace(q, k, v, prefix=prefix).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 1
