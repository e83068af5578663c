"""`generate(..., on_block=...)`: the same tokens as without it, pieces that rebuild each row's output in order,
one extra compile that any callback reuses, and the same pieces on a mesh."""

import functools

import numpy as np
import pytest

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_model
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import shard_model

CFG = tiny_config()
BS, GEN = CFG.block_size, 20
PROMPTS = Prompts.from_lists([[int(t) for t in np.random.default_rng(n).integers(3, 200, n)] for n in (3, 13, 8)])
SETTINGS = {"fused": SamplingConfig(gen_length=GEN, steps=4),
            "reference": SamplingConfig(gen_length=GEN, steps=4, mode="reference"),
            "autoregressive": SamplingConfig(gen_length=GEN, algorithm="autoregressive")}


@functools.cache
def model():
  """Confidences spread over (0, 1) (scaled lm_head); EOS swapped with a token row 1 decodes mid-output, so
  that row stops early while the others run on."""
  m = tiny_model(CFG, logit_scale=40.0)
  token = int(sampler.generate(m, PROMPTS, SETTINGS["fused"]).tokens[1, 9])
  kernel = m.lm_head.kernel[...]
  m.lm_head.kernel[...] = kernel.at[:, [CFG.eos_token_id, token]].set(kernel[:, [token, CFG.eos_token_id]])
  return m


def streamed(m, config):
  pieces = {}
  out = sampler.generate(m, PROMPTS, config, on_block=lambda row, tokens: pieces.setdefault(row, []).append(tokens))
  return out, pieces


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pieces_rebuild_the_tokens_and_change_nothing(setting):
  config = SETTINGS[setting]
  want = sampler.generate(model(), PROMPTS, config)
  out, pieces = streamed(model(), config)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  np.testing.assert_array_equal(out.nfe, want.nfe)
  assert out.lengths.min() < GEN and out.lengths.max() == GEN  # a row stopped at EOS, another ran to the end
  rest = CFG.pad_token_id if setting == "autoregressive" else CFG.mask_token_id
  for row, row_pieces in sorted(pieces.items()):
    assert all(0 < len(p) <= BS for p in row_pieces)
    tokens = np.concatenate(row_pieces)
    assert out.lengths[row] <= len(tokens)  # through EOS (block diffusion: the rest of its block too)
    np.testing.assert_array_equal(tokens, out.tokens[row, :len(tokens)])
    assert (out.tokens[row, len(tokens):] == rest).all()
  assert sorted(pieces) == [0, 1, 2]


def test_one_streaming_compile_serves_every_callback_and_the_default_path_keeps_its_own():
  config = SETTINGS["fused"]
  sampler.generate(model(), PROMPTS, config)
  before = dict(sampler.TRACES)
  streamed(model(), config)
  after_first = dict(sampler.TRACES)
  streamed(model(), config)
  sampler.generate(model(), PROMPTS, config)
  assert sampler.TRACES == after_first
  assert after_first["block_diffusion"] == before["block_diffusion"]
  assert after_first["block_diffusion_streaming"] - before.get("block_diffusion_streaming", 0) <= 1


def test_pieces_on_a_mesh_equal_one_device():
  sharded = shard_model(model(), make_mesh((4, 1, 2)))
  config = SETTINGS["fused"]
  out, pieces = streamed(sharded, config)
  want, want_pieces = streamed(model(), config)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  assert {r: np.concatenate(p).tolist() for r, p in pieces.items()} == {
      r: np.concatenate(p).tolist() for r, p in want_pieces.items()}
