"""`layers.matmul`: on the backends that run a single row's product as two rows (GPU: XLA rewrites a vector x
matrix product into a slower elementwise product and reduction), the numbers stay those of the plain product."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import dvl_jax as dvl
from dvl_jax.diffusion.sampler import lower
from dvl_jax.models import layers
from dvl_jax.testing.tiny import tiny_model, tiny_text_config


def _dot_rows(fn, x) -> list[int]:
  """The row counts of the left operands of the `dot_general`s in `fn(x)`'s jaxpr."""
  eqns = jax.make_jaxpr(fn)(x).eqns
  return [int(np.prod(e.invars[0].aval.shape[:-1])) for e in eqns if e.primitive.name == "dot_general"]


def test_one_row_runs_as_two_only_where_asked_with_the_same_numbers(monkeypatch):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)
  one, three = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 1, 16), (1, 3, 16)))
  fn = lambda x: layers.matmul(x, w)  # noqa: E731
  plain = fn(one)
  assert _dot_rows(fn, one) == [1] and plain.shape == (1, 1, 24)
  monkeypatch.setattr(layers, "ONE_ROW_AS_TWO", (jax.default_backend(),))
  jax.clear_caches()  # traced again, under the setting
  assert _dot_rows(fn, one) == [2] and _dot_rows(fn, three) == [3]  # several rows: the plain product
  compiled = jax.jit(fn).lower(one).compile().as_text()  # the compiler keeps the two rows (no simplification)
  assert any("f32[2,24]" in line and " dot(" in line for line in compiled.splitlines()), compiled
  np.testing.assert_allclose(fn(one), plain, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(fn(three), three @ w)


def test_ar_decoding_at_batch_1_runs_as_batch_2_with_the_same_tokens(monkeypatch):
  """On those backends a batch-1 AR request decodes as batch 2 with a dead row (`ar_sampler.least_rows`): every
  product of the whole model (q / k / v / o, MLP, tied lm_head) has two rows, none is doubled apart."""
  model = tiny_model(tiny_text_config(), spread=True)
  prompt = dvl.Prompts.from_lists([[5, 9, 17, 3, 12, 40]])
  config = dvl.SamplingConfig(gen_length=8, algorithm="autoregressive")
  plain = dvl.generate(model, prompt, config)
  assert plain.cache[0].shape[1] == 1
  monkeypatch.setattr(layers, "ONE_ROW_AS_TWO", (jax.default_backend(),))
  jax.clear_caches()  # the sampler compiles again, under the setting
  padded = dvl.generate(model, prompt, config)
  assert padded.cache[0].shape[1] == 2 and padded.tokens.shape == plain.tokens.shape
  doubled = re.findall(r"optimization_barrier %[\w#]+ : tensor<2x\d+x", lower(model, prompt, config).as_text())
  assert not doubled  # no product doubled apart (`matmul`'s barrier over the two copies of its row)
  np.testing.assert_array_equal(padded.tokens, plain.tokens)
  np.testing.assert_array_equal(padded.nfe, plain.nfe)
  two = dvl.Prompts.from_lists([[5, 9, 17, 3, 12, 40], [7, 8]])
  assert dvl.generate(model, two, config).cache[0].shape[1] == 2  # two prompts: no dead row
