"""The sampler's reused `nnx.split`: reused while the model is unchanged, redone after any change a user makes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.diffusion import sampler, split_cache
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_model

PROMPTS = Prompts.from_lists([[5, 9, 14, 3, 7, 11, 30, 4, 8, 2, 40], [6, 12, 19]])
GREEDY = SamplingConfig(gen_length=8, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.5)


def same_arrays(state, other) -> bool:
  return jax.tree.structure(state) == jax.tree.structure(other) and all(
      a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(other)))


def test_graph_reused_until_an_attribute_changes_and_the_state_always_current():
  model = tiny_model(spread=True)
  graph, state, placement = split_cache.split(model)
  again, state_again, placement_again = split_cache.split(model)
  assert again is graph and same_arrays(state_again, state)  # the graph walk is reused
  assert placement_again is placement and placement.mesh is None
  want_graph, want_state = nnx.split(model)
  assert graph.graphdef == want_graph and same_arrays(state, nnx.to_pure_dict(want_state))

  param = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Param))[0]
  old = param.get_raw_value()
  param.set_value(param.get_value() + 1.0)  # an optimizer step, in place
  same_graph, changed, _ = split_cache.split(model)
  assert same_graph is graph and same_arrays(changed, nnx.to_pure_dict(nnx.split(model)[1]))
  assert any(a is param.get_raw_value() for a in jax.tree.leaves(changed))
  assert not any(a is old for a in jax.tree.leaves(changed))
  cached = split_cache._SPLITS[model]
  assert not any(x is old for x in cached.reachable + list(cached))  # the replaced array is not held

  model.visual.rope_table_dtype = jnp.dtype(jnp.bfloat16)  # a static attribute: a new graphdef
  graph_bf16, _, _ = split_cache.split(model)
  assert graph_bf16 != graph and graph_bf16.graphdef == nnx.graphdef(model)


def test_static_graph_hashes_once_and_compares_by_value():
  model = tiny_model()
  a = split_cache.StaticGraph(nnx.graphdef(model))
  b = split_cache.StaticGraph(nnx.graphdef(tiny_model(seed=1)))
  assert a == b and hash(a) == hash(b)  # equal structure: one compiled program serves both
  assert {a: 1}[b] == 1


def test_generate_sees_every_change_to_the_model():
  """Tokens after in-place changes equal those of a fresh model with the same weights: nothing stale is reused."""
  model = tiny_model(spread=True)
  first = sampler.generate(model, PROMPTS, GREEDY).tokens
  np.testing.assert_array_equal(sampler.generate(model, PROMPTS, GREEDY).tokens, first)

  other = tiny_model(seed=3, spread=True)
  nnx.update(model, nnx.state(other))  # new arrays in the same Variables (a reloaded checkpoint)
  np.testing.assert_array_equal(sampler.generate(model, PROMPTS, GREEDY).tokens,
                                sampler.generate(other, PROMPTS, GREEDY).tokens)
  assert not np.array_equal(sampler.generate(model, PROMPTS, GREEDY).tokens, first)

  head = model.lm_head  # a replaced submodule (here: the lm_head of a third model)
  model.lm_head = tiny_model(seed=4, spread=True).lm_head
  replaced = sampler.generate(model, PROMPTS, GREEDY).tokens
  model.lm_head = head
  np.testing.assert_array_equal(sampler.generate(model, PROMPTS, GREEDY).tokens,
                                sampler.generate(other, PROMPTS, GREEDY).tokens)
  assert not np.array_equal(replaced, sampler.generate(other, PROMPTS, GREEDY).tokens)
