"""Mask functions against the spec's worked examples (§5.4, §12) and the dense reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from dvl_jax.attention import masks
from dvl_jax.attention.reference import attend_dense
from dvl_jax.attention.spec import AttentionSpec

SPEC_BD3_L4_BS2 = np.array([  # spec §5.4: rows x_t^0..3, x_0^0..3
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 1],
], bool)


def test_bd3_training_mask_matches_spec_example():
  idx = np.arange(8)
  got = masks.allowed("bd3_train", idx[:, None], idx[None, :], block_size=2, half_len=4)
  np.testing.assert_array_equal(got, SPEC_BD3_L4_BS2)


def test_block_causal_prefill_matches_spec_example():
  idx = np.arange(4)
  got = masks.allowed("block_causal", idx[:, None], idx[None, :], block_size=2)
  np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])


def test_padding_is_never_attended_and_padded_rows_stay_finite():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
  seg = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2])
  out = attend_dense(q, k, v, AttentionSpec.self_attention(seg, kind="full"))
  assert np.isfinite(np.asarray(out)).all()
  # Changing padded keys/values does not change real rows.
  v2 = v.at[1, 4:].set(100.0)
  out2 = attend_dense(q, k, v2, AttentionSpec.self_attention(seg, kind="full"))
  np.testing.assert_allclose(np.asarray(out2[1, :4]), np.asarray(out[1, :4]), atol=1e-6)


def test_block_kinds_without_a_block_size_raise_instead_of_becoming_another_mask():
  valid = jnp.ones((1, 8), jnp.int32)
  for kind in masks.BLOCK_KINDS:
    with pytest.raises(ValueError, match="needs block_size"):
      AttentionSpec.self_attention(valid, kind=kind)
  block = AttentionSpec.self_attention(valid, kind="block_causal", block_size=4).dense()[0]
  causal = AttentionSpec.self_attention(valid, kind="causal").dense()[0]
  np.testing.assert_array_equal(np.asarray(block), np.arange(8)[None, :] // 4 <= np.arange(8)[:, None] // 4)
  assert not np.array_equal(np.asarray(block), np.asarray(causal))
