"""Chunked cross entropy: the same values and gradients as all logits at once, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvl_jax.diffusion.token_ce import token_cross_entropy


def _problem(n=37, width=16, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(2, n, width)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(width, vocab)) / 4, jnp.float32)
  labels = rng.integers(0, vocab, (2, n))
  labels[0, :5] = -100
  labels[1, 30:] = -100
  scale = jnp.asarray(rng.uniform(0.5, 2.0, (2, n)), jnp.float32)  # like BD3's 1/t weights
  return hidden, weight, jnp.asarray(labels), scale


def _weighted_loss(chunk):
  def loss(hidden, weight, labels, scale):
    return (token_cross_entropy(lambda h: h @ weight, hidden, labels, chunk) * scale).sum()
  return loss


def test_values_match_numpy_cross_entropy():
  hidden, weight, labels, _ = _problem()
  logits = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  lab = np.asarray(labels)
  expected = np.where(lab != -100, -np.take_along_axis(logp, np.maximum(lab, 0)[..., None], -1)[..., 0], 0.0)
  for chunk in (0, 8, 10, 37, 64):
    np.testing.assert_allclose(np.asarray(token_cross_entropy(lambda h: h @ weight, hidden, labels, chunk)),
                               expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [8, 10])
def test_gradients_match_all_at_once(chunk):
  args = _problem()
  dense = jax.grad(_weighted_loss(0), argnums=(0, 1))(*args)
  chunked = jax.jit(jax.grad(_weighted_loss(chunk), argnums=(0, 1)))(*args)
  for d, c in zip(dense, chunked):
    np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=1e-5, atol=1e-6)


def test_chunks_keep_only_a_chunk_of_logits_alive():
  """XLA's own buffer accounting of the compiled gradient: the full `[B, n, V]` logits and their
  gradient no longer fit in the chunked program's temporaries."""
  args = _problem(n=256, width=16, vocab=4096)
  full_logits = 2 * 256 * 4096 * 4

  def temp_bytes(chunk):
    compiled = jax.jit(jax.grad(_weighted_loss(chunk), argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(0) >= 2 * full_logits
  assert temp_bytes(32) <= full_logits / 2
