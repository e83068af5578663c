"""The AR decoding path: token-for-token equal to transformers' greedy `generate` (M-RoPE), and to a
cache-free recomputation in flat mode; per-row lengths and EOS; sampling."""

import copy

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import dvl_jax as dvl
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion import sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import converted_checkpoint

CFG = tiny_config()
GEN = 12
MROPE = SamplingConfig(gen_length=GEN, algorithm="autoregressive", positions="mrope")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return converted_checkpoint(str(tmp_path_factory.mktemp("ar")), CFG, seed=11)


@pytest.fixture(scope="module")
def models(converted):
  hf, path = converted
  return hf, dvl.load(path)


def words(n, seed):
  return [int(t) for t in np.random.default_rng(seed).integers(3, 200, n)]


def image_prompt(grid, seed):
  return (words(3, seed) + [CFG.vision_start_token_id] + [CFG.image_token_id] * (int(np.prod(grid)) // 4)
          + [CFG.vision_end_token_id] + words(4, seed + 1))


def hf_greedy(hf, prompt, **images):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=GEN, do_sample=False, eos_token_id=CFG.eos_token_id,
                      pad_token_id=CFG.pad_token_id, **images)
  return out[0, len(prompt):].numpy()


def assert_same_greedy(ours, theirs):
  np.testing.assert_array_equal(ours[:len(theirs)], theirs)
  assert len(theirs) == GEN or theirs[-1] == CFG.eos_token_id
  assert (ours[len(theirs):] == CFG.pad_token_id).all()


def test_greedy_matches_transformers_generate(models):
  hf, model = models
  prompts = [words(n, n) for n in (5, 17, 9)]
  out = sampler.generate(model, Prompts.from_lists(prompts), MROPE)
  for i, prompt in enumerate(prompts):
    assert_same_greedy(out.tokens[i], hf_greedy(hf, prompt))
  assert (out.nfe == np.minimum(out.lengths, GEN)).all() and out.forwards == out.nfe.max()


def test_per_row_eos_matches_transformers_generate(models):
  """EOS and a token of the greedy output swap output columns in both models: rows stop at their EOS."""
  hf, model = models
  prompts = [words(n, n) for n in (5, 17, 9)]
  token = int(sampler.generate(model, Prompts.from_lists(prompts), MROPE).tokens[2, 3])
  hf_eos, eos_model = copy.deepcopy(hf), nnx.clone(model)
  with torch.no_grad():
    hf_eos.lm_head.weight[[CFG.eos_token_id, token]] = hf.lm_head.weight[[token, CFG.eos_token_id]]
  kernel = eos_model.lm_head.kernel[...]
  eos_model.lm_head.kernel[...] = kernel.at[:, [CFG.eos_token_id, token]].set(kernel[:, [token, CFG.eos_token_id]])
  out = sampler.generate(eos_model, Prompts.from_lists(prompts), MROPE)
  assert out.lengths[2] <= 4 and out.lengths.max() > out.lengths.min()
  for i, prompt in enumerate(prompts):
    assert_same_greedy(out.tokens[i], hf_greedy(hf_eos, prompt))
  assert (out.nfe == out.lengths).all() and out.forwards == out.lengths.max()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_with_an_image_matches_transformers_generate(models, converted, scan_layers):
  """Also loaded per layer (`scan_layers=False`: the stored stacks sliced at load, read in place in the loop)."""
  hf, model = models
  if not scan_layers:
    model = dvl.load(converted[1], scan_layers=False)
    assert isinstance(model.text.layers, nnx.List) and isinstance(model.visual.blocks, nnx.List)
  grid = np.array([[1, 4, 6]])
  prompt = image_prompt(grid[0], 3)
  pixels = np.random.default_rng(4).normal(size=(24, CFG.vision.patch_dim)).astype(np.float32)
  out = sampler.generate(model, Prompts.from_lists([prompt], pixel_values=pixels, image_grid_thw=grid),
                         MROPE)
  theirs = hf_greedy(hf, prompt, pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid))
  assert_same_greedy(out.tokens[0], theirs)


def test_flat_positions_match_cache_free_recomputation(models):
  _, model = models
  forward = jax.jit(lambda ids: model(ids, positions="flat"))  # causal: the padding after a prefix is unseen
  prompts = [words(n, 30 + n) for n in (4, 11)]
  out = sampler.generate(model, Prompts.from_lists(prompts),
                         SamplingConfig(gen_length=GEN, algorithm="autoregressive", positions="flat"))
  for i, prompt in enumerate(prompts):
    seq = np.zeros((1, 32), np.int32)
    seq[0, :len(prompt)] = prompt
    n = len(prompt)
    for n in range(len(prompt), len(prompt) + GEN):
      seq[0, n] = np.argmax(np.asarray(forward(seq))[0, n - 1])
      if seq[0, n] == CFG.eos_token_id:
        break
    assert_same_greedy(out.tokens[i], seq[0, len(prompt):n + 1])


def test_sampling_rows_equal_running_alone_and_top_k_1_is_greedy(models):
  _, model = models
  prompts = [words(n, 50 + n) for n in (6, 14)]
  keys = jax.random.split(jax.random.key(0), 2)
  config = SamplingConfig(gen_length=GEN, algorithm="autoregressive", temperature=1.3, top_p=0.95)
  batch = sampler.generate(model, Prompts.from_lists(prompts), config, rng=keys)
  for i, prompt in enumerate(prompts):
    alone = sampler.generate(model, Prompts.from_lists([prompt]), config, rng=keys[i:i + 1])
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
  one = SamplingConfig(gen_length=GEN, algorithm="autoregressive", temperature=1.3, top_k=1)
  greedy = SamplingConfig(gen_length=GEN, algorithm="autoregressive")
  np.testing.assert_array_equal(sampler.generate(model, Prompts.from_lists(prompts), one).tokens,
                                sampler.generate(model, Prompts.from_lists(prompts), greedy).tokens)
