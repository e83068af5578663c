"""`compact_rows`: rows that finish leave the batch. The same tokens, per-row NFE and decoding steps as the
whole-batch loop, and its cache to fp32 rounding, for block diffusion (fused and reference, dynamic and
threshold), AR and sampling, while the program really runs the narrower loops."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from dvl_jax.diffusion import compaction, sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_model

FP32_AT_SCALE = 1e-5  # the model's fp32 parity tolerance, relative to the values' scale
# Prompts of different lengths (different first blocks) and a model whose confidences spread (dynamic and
# threshold rows fix different numbers of tokens): rows finish after different numbers of forwards.
PROMPTS = Prompts.from_lists([list(range(3, 3 + n)) for n in (5, 17, 9, 30, 2)])
SETTINGS = {
    "dynamic fused": dict(remasking_strategy="low_confidence_dynamic", confidence_threshold=0.5),
    "threshold reference": dict(mode="reference", remasking_strategy="threshold", confidence_threshold=0.6),
    "AR sampled": dict(algorithm="autoregressive", temperature=0.8, top_k=20),
}


@pytest.fixture(scope="module")
def model():
  return tiny_model(spread=True)


@pytest.mark.parametrize("name", SETTINGS)
def test_compacted_rows_decode_as_the_whole_batch_does(model, name):
  outs = [sampler.generate(model, PROMPTS, SamplingConfig(gen_length=24, compact_rows=compact, **SETTINGS[name]),
                           rng=jax.random.key(7)) for compact in (False, True)]
  whole, compact = outs
  np.testing.assert_array_equal(compact.tokens, whole.tokens)
  np.testing.assert_array_equal(compact.nfe, whole.nfe)
  np.testing.assert_array_equal(compact.steps_per_token, whole.steps_per_token)
  assert compact.forwards == whole.forwards
  for a, b in zip(compact.cache, whole.cache):  # a narrower batch rounds its last bits otherwise (other kernels)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=FP32_AT_SCALE * np.abs(b).max())
  if name != "AR sampled":  # AR rows all run gen_length forwards; these rows do not finish together
    assert len(set(whole.nfe.tolist())) > 1, whole.nfe


def test_the_program_decodes_at_each_narrower_width():
  """Batch 5 narrows to 3, 2 and 1 rows: K/V arrays `[layers, rows, ..., kv_heads, head_dim]` of those widths."""
  cfg, config = tiny_model().config, SamplingConfig(gen_length=16)
  t, slots = cfg.text, config.resolve(cfg).cache_len(PROMPTS.bucketed(config.resolve(cfg), cfg).ids.shape[1])

  def cache_rows(compact: bool) -> set[int]:
    hlo = sampler.lower(tiny_model(), PROMPTS, dataclasses.replace(config, compact_rows=compact)).as_text()
    pattern = rf"tensor<{t.num_layers}x(\d+)x{slots}x{t.num_kv_heads}x{t.head_dim}xf32>"
    return {int(rows) for rows in re.findall(pattern, hlo)}

  assert compaction.widths(5) == (5, 3, 2, 1) and compaction.widths(8) == (8, 4, 2, 1) and compaction.widths(1) == (1,)
  assert cache_rows(False) == {5} and cache_rows(True) == {5, 3, 2, 1}
  assert SamplingConfig().compact_rows is False  # opt-in: each width is one more copy of the loop to compile


def test_only_one_device_without_streaming_compacts():
  assert compaction.enabled(True, one_device=True, stream=False)
  assert not compaction.enabled(True, one_device=False, stream=False)
  assert not compaction.enabled(True, one_device=True, stream=True)
  assert not compaction.enabled(False, one_device=True, stream=False)
