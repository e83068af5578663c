"""The jitted block sampler against an independent restatement of spec §6 (written here, not imported).

The oracle is a plain Python loop over blocks and steps in NumPy. It keeps no KV cache: every pass
re-runs the whole model over `[prompt ; blocks so far]` with a block-causal mask (dense reference
attention), which is what the cached prefill / denoise / commit passes compute. Like the sampler it
tracks masked positions with a boolean array (the documented fix of spec §6.7 quirk 1).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion import remask, sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.core.vision_layout import vision_layout
from dvl_jax.testing.tiny import tiny_model, tiny_siglip_config

CFG = tiny_config()
BS, MASK, EOS = CFG.block_size, CFG.mask_token_id, CFG.eos_token_id
ORACLE_LEN = 64  # every oracle pass runs over this many positions (later ones are masked out)


@pytest.fixture(scope="module")
def model():
  """Weights with a visible spread and a sharp lm_head, so confidences cover (0, 1) (dynamic/threshold)."""
  return tiny_model(CFG, spread=True)


def words(n: int, seed: int) -> list[int]:
  return [int(t) for t in np.random.default_rng(seed).integers(3, 200, n)]


# ---- the oracle (spec §6.8, cache-free) ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _pass(graphdef):

  @jax.jit
  def run(state, ids, prompt_emb, plen, end):
    m = nnx.merge(graphdef, state)
    idx = jnp.arange(ORACLE_LEN)
    x = jnp.where((idx < plen)[None, :, None], prompt_emb, m.embed(ids))
    spec = AttentionSpec.self_attention((idx < end)[None], kind="block_causal", block_size=BS)
    hidden, _ = m.decode(x, idx[None], spec)
    return m.logits(hidden)[0]

  return run


def oracle(model, prompt, gen, steps, strategy="low_confidence_static", tau=0.85, pixels=None, grid=None,
           ablation="block_size"):
  """Returns (tokens [gen], forwards incl. prefill, decoded blocks, forward index of each token); `ablation`
  "gen_length": a one-block answer unmasks `gen` tokens over the steps instead of `BS` (spec §6.7 quirk 3)."""
  graphdef, state = nnx.split(model)
  p = len(prompt)
  nblk, total = (1, p + gen) if BS >= p + gen else (-(-(p + gen) // BS), -(-(p + gen) // BS) * BS)
  ids = np.full(ORACLE_LEN, MASK, np.int64)
  ids[:p] = prompt
  feats = None if pixels is None else model.image_features(jnp.asarray(pixels), vision_layout(grid, CFG.vision))
  prompt_emb = model.embed(jnp.asarray(ids)[None], feats)
  todo = np.arange(ORACLE_LEN) >= p
  todo[total:] = False
  n = gen if ablation == "gen_length" and nblk == 1 and BS >= p + gen else BS
  sched = [n // steps + (i < n % steps) for i in range(steps)] + [n // steps]
  forwards, passes, blocks = int(p // BS > 0), 0, 0
  decoded_at = np.full(ORACLE_LEN, -1)
  for blk in range(p // BS, nblk):
    s, e = blk * BS, min(blk * BS + BS, total)
    blocks += 1
    for step in itertools.count():
      if strategy != "threshold" and step > steps:
        break
      forwards, passes = forwards + 1, passes + 1
      if not todo[s:e].any():
        break  # the commit pass: without a cache its output is not needed
      logits = np.asarray(_pass(graphdef)(state, jnp.asarray(ids)[None], prompt_emb, p, e), np.float64)[s:e]
      x0 = logits.argmax(-1)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      p0 = (probs / probs.sum(-1, keepdims=True))[np.arange(e - s), x0]
      conf = np.where(todo[s:e], p0, -np.inf)
      order = np.argsort(-conf, kind="stable")  # descending, ties: lowest index first
      k = min(sched[min(step, steps)], int(todo[s:e].sum()))
      high = np.flatnonzero(conf > tau)
      if strategy == "low_confidence_static":
        pick = order[:k]
      elif strategy == "low_confidence_dynamic":
        pick = high if len(high) >= sched[step] else order[:k]
      else:
        pick = np.union1d(high, order[:1])
      ids[s + pick], todo[s + pick], decoded_at[s + pick] = x0[pick], False, passes - 1
    if s + BS > p and EOS in ids[max(p, s):s + BS]:
      break
  return ids[p:p + gen], forwards, blocks, decoded_at[p:p + gen]


def run(model, prompts, gen, steps=8, strategy="low_confidence_static", tau=0.85, mode="reference", **kw):
  config = SamplingConfig(gen_length=gen, steps=steps, remasking_strategy=strategy, confidence_threshold=tau,
                          mode=mode)
  return sampler.generate(model, prompts if isinstance(prompts, Prompts) else Prompts.from_lists(prompts),
                          config, **kw)


def check_against_oracle(model, prompts, gen, steps=8, strategy="low_confidence_static", tau=0.85,
                         modes=("reference", "fused"), **images):
  """Each row of a batch (reference and fused) against the oracle run on that prompt alone."""
  want = [oracle(model, p, gen, steps, strategy, tau, images.get("pixel_values"), images.get("image_grid_thw"))
          for p in prompts]
  batch = Prompts.from_lists(prompts, **images)
  outs = {mode: run(model, batch, gen, steps, strategy, tau, mode=mode) for mode in modes}
  for i, (tokens, forwards, blocks, decoded_at) in enumerate(want):
    for mode, out in outs.items():
      np.testing.assert_array_equal(out.tokens[i], tokens, err_msg=f"{mode} row {i}")
      if mode == "reference" or len(prompts) == 1:  # fused alone: one forward fewer per block
        assert out.nfe[i] == (forwards if mode == "reference" else forwards - blocks), (mode, i)
      else:  # in a batch, a row's commit is fused, or alone when few rows commit in that forward
        assert forwards - blocks <= out.nfe[i] <= forwards, (mode, i)
    if "reference" in outs:
      np.testing.assert_array_equal(outs["reference"].steps_per_token[i], decoded_at)
  return want, outs


PROMPT_LENGTHS = (16, 13, 5, 8)  # whole prompt blocks only, partial ones, shorter than a block


# ---- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, gen, lengths", [
    (8, 24, PROMPT_LENGTHS),
    (4, 21, PROMPT_LENGTHS),  # gen length not a multiple of 8
    (3, 21, PROMPT_LENGTHS),
    (2, 21, PROMPT_LENGTHS),
    (16, 21, PROMPT_LENGTHS),  # steps > block size: schedule [1]*8 + [0]*9
    (3, 5, (2, 13, 16, 3)),  # bs >= P + G for rows 0 and 3: the one-block "full diffusion" case
])
def test_static_matches_oracle(model, steps, gen, lengths):
  check_against_oracle(model, [words(n, n) for n in lengths], gen, steps)


@pytest.mark.parametrize("strategy, tau, steps", [
    ("low_confidence_dynamic", 0.85, 8),
    ("low_confidence_dynamic", 0.3, 4),
    ("threshold", 0.9, 8),
    ("threshold", 0.5, 8),
])
def test_dynamic_and_threshold_match_oracle(model, strategy, tau, steps):
  prompts = [words(n, 100 + n) for n in PROMPT_LENGTHS]
  want, outs = check_against_oracle(model, prompts, 21, steps, strategy, tau)
  assert all((tokens != MASK).all() for tokens, *_ in want)
  static = [oracle(model, p, 21, steps)[1] for p in prompts]
  assert all(w[1] <= s for w, s in zip(want, static))  # confident positions go early, never later
  if tau < 0.6:
    assert sum(w[1] for w in want) < sum(static)
    assert (outs["fused"].tokens_per_forward > 1).all()


@pytest.mark.parametrize("mode", ["reference", "fused"])
def test_a_per_layer_model_matches_the_oracle(model, mode):
  """The same weights per layer (`scan_layers=False`, read in place in the loop) decode the oracle's tokens."""
  per_layer = tiny_model(CFG.replace(scan_layers=False), spread=True)
  prompts = [words(n, 200 + n) for n in PROMPT_LENGTHS]
  out = run(per_layer, prompts, 21, 8, "low_confidence_dynamic", mode=mode)
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(out.tokens[i], oracle(model, p, 21, 8, "low_confidence_dynamic")[0])


def test_image_prompt_matches_oracle(model):
  grid = np.array([[1, 4, 8]])
  image = [CFG.vision_start_token_id] + [CFG.image_token_id] * 8 + [CFG.vision_end_token_id]
  prompt = words(5, 1) + image + words(4, 2)
  pixels = np.random.default_rng(3).normal(size=(32, CFG.vision.patch_dim)).astype(np.float32)
  check_against_oracle(model, [prompt], 16, 4, modes=("fused",), pixel_values=pixels, image_grid_thw=grid)


# ---- batches, EOS ---------------------------------------------------------------------------------

def test_batch_rows_equal_running_alone(model):
  prompts = [words(n, 100 + n) for n in PROMPT_LENGTHS]
  args = (21, 4, "low_confidence_dynamic", 0.3)
  batch = run(model, prompts, *args, mode="fused")
  for i, prompt in enumerate(prompts):
    alone = run(model, [prompt], *args, mode="fused")
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    np.testing.assert_array_equal(batch.steps_per_token[i], alone.steps_per_token[0])
    assert batch.nfe[i] == alone.nfe[0]
  prefilled = np.array(PROMPT_LENGTHS) >= BS
  assert batch.forwards == 1 + (batch.nfe - prefilled).max()  # one prefill, then rows side by side


def eos_model(model, prompt, gen):
  """The model with the output columns of EOS and of one generated token swapped, chosen so that EOS
  now lands in the middle of a block that is not the last: decoding must stop there."""
  base, *_ = oracle(model, prompt, gen, 8)
  for token in dict.fromkeys(base.tolist()):
    swapped = nnx.clone(model)
    kernel = swapped.lm_head.kernel[...]
    swapped.lm_head.kernel[...] = kernel.at[:, [EOS, token]].set(kernel[:, [token, EOS]])
    out, *_ = oracle(swapped, prompt, gen, 8)
    first = int(np.argmax(out == EOS)) if EOS in out else gen
    if first < gen - BS and (len(prompt) + first) % BS not in (0, BS - 1):
      return swapped, first
  raise AssertionError("no token makes a mid-block EOS")


def test_eos_stops_rows_after_their_block(model):
  prompts = [words(n, n) for n in PROMPT_LENGTHS]
  swapped, first = eos_model(model, prompts[1], 24)
  want, outs = check_against_oracle(swapped, prompts, 24)
  block_end = (13 + first) // BS * BS + BS - 13
  out = outs["fused"]
  assert out.lengths[1] == first + 1
  assert (out.tokens[1, block_end:] == MASK).all() and (out.tokens[1, :block_end] != MASK).all()  # post-EOS kept
  assert (out.steps_per_token[1, block_end:] == -1).all()
  assert not (out.tokens == MASK).any(-1).all()  # per-row EOS: other rows ran on


# ---- compilation, cache, sampling -----------------------------------------------------------------

def test_prompt_lengths_in_a_bucket_do_not_recompile_and_the_cache_is_reused(model):
  config = SamplingConfig(gen_length=12, steps=2)
  before = sampler.TRACES["block_diffusion"]
  out = None
  for lengths in ((5, 40), (13, 2), (64, 31)):
    previous = out
    out = sampler.generate(model, Prompts.from_lists([words(n, n) for n in lengths]), config,
                           cache=None if out is None else out.cache)
    assert previous is None or previous.cache[0].is_deleted()  # donated, updated in place
  with pytest.raises(ValueError, match="cache was donated to an earlier call and is gone: pass the .cache of the "):
    sampler.generate(model, Prompts.from_lists([words(5, 5), words(40, 40)]), config, cache=previous.cache)
  for steps, tau in ((5, 0.9), (16, 0.1)):  # the schedule and threshold are arrays, not compile keys
    sampler.generate(model, Prompts.from_lists([words(7, 1), words(9, 2)]),
                     dataclasses.replace(config, steps=steps, confidence_threshold=tau))
  assert sampler.TRACES["block_diffusion"] - before == 1
  sampler.generate(model, Prompts.from_lists([words(65, 1), words(3, 1)]), config)  # the next bucket
  assert sampler.TRACES["block_diffusion"] - before == 2
  with pytest.raises(ValueError, match="cache has shape"):
    sampler.generate(model, Prompts.from_lists([words(9, 4)]), config, cache=out.cache)


def test_sampling_rows_equal_running_alone(model):
  prompts = [words(n, n) for n in (6, 12, 19)]
  keys = jax.random.split(jax.random.key(5), 3)
  config = SamplingConfig(gen_length=16, temperature=0.8, top_k=20, top_p=0.9)
  batch = sampler.generate(model, Prompts.from_lists(prompts), config, rng=keys)
  for i, prompt in enumerate(prompts):
    alone = sampler.generate(model, Prompts.from_lists([prompt]), config, rng=keys[i:i + 1])
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
  other = sampler.generate(model, Prompts.from_lists(prompts), config, rng=jax.random.key(6))
  assert not np.array_equal(batch.tokens, other.tokens)


def test_propose_uses_the_modified_distribution():
  """top-k / top-p / temperature restated in NumPy: samples stay in the kept set, the confidence is
  their probability under the modified distribution, and frequencies follow it."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(1, 1, 12)).astype(np.float32) * 2
  temperature, top_k, top_p = 0.7, 6, 0.8
  z = logits[0, 0] / temperature
  z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  order = np.argsort(-z)
  cum = np.cumsum(np.exp(z[order] - z.max()) / np.exp(z - z.max()).sum())
  keep = np.zeros(12, bool)
  keep[order[np.concatenate([[True], cum[:-1] <= top_p])]] = True
  q = np.where(keep, np.exp(z - z.max()), 0)
  q /= q.sum()
  keys = jax.random.split(jax.random.key(1), 3000)
  x0, p0 = jax.vmap(lambda k: remask.propose(jnp.asarray(logits), k[None], temperature=temperature, top_k=top_k,
                                             top_p=top_p))(keys)
  x0, p0 = np.asarray(x0).ravel(), np.asarray(p0).ravel()
  assert keep[x0].all()
  np.testing.assert_allclose(p0, q[x0], rtol=1e-5)
  np.testing.assert_allclose(np.bincount(x0, minlength=12) / len(x0), q, atol=0.03)


def test_select_rules():
  conf = jnp.array([[0.5, 0.9, 0.5, 0.95, 0.2, 0.9]])
  masked = jnp.array([[True, True, True, False, True, True]])

  def pick(strategy, k, tau=0.85):
    return np.flatnonzero(remask.select(conf, masked, jnp.array([k]), strategy=strategy, threshold=tau)[0])

  np.testing.assert_array_equal(pick("low_confidence_static", 3), [0, 1, 5])  # ties: lowest index first
  np.testing.assert_array_equal(pick("low_confidence_static", 9), [0, 1, 2, 4, 5])  # min(k, #masked)
  np.testing.assert_array_equal(pick("low_confidence_dynamic", 2), [1, 5])  # 2 above tau: all of them
  np.testing.assert_array_equal(pick("low_confidence_dynamic", 3), [0, 1, 5])  # too few: static top-3
  np.testing.assert_array_equal(pick("low_confidence_dynamic", 0), [1, 5])
  np.testing.assert_array_equal(pick("low_confidence_dynamic", 1, 0.5), [1, 5])  # strict >: 0.5 is not above
  np.testing.assert_array_equal(pick("threshold", 0, 0.5), [1, 5])
  np.testing.assert_array_equal(pick("threshold", 0, 0.95), [1])  # none above: the most confident one
  np.testing.assert_array_equal(pick("threshold", 0, 0.4), [0, 1, 2, 5])


@pytest.mark.parametrize("steps, want", [(8, [1] * 9), (4, [2] * 5), (3, [3, 3, 2, 2]), (16, [1] * 8 + [0] * 9)])
def test_transfer_schedule_vectors(steps, want):
  assert list(remask.num_transfer(8, steps)) == want  # spec §12


def test_one_block_answers_count_the_schedule_over_gen_length_when_asked(model):
  """Spec §6.7 quirk 3 / §7.5: DiffusionVL-Qwen unmasks a one-block answer with `num_transfer(gen_length, steps)`
  (5 tokens over 3 steps: 2, 2, 1) where DiffusionVL-QwenVL uses `num_transfer(bs, steps)` (3, 3, 2)."""
  prompts = [words(n, 300 + n) for n in (2, 13, 3)]  # rows 0 and 2: P + 5 <= 8, one block; row 1: several blocks
  config = SamplingConfig(gen_length=5, steps=3, mode="reference", ablation_schedule="gen_length")
  out = sampler.generate(model, Prompts.from_lists(prompts), config)
  for i, prompt in enumerate(prompts):
    tokens, forwards, _, decoded_at = oracle(model, prompt, 5, 3, ablation="gen_length")
    np.testing.assert_array_equal(out.tokens[i], tokens)
    np.testing.assert_array_equal(out.steps_per_token[i], decoded_at)
    assert out.nfe[i] == forwards
  block = sampler.generate(model, Prompts.from_lists(prompts), dataclasses.replace(config, ablation_schedule=None))
  assert (out.nfe[[0, 2]] > block.nfe[[0, 2]]).all()  # fewer tokens per pass: more passes
  np.testing.assert_array_equal(out.steps_per_token[1], block.steps_per_token[1])  # other rows: unchanged
  assert SamplingConfig().resolve(CFG).ablation_schedule == "block_size"  # the family picks: Qwen2.5-VL
  assert SamplingConfig().resolve(tiny_siglip_config()).ablation_schedule == "gen_length"  # DiffusionVL-Qwen


def test_fused_commits_go_alone_when_few_rows_commit(model):
  """Rows in different phases: at `fused_window_share` 0 every commit is fused (each row's NFE as alone). Without
  packing, at 0.5 and 1 the commits of a minority run alone (one forward more for those rows, and a narrower
  window for the others). With it (`packed_commit_share` 0.25: here one row of three), a single row's commit is
  fused in a packed forward, so 0.5 decodes as alone too (`test_sharded_sampling` shows packing at 1: fewer
  forwards than without). The tokens are the same."""
  prompts = Prompts.from_lists([words(n, n) for n in (6, 12, 19)])
  config = SamplingConfig(gen_length=24, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.6)
  outs = {(share, packs): sampler.generate(model, prompts, dataclasses.replace(
              config, fused_window_share=share, packed_commit_share=packs))
          for share, packs in ((0.0, 0), (0.5, 0), (1.0, 0), (0.5, 0.25))}
  for key, out in outs.items():
    np.testing.assert_array_equal(out.tokens, outs[0.0, 0].tokens, err_msg=f"share, packed rows {key}")
  for i in range(3):
    alone = sampler.generate(model, Prompts.from_lists([prompts.ids[i, :prompts.lengths[i]].tolist()]), config)
    assert outs[0.0, 0].nfe[i] == outs[0.5, 0.25].nfe[i] == alone.nfe[0]
  assert (outs[0.5, 0].nfe >= outs[0.0, 0].nfe).all() and outs[0.5, 0].nfe.sum() > outs[0.0, 0].nfe.sum()
  assert (outs[1.0, 0].nfe >= outs[0.5, 0].nfe).all()  # a commit fuses only when every active row commits


def test_sampled_tokens_do_not_depend_on_the_mode(model):
  """A position's randomness is keyed by its row's (block, denoising pass) and its place in the block, so
  reference and fused mode, and a fused batch whose commits go alone, fused or packed, draw the same samples."""
  prompts = Prompts.from_lists([words(n, n) for n in (6, 12, 19)])
  config = SamplingConfig(gen_length=16, temperature=0.8, top_k=20, remasking_strategy="low_confidence_dynamic",
                          confidence_threshold=0.6)
  keys = jax.random.split(jax.random.key(7), 3)
  runs = [sampler.generate(model, prompts, dataclasses.replace(config, **kw), rng=keys)
          for kw in ({"mode": "reference"}, {"fused_window_share": 0.0}, {}, {"packed_commit_share": 0.25})]
  for out in runs[1:]:
    np.testing.assert_array_equal(out.tokens, runs[0].tokens)
