"""The confidence of a sampled token (spec §6.5, §7.5): DiffusionVL-QwenVL takes its probability under the
temperature / top-k / top-p distribution it was drawn from, DiffusionVL-Qwen under the unmodified softmax of the
logits. The family picks it (`SamplingConfig.resolve`); the tokens drawn do not depend on it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvl_jax.diffusion import remask
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.testing.tiny import tiny_config, tiny_siglip_config

# (temperature, top_k, top_p) per row: greedy, temperature alone, each filter, both
ROWS = [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.6), (1.6, 8, 0.9)]
LOGITS = np.random.default_rng(3).normal(size=(len(ROWS), 7, 40)).astype(np.float32) * 3
KEYS = jax.random.split(jax.random.key(11), len(ROWS))


def _propose(confidence):
  t, k, p = (np.array(v, dtype) for v, dtype in zip(zip(*ROWS), (np.float32, np.int32, np.float32)))
  run = jax.jit(functools.partial(remask.propose, temperature=t, top_k=k, top_p=p, confidence=confidence))
  return (np.asarray(x) for x in run(jnp.asarray(LOGITS), KEYS))


def _softmax(logits):
  """NumPy, in float64: the unmodified distribution of every position."""
  z = logits.astype(np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_softmax_confidence_is_the_unmodified_probability_of_the_same_tokens():
  tokens, sampled = _propose("sampled")
  same_tokens, plain = _propose("softmax")
  np.testing.assert_array_equal(same_tokens, tokens)  # the draw is the same; only its confidence differs
  want = np.take_along_axis(_softmax(LOGITS), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(plain, want, rtol=1e-5)
  np.testing.assert_array_equal(plain[0], sampled[0])  # a greedy row: softmax of the argmax either way
  assert not np.allclose(plain[1:], sampled[1:], rtol=1e-3)  # a modified distribution is another probability


def test_the_family_picks_the_confidence():
  assert SamplingConfig(temperature=0.5).resolve(tiny_config()).confidence == "sampled"  # DiffusionVL-QwenVL
  assert SamplingConfig(temperature=0.5).resolve(tiny_siglip_config()).confidence == "softmax"  # DiffusionVL-Qwen
  assert SamplingConfig(confidence="sampled").resolve(tiny_siglip_config()).confidence == "sampled"
  with pytest.raises(ValueError, match="unknown confidence 'prob'"):
    SamplingConfig(confidence="prob")
