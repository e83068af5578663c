"""Per-row sampling settings (`remask.propose` with arrays): in a batch mixing greedy and sampled rows with
different settings, every row gets bit for bit what it gets alone with its key (the serving engine relies on it)
and the tokens of the one-setting computation the sampler ran before; a greedy row is the argmax and its
probability; a greedy program compiles no sampling."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.diffusion import remask, sampler_common
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.diffusion.sampling_mesh import Placement

# (temperature, top_k, top_p) per row: greedy (its filters ignored), each filter alone, both, top-k 1, top-p 0
SETTINGS = [(0.0, 0, 1.0), (0.7, 0, 1.0), (0.9, 5, 1.0), (1.3, 40, 0.8), (1.0, 0, 0.5), (0.0, 3, 0.5),
            (2.0, 1, 1.0), (1.1, 0, 0.0), (0.5, 100, 0.9)]


def one_setting(logits, key, temperature, top_k, top_p):
  """One row `[1, n, V]` with Python-number settings, filtered the way the sampler did before settings were per
  row (`lax.top_k` for the k-th largest, each step skipped when it is a no-op). A filtered position whose kept tokens
  are among the 256 most likely is drawn by `categorical` over those 256 in descending order, any other over the
  vocabulary."""
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32), jnp.max(jax.nn.softmax(logits, -1), -1)
  if temperature != 1.0:
    logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    logits = remask._top_p(logits, top_p)
  descending, order = jax.lax.top_k(logits[0], min(remask.PARTIAL_TOP_K, logits.shape[-1]))
  among_candidates = jnp.take_along_axis(order, jax.random.categorical(key, descending, axis=-1)[:, None], -1)[:, 0]
  covered = (top_k > 0 or top_p < 1.0) & (jnp.sum(logits[0] > -jnp.inf, -1) <= remask.PARTIAL_TOP_K)
  x0 = jnp.where(covered, among_candidates, jax.random.categorical(key, logits[0], axis=-1))[None]
  return x0.astype(jnp.int32), jnp.take_along_axis(jax.nn.softmax(logits, -1), x0[..., None], -1)[..., 0]


LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(len(SETTINGS), 6, 64)).astype(np.float32) * 3)
KEYS = jax.random.split(jax.random.key(7), len(SETTINGS))
propose = jax.jit(remask.propose)


def settings(rows):
  """`propose`'s keyword arguments for (temperature, top_k, top_p) rows."""
  t, k, p = zip(*rows)
  return {"temperature": np.array(t, np.float32), "top_k": np.array(k, np.int32), "top_p": np.array(p, np.float32)}


def rows_as_alone_and_as_one_setting(logits: jax.Array, keys: jax.Array, rows: list) -> tuple[jax.Array, jax.Array]:
  """`propose` over a batch of `rows` settings, each row checked against itself alone and `one_setting`."""
  x0, p0 = propose(logits, keys, **settings(rows))
  for i, setting in enumerate(rows):
    alone_x, alone_p = propose(logits[i:i + 1], keys[i:i + 1], **settings([setting]))
    np.testing.assert_array_equal(x0[i], alone_x[0])  # bit for bit: what the serving engine promises
    np.testing.assert_array_equal(p0[i], alone_p[0])
    want_x, want_p = one_setting(logits[i:i + 1], keys[i], *setting)
    np.testing.assert_array_equal(x0[i], want_x[0])
    # compiled and fused differently (XLA contracts a constant temperature into the softmax): a few ulp apart
    np.testing.assert_allclose(p0[i], want_p[0], rtol=1e-6)
  return x0, p0


def test_each_row_samples_with_its_own_settings_as_it_would_alone():
  x0, p0 = rows_as_alone_and_as_one_setting(LOGITS, KEYS, SETTINGS)
  argmax = np.asarray(jnp.argmax(LOGITS, -1))
  sampled = settings(SETTINGS)["temperature"] > 0
  assert (np.asarray(x0)[sampled] != argmax[sampled]).any()  # the sampled rows did sample
  np.testing.assert_array_equal(x0[6], argmax[6])  # top-k 1 and top-p 0 keep only the argmax
  np.testing.assert_array_equal(x0[7], argmax[7])
  np.testing.assert_array_equal(p0[6], np.ones(6, np.float32))


def test_only_positions_whose_kept_tokens_lie_among_the_candidates_draw_over_them_alone():
  """Over 2,048 tokens, a filtered position draws among the 256 most likely only when its kept tokens all lie
  there (a peaked row under top-p, a top-k of 20); a flat row under top-p, a top-k whose k-th logit ties with
  thousands, or no filter at all draw over the vocabulary. Mixed in one batch, each row as alone. (At 512 to 1,024
  tokens XLA:CPU sums a row's probabilities in another order at another batch shape, before this change too: the
  confidences an ulp apart. At 2,048 and at the real 151,936 they agree bit for bit.)"""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(6, 3, 2048)).astype(np.float32) * np.array([8, 0.01, 1, 1, 2, 1], np.float32)[:, None, None]
  logits[3] = 0.0
  logits[3, :, :4] = 5.0  # top-k 8 keeps these 4 and the 2,044 tied at the 8th largest logit
  rows = [(0.8, 0, 0.9), (1.0, 0, 0.9), (0.7, 0, 1.0), (1.0, 8, 1.0), (0.9, 20, 1.0), (0.0, 0, 1.0)]
  keys = jax.random.split(jax.random.key(12), len(rows))
  x0, _ = rows_as_alone_and_as_one_setting(jnp.asarray(logits), keys, rows)
  kept = [np.asarray(remask._top_p(jnp.asarray(logits[0] / 0.8), 0.9)) > -np.inf,
          np.asarray(remask._top_p(jnp.asarray(logits[1]), 0.9)) > -np.inf]
  assert kept[0].sum(-1).max() <= remask.PARTIAL_TOP_K < kept[1].sum(-1).min()  # one covered, one not
  assert all(k[np.arange(3), x].all() for k, x in zip(kept, np.asarray(x0[:2])))


def test_a_greedy_row_is_the_argmax_and_its_probability():
  """Alone among greedy rows (the cheap branch) or among sampled ones, whatever its own top-k / top-p."""
  greedy_x, greedy_p = propose(LOGITS, KEYS, **settings([(0.0, k, p) for _, k, p in SETTINGS]))
  mixed_x, mixed_p = propose(LOGITS, KEYS, **settings(SETTINGS))
  t = settings(SETTINGS)["temperature"]
  probs = np.exp(LOGITS - LOGITS.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_array_equal(greedy_x, np.argmax(LOGITS, -1))
  np.testing.assert_allclose(greedy_p, probs.max(-1), rtol=1e-6)
  np.testing.assert_array_equal(mixed_x[t == 0], greedy_x[t == 0])
  np.testing.assert_array_equal(mixed_p[t == 0], greedy_p[t == 0])


def test_the_greedy_probability_is_the_softmax_at_the_argmax_bit_for_bit():
  """`greedy` skips normalising the vocabulary; in fp32 (the logits' dtype) its probability is still exactly
  `jax.nn.softmax`'s, sharp and flat rows alike."""
  logits = jax.random.normal(jax.random.key(3), (4, 6, 999)) * jnp.array([0.1, 1.0, 8.0, 40.0])[:, None, None]
  x0, p0 = jax.jit(remask.greedy)(logits)
  softmax = jax.jit(lambda l: jnp.take_along_axis(jax.nn.softmax(l, -1), jnp.argmax(l, -1)[..., None], -1))(logits)
  np.testing.assert_array_equal(x0, jnp.argmax(logits, -1))
  np.testing.assert_array_equal(p0, softmax[..., 0])


def test_the_greedy_token_is_the_first_largest_logit_on_chunked_vocabularies():
  """`greedy(chunked=True)` finds the argmax chunk by chunk (128 or the largest power of two dividing the
  vocabulary): still the first index of the largest logit (ties inside a chunk and across chunks, the maximum
  in the last chunk), and `jnp.argmax`'s answer for NaN, +inf and all -inf rows, whose probability is NaN."""
  for vocab in (640, 96, 97):
    logits = np.random.default_rng(vocab).normal(size=(9, vocab)).astype(np.float32)
    logits[0, [5, 9]] = 50  # a tie inside the first chunk
    logits[1, [vocab - 40, vocab - 1]] = 50  # the maximum in the last chunk, tied
    logits[2, [3, vocab - 3]] = 50  # a tie across chunks
    logits[3, 7] = np.nan
    logits[4, [11, 2]] = np.inf
    logits[5] = -np.inf
    logits[6, [4, vocab // 2]] = [np.nan, np.inf]
    for rows in (slice(0, 3), slice(0, 9)):  # finite rows only (the chunked path), and with the others
      x0, p0 = jax.jit(remask.greedy, static_argnums=1)(jnp.asarray(logits[rows]), True)
      np.testing.assert_array_equal(x0, jnp.argmax(jnp.asarray(logits[rows]), -1))
      np.testing.assert_array_equal(x0[:3], np.argmax(logits[:3], -1))
      np.testing.assert_array_equal(np.isnan(p0), [r in (3, 4, 5, 6) for r in range(9)[rows]])


def test_a_sampled_token_is_categoricals_draw_on_chunked_vocabularies():
  """With `chunked`, a sampled row's token (the argmax of its logits plus Gumbel noise, found chunk by chunk) is
  `jax.random.categorical`'s with the same key, and its confidence the softmax there; a NaN row sends the batch
  to `jnp.argmax`, whose answer it then gets."""
  logits = np.random.default_rng(9).normal(size=(3, 5, 640)).astype(np.float32) * 4
  logits[2, 1, 7] = np.nan
  keys = jax.random.split(jax.random.key(11), 3)
  sample = jax.jit(lambda x, k: remask.propose(x, k, temperature=np.float32(0.8), top_k=0, top_p=1.0, chunked=True))
  for rows in (slice(0, 2), slice(0, 3)):  # finite rows only (the chunked path), and with the NaN row
    z = jnp.asarray(logits[rows]) / np.float32(0.8)
    want = jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(keys[rows], z)
    x0, p0 = sample(jnp.asarray(logits[rows]), keys[rows])
    np.testing.assert_array_equal(x0, want)
    softmax = np.take_along_axis(np.asarray(jax.nn.softmax(z, -1)), np.asarray(want)[..., None], -1)[..., 0]
    np.testing.assert_allclose(p0[:2], softmax[:2], rtol=1e-6)
  assert x0[2, 1] == 7 and np.isnan(p0[2, 1])


def test_a_greedy_program_compiles_no_sampling():
  """No top-k (the filters' partial sort) in the decision a greedy sampler compiles, whereas a sampled one has it: the
  compile key keeps whether rows may sample, and the values themselves are arrays."""
  logits = jnp.zeros((2, 4, 32), jnp.float32)
  sampling = remask.Sampling.of(jax.random.split(jax.random.key(0), 2), 0.7, 3, 0.9)
  hlo = lambda config: jax.jit(sampler_common.propose, static_argnums=(0, 4)).lower(
      sampler_common.compile_key(config), logits, sampling, jnp.zeros(2, jnp.int32), Placement()).as_text()
  assert "top_k" not in hlo(SamplingConfig())
  assert "top_k" in hlo(SamplingConfig(temperature=0.5))
  assert sampler_common.compile_key(SamplingConfig(temperature=0.5, top_k=3, top_p=0.9)) == \
      sampler_common.compile_key(SamplingConfig(temperature=1.5))


def _top_p_oracle(logits: np.ndarray, top_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """NumPy restatement of the top-p filter (float64): sort each row descending, a tie going to the lower index
  first; a token is removed when the probability of the tokens sorted before it exceeds p -> (the removed mask,
  that probability before each token in sorted order)."""
  order = np.argsort(-logits, axis=-1, kind="stable")
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
  removed = np.zeros(logits.shape, bool)
  np.put_along_axis(removed, order, before > top_p[..., None], -1)
  return removed, before


def test_top_p_matches_the_oracle_and_splits_a_tie_at_the_cutoff_by_index():
  """Rows of a `[B, n, V]` batch with their own p; the first row's tied tokens 1, 2, 3 straddle the cutoff (0.3
  before them, then 0.5, then 0.7 > p = 0.6): 1 and 2 stay, 3 goes. `lax.top_k` over the whole
  (narrow) vocabulary, no sort, gather or scatter: on a mesh that splits the vocabulary, a gather into sorted order
  and a scatter back made XLA all-gather `[..., V, 3]` index arrays."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 4, 50)) * 2
  logits[0, 0, :5] = np.log([0.1, 0.2, 0.2, 0.2, 0.3]) + 40  # far above the rest: the row's mass is these five
  top_p = np.array([[0.6, 0.9, 0.3, 0.99], [0.5, 0.7, 0.1, 0.8], [0.95, 0.2, 0.6, 0.4]])
  removed, before = _top_p_oracle(logits, top_p)
  assert np.abs(before - top_p[..., None]).min() > 1e-4  # no cutoff within float32's rounding of the sums
  got = jax.jit(remask._top_p)(jnp.asarray(logits, jnp.float32), jnp.asarray(top_p, jnp.float32)[..., None])
  np.testing.assert_array_equal(np.isneginf(np.asarray(got)), removed)
  assert removed[0, 0, 3] and not removed[0, 0, [1, 2, 4]].any() and removed[0, 0, 5:].all()
  kept = np.asarray(got)[~removed]
  np.testing.assert_array_equal(kept, logits.astype(np.float32)[~removed])  # kept logits pass through unchanged
  jaxpr = str(jax.make_jaxpr(remask._top_p)(jnp.asarray(logits, jnp.float32), 0.9))
  assert not re.search(r"gather|scatter|sort\[", jaxpr) and "top_k" in jaxpr


def test_top_p_bisects_the_vocabulary_only_for_a_row_its_top_candidates_do_not_cover(monkeypatch):
  """A vocabulary wider than `PARTIAL_TOP_K`: rows whose prefix ends among `lax.top_k`'s candidates (peaked) and
  rows where it does not (flat: p past the top 256's mass, or a tie of 600 tokens split at the cutoff) all give the
  oracle's masks. The bisection over the whole vocabulary runs only in a batch with a row of the second kind, and a
  row gets the same bits alone as in a batch that bisects. No sort, gather or scatter."""
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(4, 2, 1000))
  logits[0, :, :30] += 8  # peaked: 30 likely tokens
  logits[1, 1, :30] += 8
  logits[1, 0, :5] = np.log([0.1, 0.2, 0.2, 0.2, 0.3]) + 40  # a tie straddling p = 0.6 among the candidates
  logits[2, 1, 100:700] = 40  # a 600-token tie straddling p: its cutoff lies past the candidates
  top_p = np.array([[0.9, 0.5], [0.6, 0.95], [0.7, 0.5525], [1.0, 0.99]])[..., None]
  removed, before = _top_p_oracle(logits, top_p[..., 0])
  filtered = top_p[..., 0] < 1
  assert np.abs(before - top_p)[filtered].min() > 1e-5  # no cutoff within float32's rounding of 1000 terms
  removed[~filtered] = False
  kept = (~removed).sum(-1)
  assert (kept[:2] < remask.PARTIAL_TOP_K).all() and (kept[2:][filtered[2:]] > remask.PARTIAL_TOP_K).all()
  assert removed[1, 0, 3] and not removed[1, 0, [1, 2, 4]].any()
  tie = removed[2, 1, 100:700]
  assert tie.any() and not tie.all() and (np.diff(tie.astype(int)) >= 0).all()  # the tie's lowest indices stay

  bisections = []
  whole = remask._bisected_prefix_end
  def counted(*args):
    jax.debug.callback(lambda: bisections.append(1))
    return whole(*args)
  monkeypatch.setattr(remask, "_bisected_prefix_end", counted)
  top_p_filter = jax.jit(lambda x, p: remask._top_p(x, p))  # a new function: traced with the counting bisection
  got = np.asarray(top_p_filter(jnp.asarray(logits, jnp.float32), jnp.asarray(top_p, jnp.float32)))
  np.testing.assert_array_equal(np.isneginf(got), removed)
  np.testing.assert_array_equal(got[~removed], logits.astype(np.float32)[~removed])
  assert len(bisections) == 1
  alone = np.asarray(top_p_filter(jnp.asarray(logits[:2], jnp.float32), jnp.asarray(top_p[:2], jnp.float32)))
  assert len(bisections) == 1  # rows 0 and 1 end among the candidates: no bisection
  np.testing.assert_array_equal(alone, got[:2])
  jaxpr = str(jax.make_jaxpr(remask._top_p)(jnp.asarray(logits, jnp.float32), 0.9))
  assert not re.search(r"gather|scatter|sort\[", jaxpr) and "top_k" in jaxpr


def test_the_bisection_keys_keep_the_float_order_and_find_the_smallest_key_that_holds():
  """`_ordered_keys` orders float32 as `lax.sort` does (-inf first, -0 before +0) and `_from_key` inverts it;
  `_smallest_key` finds the first key where a monotone condition holds, and `low + 1` when it holds everywhere (a
  top-p at or above a row's whole rounded mass, or a top-k past the vocabulary: every token stays)."""
  floats = np.array([-np.inf, -3e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 2.0, 3e38, np.inf], np.float32)
  keys = np.asarray(remask._ordered_keys(jnp.asarray(floats)))
  assert (np.diff(keys) > 0).all() and keys[0] == remask._FLOAT_MIN_KEY
  np.testing.assert_array_equal(np.asarray(remask._from_key(jnp.asarray(keys))).view(np.int32), floats.view(np.int32))
  high = jnp.full((3, 1), keys[-1], jnp.int32)
  found = remask._smallest_key(lambda t: t >= jnp.asarray(keys[[2, 5, 7]])[:, None], high)
  np.testing.assert_array_equal(found[:, 0], keys[[2, 5, 7]])
  assert remask._smallest_key(lambda t: t > remask._FLOAT_MIN_KEY - 5, high)[0, 0] == remask._FLOAT_MIN_KEY
  tail = np.random.default_rng(4).normal(size=(1, 3, 1000)).astype(np.float32)
  tail[..., 300:] = -np.inf  # a top-k above the candidates before it
  kept = np.isfinite(np.asarray(jax.jit(remask._top_p)(jnp.asarray(tail), np.float32(1 - 2 ** -24))))
  assert kept[..., :300].all() and not kept[..., 300:].any()


def test_top_k_keeps_each_rows_k_largest_logits_with_their_ties():
  """NumPy restatement: a token goes when its logit is below the row's k-th largest (0: no filter; k past the
  vocabulary: none goes). Rows asking at most `PARTIAL_TOP_K` take `lax.top_k`'s k-th value, a batch with a larger
  k bisects the logits' order: both give the oracle's masks, ties at the k-th value kept."""
  rng = np.random.default_rng(6)
  logits = np.round(rng.normal(size=(5, 3, 600)) * 4, 1).astype(np.float32)  # rounded: many ties
  for ks in ([0, 1, 7, 40, remask.PARTIAL_TOP_K], [3, 0, remask.PARTIAL_TOP_K + 1, 599, 650]):
    k = np.array(ks, np.int32)
    descending = np.sort(logits, axis=-1)[..., ::-1]
    kth = np.take_along_axis(descending, np.broadcast_to(np.clip(k - 1, 0, 599)[:, None, None], (5, 3, 1)), -1)
    removed = (k[:, None, None] > 0) & (logits < kth)
    got = np.asarray(jax.jit(remask._top_k)(jnp.asarray(logits), jnp.asarray(k)[:, None, None]))
    np.testing.assert_array_equal(np.isneginf(got), removed)
    np.testing.assert_array_equal(got[~removed], logits[~removed])
    filtered = (k > 0) & (k <= remask.PARTIAL_TOP_K + 1)  # each of these rows loses tokens at every position
    assert not removed[(k == 0) | (k >= 600)].any() and removed[filtered].any(axis=-1).all()
