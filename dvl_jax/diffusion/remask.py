"""One denoising decision, vectorised over rows: propose a token and a confidence per position (spec §6.5),
then choose which masked positions take their proposal (spec §6.4, plus Fast-dLLM v2 thresholding). Each
row samples with its own settings (`Sampling`), so requests with different ones share a batch.

The AR sampler reuses `propose` for its next token.
"""

from __future__ import annotations

import functools

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def num_transfer(block_size: int, steps: int) -> tuple[int, ...]:
  """Tokens to unmask at each of the `steps + 1` iterations (spec §6.4, vectors in §12).

  All `bs // steps`, the first `bs % steps` entries +1, then the extra last entry `bs // steps`.
  """
  base, extra = divmod(block_size, steps)
  return tuple(base + (i < extra) for i in range(steps)) + (base,)


class Sampling(NamedTuple):
  """Each row's sampling settings, arrays `[B]`: rows of one batch may differ (the serving engine's slots)."""

  keys: Any  # [B] typed PRNG keys
  temperature: Any  # [B] float32, 0: greedy
  top_k: Any  # [B] int32, 0: no top-k filter
  top_p: Any  # [B] float32, 1: no top-p filter

  @classmethod
  def of(cls, keys: jax.Array, temperature: float, top_k: int, top_p: float) -> "Sampling":
    """`keys` `[B]` with one setting for every row (host arrays)."""
    b = keys.shape[0]
    return cls(keys, np.full(b, temperature, np.float32), np.full(b, top_k, np.int32), np.full(b, top_p, np.float32))


CONFIDENCES = ("sampled", "softmax")  # spec §7.5: DiffusionVL-QwenVL / DiffusionVL-Qwen and LLaDA-BD3LM


def propose(logits: jax.Array, keys: jax.Array, *, temperature: float | jax.Array, top_k: int | jax.Array,
            top_p: float | jax.Array, confidence: str = "sampled", chunked: bool = False
            ) -> tuple[jax.Array, jax.Array]:
  """logits `[B, n, V]` or `[B, V]` (fp32), one PRNG key per row `[B]` -> tokens, confidence `[B, n]` or `[B]`.

  `temperature`, `top_k`, `top_p`: one value per row `[B]`, or one for every row. A row at temperature 0 is
  greedy (confidence = softmax prob of the argmax). A sampled row's logits are divided by its temperature,
  filtered by top-k (keep >= k-th largest) and top-p (smallest prefix of the sorted distribution reaching p, the
  first token always kept), then sampled; the confidence is the sampled token's probability under that modified
  distribution with `confidence="sampled"` (DiffusionVL-QwenVL), under the unmodified `softmax(logits)` with
  "softmax" (DiffusionVL-Qwen, LLaDA-BD3LM; spec §6.5, §7.5). The filters and the sampling run only when some
  row samples (`lax.cond`), each filter only when some sampled row asks for it: an all-greedy batch pays for the
  argmax and its softmax.
  The branches change no value of a row that does not use them, so a row gets the same bits whatever the others
  ask (one compiled program serves every mix: the serving engine's slots). `chunked`: see `greedy`.
  """
  b = logits.shape[0]
  temperature, top_k, top_p = (jnp.broadcast_to(jnp.asarray(v), (b,)) for v in (temperature, top_k, top_p))
  if confidence not in CONFIDENCES:
    raise ValueError(f"unknown confidence {confidence!r}; use one of {CONFIDENCES}")
  return jax.lax.cond(jnp.any(temperature > 0),
                      lambda: _sample(logits, keys, temperature, top_k, top_p, confidence, chunked),
                      lambda: greedy(logits, chunked))


def greedy(logits: jax.Array, chunked: bool = False) -> tuple[jax.Array, jax.Array]:
  """`propose` with every row at temperature 0: the argmax and its softmax probability, `1 / sum(exp(logits -
  max))`: bit for bit what `jax.nn.softmax` gives there in fp32 (the logits' dtype; its numerator is exp(0) = 1),
  without normalising the rest of the vocabulary (a pass over `[..., V]` less, no `[..., V]` probabilities).
  `chunked` finds the argmax chunk by chunk (`_first_max`: the same token, faster on XLA:CPU; on a mesh
  that shards the vocabulary it would add collectives)."""
  chunk = _argmax_chunk(logits.shape[-1]) if chunked else 1
  if chunk == 1:
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), 1 / jnp.sum(jnp.exp(logits - top), axis=-1)
  maxima = _chunk_maxima(logits, chunk)
  total = jnp.sum(jnp.exp(logits - jnp.max(maxima, axis=-1, keepdims=True)), axis=-1)
  return _chunked_argmax(logits, maxima, chunk, jnp.any(jnp.isnan(total))), 1 / total


def _argmax_chunk(vocab: int) -> int:
  """The chunk `greedy` splits the vocabulary into: the largest power of two up to 128 that divides it."""
  return vocab & -vocab if vocab & -vocab < 128 else 128


def _chunk_maxima(values: jax.Array, chunk: int) -> jax.Array:
  """`[..., V]` -> the maxima of its `chunk`-wide pieces `[..., V / chunk]`."""
  return jnp.max(values.reshape(*values.shape[:-1], -1, chunk), axis=-1)


def _chunked_argmax(values: jax.Array, maxima: jax.Array, chunk: int, nan: jax.Array) -> jax.Array:
  """`jnp.argmax(values, -1)` as int32, from the chunks' `maxima` (`_first_max`) unless `nan` (some row holds a
  NaN; then `jnp.argmax` itself)."""
  parts = values.reshape(*values.shape[:-1], -1, chunk)
  return jax.lax.cond(nan, lambda: jnp.argmax(values, axis=-1), lambda: _first_max(parts, maxima, chunk)
                      ).astype(jnp.int32)


def _first_max(parts: jax.Array, maxima: jax.Array, chunk: int) -> jax.Array:
  """`jnp.argmax` of finite logits `[..., V]` from their chunks `parts` `[..., V / chunk, chunk]` and the
  chunks' maxima: the first index of the largest value lies in the first chunk holding it. XLA's CPU argmax
  is a two-operand reduction that runs ~30x slower than a max over the same values (2.7 ms for 8 x 151,680
  logits), so a greedy forward spent more on it than on the rest of the proposal; two maxima and a
  `chunk`-wide argmax read the logits once. Not for NaN or +inf rows (the CPU max skips NaN; `greedy` falls
  back to `jnp.argmax` for them)."""
  first = jnp.argmax(maxima, axis=-1)
  inside = jnp.take_along_axis(parts, first[..., None, None], axis=-2)[..., 0, :]
  return first * chunk + jnp.argmax(inside, axis=-1)


PARTIAL_TOP_K = 256  # top-k / top-p candidates from `lax.top_k`, a partial sort of the vocabulary


def _sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
            confidence: str, chunked: bool) -> tuple[jax.Array, jax.Array]:
  """`propose` when some row samples: the sampled rows' tokens and confidences, the greedy rows' from `greedy`.

  The draw is the Gumbel-max one of `jax.random.categorical`. A filtered position whose kept tokens all lie among
  the `PARTIAL_TOP_K` most likely (`lax.top_k`'s candidates, in order: a peaked distribution under top-p, or
  top-k <= 256) adds noise to those candidates only: the same distribution from 256 random numbers instead of the
  vocabulary's (on the CPU the noise was 113 of 148 ms for 64 positions of 151,936 logits). The others draw over
  the whole vocabulary, in a branch that runs only when one of them samples."""
  per_row = lambda v: v.reshape((-1,) + (1,) * (logits.ndim - 1))
  sampled = temperature > 0
  z = logits / per_row(jnp.where(sampled, temperature, 1.0))
  top_k = jnp.where(sampled, top_k, 0)  # a greedy row's filter is never read: its k cannot slow the others
  top_p = jnp.where(sampled, top_p, 1.0)  # likewise for its p
  filtered = (top_k > 0) | (top_p < 1)
  n = min(PARTIAL_TOP_K, logits.shape[-1])

  def filters() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    values, order = jax.lax.top_k(z, n)

    def among(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
      """(the candidates' values after a filter, how many tokens it keeps): the kept tokens are the first of the
      candidates (both run down the logits, ties by index), so no gather from the vocabulary (split on a mesh)."""
      count = jnp.sum(kept > -jnp.inf, axis=-1, keepdims=True)
      return jnp.where(jnp.arange(n) < count, values, -jnp.inf), count[..., 0]

    kept = jax.lax.cond(jnp.any(top_k > 0), lambda z: _top_k(z, per_row(top_k), values), lambda z: z, z)
    kept = jax.lax.cond(jnp.any(top_p < 1), lambda z: _top_p(z, per_row(top_p), (among(z)[0], order)), lambda z: z,
                        kept)
    return kept, *among(kept), order

  def unfiltered() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # every token kept: no candidates
    shape = z.shape[:-1]
    none = jnp.full(shape + (n,), -jnp.inf, z.dtype)
    return z, none, jnp.full(shape, logits.shape[-1]), jnp.zeros(shape + (n,), jnp.int32)

  z, candidates, count, order = jax.lax.cond(jnp.any(filtered), filters, unfiltered)
  scored = z if confidence == "sampled" else logits
  top = jnp.max(scored, axis=-1, keepdims=True)
  total = jnp.sum(jnp.exp(scored - top), axis=-1)
  covered = per_row(filtered)[..., 0] & (count <= n) & ~jnp.isnan(total)
  noise = jax.vmap(lambda key, row: jax.random.gumbel(key, row.shape, row.dtype))(keys, candidates)
  from_candidates = jnp.take_along_axis(order, jnp.argmax(candidates + noise, axis=-1)[..., None], axis=-1)[..., 0]
  x0 = jax.lax.cond(jnp.any(per_row(sampled)[..., 0] & ~covered),
                    lambda: jnp.where(covered, from_candidates, _drawn_over_vocabulary(z, keys, total, chunked)),
                    lambda: from_candidates)
  at_x0 = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == x0[..., None]
  # softmax(scored) at x0 (to an ulp: fused apart from the sum) without the `[..., V]` probabilities or a gather
  p0 = jnp.exp(jnp.max(jnp.where(at_x0, scored, -jnp.inf), axis=-1) - top[..., 0]) / total
  gx, gp = greedy(logits, chunked)
  rows = per_row(sampled)[..., 0]
  return jnp.where(rows, x0, gx), jnp.where(rows, p0, gp)


def _drawn_over_vocabulary(z: jax.Array, keys: jax.Array, total: jax.Array, chunked: bool) -> jax.Array:
  """`jax.random.categorical(key, z)` per row: the argmax of `z` `[B, n, V]` plus Gumbel noise over the whole
  vocabulary, chunk by chunk when `chunked` (`total` `[B, n]`: NaN where `z` holds a NaN)."""
  perturbed = jax.vmap(lambda key, row: jax.random.gumbel(key, row.shape, row.dtype))(keys, z) + z
  chunk = _argmax_chunk(z.shape[-1]) if chunked else 1
  if chunk == 1:
    return jnp.argmax(perturbed, axis=-1).astype(jnp.int32)
  return _chunked_argmax(perturbed, _chunk_maxima(perturbed, chunk), chunk, jnp.any(jnp.isnan(total)))


def _top_k(logits: jax.Array, top_k: jax.Array, largest: jax.Array | None = None) -> jax.Array:
  """Removes tokens below each row's `top_k`-th largest logit (`top_k` broadcast to `logits`; 0: none). `largest`:
  the `PARTIAL_TOP_K` largest logits in order, when the caller has them (`lax.top_k`).

  When no row asks for more than `PARTIAL_TOP_K`, the k-th largest comes from `lax.top_k` (a partial sort); otherwise
  by bisection over the logits' order (`_smallest_key`: 32 counts over the vocabulary, no sort: on the CPU a sort of
  64 rows of 151,936 logits takes ~2.7 s, and over a mesh that splits the vocabulary it gathers every row whole)."""
  vocab = logits.shape[-1]
  partial = min(PARTIAL_TOP_K, vocab)
  top_k = jnp.broadcast_to(top_k, logits.shape[:-1] + (1,))

  def by_bisection() -> jax.Array:
    keys = _ordered_keys(logits)
    fewer_above = lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < top_k  # noqa: E731
    return _from_key(_smallest_key(fewer_above, _ordered_keys(jnp.max(logits, axis=-1, keepdims=True))))

  def among_largest() -> jax.Array:
    values = jax.lax.top_k(logits, partial)[0] if largest is None else largest
    return jnp.take_along_axis(values, jnp.clip(top_k - 1, 0, partial - 1), axis=-1)

  kth = jax.lax.cond(jnp.all(top_k <= partial), among_largest, by_bisection)
  return jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)


def _top_p(logits: jax.Array, top_p: float | jax.Array, largest: tuple[jax.Array, jax.Array] | None = None
           ) -> jax.Array:
  """Keeps the smallest prefix of the tokens sorted by descending logit (a tie: the lower index first) whose
  probability exceeds `top_p` (broadcast to `logits`): the tokens sorted before it sum to at most `top_p`. A row
  with `top_p >= 1` keeps every token. `largest`: the `PARTIAL_TOP_K` largest logits in order and their indices,
  when the caller has them (`lax.top_k`).

  A row whose `PARTIAL_TOP_K` most likely tokens already exceed p (a peaked distribution, the usual case) finds the
  prefix among `lax.top_k`'s candidates (on the CPU ~50 ms for 64 rows of 151,936 logits, against ~2.9 s for a
  sort); the others by bisection (`_bisected_prefix_end`), in a branch that runs only when some row needs it.
  Which way a row goes depends on its own logits and p only, so it gets the same bits whatever the other rows ask.

  A token is kept when it sorts no later than the prefix's last one (a larger logit, or the same with an index no
  larger): no gather or scatter. With the vocabulary split over a mesh's `tensor` axis, `take_along_axis` /
  `put_along_axis` into the sorted order made XLA build and all-gather `[..., vocab, 3]` int32 index arrays (the
  serving engine's block-diffusion chunk, 8 slots of a 3B model on a v5e 1,2,2 mesh: 2.96 GiB of temporaries per
  chip)."""
  top_p = jnp.broadcast_to(jnp.asarray(top_p), logits.shape[:-1] + (1,))
  top = jnp.max(logits, axis=-1, keepdims=True)
  total = jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)
  candidates = min(PARTIAL_TOP_K, logits.shape[-1])
  value, token, inside = _prefix_end(*(jax.lax.top_k(logits, candidates) if largest is None else largest), top, total,
                                     top_p)
  if candidates < logits.shape[-1]:  # (else the candidates are the whole vocabulary in sorted order)
    bisect = (top_p < 1) & ~inside
    value, token = jax.lax.cond(
        jnp.any(bisect),
        lambda: tuple(jnp.where(bisect, *pair) for pair in zip(_bisected_prefix_end(logits, top, total, top_p),
                                                                (value, token))),
        lambda: (value, token))
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  kept = (top_p >= 1) | (logits > value) | ((logits == value) & (index <= token))
  return jnp.where(kept, logits, -jnp.inf)


def _prefix_end(descending: jax.Array, order: jax.Array, top: jax.Array, total: jax.Array, top_p: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_top_p`'s prefix from the first n tokens in sorted order (logits `descending` and their indices `order`,
  `[..., n]`; the row's max logit `top` and `sum(exp(logits - top))` `total`, `[..., 1]`) -> its last token's
  logit and index, and whether it ends among these n (the probability before the last of them exceeds p)."""
  cumulative = jnp.cumsum(jnp.exp(descending - top) / total, axis=-1)
  before = cumulative[..., :-1] <= top_p
  last = jnp.sum(before, axis=-1, keepdims=True)  # the prefix's last sorted position
  at_last = jax.lax.broadcasted_iota(jnp.int32, descending.shape, descending.ndim - 1) == last
  value = jnp.max(jnp.where(at_last, descending, -jnp.inf), axis=-1, keepdims=True)
  return value, jnp.max(jnp.where(at_last, order, -1), axis=-1, keepdims=True), ~before[..., -1:]


def _bisected_prefix_end(logits: jax.Array, top: jax.Array, total: jax.Array, top_p: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """`_prefix_end` over the whole vocabulary without sorting it: the prefix ends in the group of tokens tied at the
  smallest logit v whose larger logits hold at most p (`_smallest_key`, 32 sums), and its r-th token (by index) is
  kept while that mass plus r times the group's probability is at most p (the index found by halving too). The
  sums run in the vocabulary's order, not the sorted one: a cutoff within float32's rounding of p may fall one
  token apart from a sort's."""
  keys = _ordered_keys(logits)
  probs = jnp.exp(logits - top) / total
  mass_above = lambda t: jnp.sum(jnp.where(keys > t, probs, 0), axis=-1, keepdims=True)  # noqa: E731
  at = _smallest_key(lambda t: mass_above(t) <= top_p, _ordered_keys(top))
  value, tied = _from_key(at), keys == at
  share, count = jnp.exp(value - top) / total, jnp.sum(tied, axis=-1, keepdims=True)
  kept = jnp.where(share > 0, jnp.clip(jnp.floor((top_p - mass_above(at)) / share) + 1, 1, count), count)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  enough = lambda i: jnp.sum(tied & (index <= i), axis=-1, keepdims=True) >= kept  # noqa: E731
  vocab = logits.shape[-1]
  token = _smallest_key(enough, jnp.full(top.shape, vocab - 1, jnp.int32), low=jnp.full(top.shape, -1, jnp.int32),
                        steps=vocab.bit_length())
  return value, token


_FLOAT_MIN_KEY = -(2 ** 23) * 255 - 1  # `_ordered_keys(-inf)`


def _ordered_keys(x: jax.Array) -> jax.Array:
  """float32 -> int32 keys in the same order (-inf lowest, -0 below +0, as `lax.sort` orders them)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(key: jax.Array) -> jax.Array:
  """The float32 whose `_ordered_keys` is `key` (the map is its own inverse on the bits)."""
  return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def _smallest_key(holds: Callable[[jax.Array], jax.Array], high: jax.Array, low: jax.Array | None = None,
                  steps: int = 32) -> jax.Array:
  """Per row (`[..., 1]` int32), the smallest t in (low, high] where `holds(t)` (monotone: false below that t, true
  from it on; true at `high`), by `steps` halvings of the interval. `low` defaults to just below
  `_ordered_keys(-inf)`: a condition true for every key then gives -inf's."""
  low = jnp.full(high.shape, _FLOAT_MIN_KEY - 1, jnp.int32) if low is None else low

  def halve(_, bounds):
    low, high = bounds
    middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without overflow
    ok = holds(middle)
    return jnp.where(ok, low, middle), jnp.where(ok, middle, high)

  return jnp.maximum(jax.lax.fori_loop(0, steps, halve, (low, high))[1], low + 1)  # (true at `low` too: low + 1)


def confidence_rank(conf: jax.Array) -> jax.Array:
  """`[B, n]` -> position of each entry in a descending sort, ties by lowest index first (torch.topk)."""
  n = conf.shape[-1]
  earlier = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]  # [j, i]: j comes before i
  ahead = (conf[:, :, None] > conf[:, None, :]) | ((conf[:, :, None] == conf[:, None, :]) & earlier)
  return ahead.sum(axis=1)


def select(conf: jax.Array, masked: jax.Array, scheduled: jax.Array, *, strategy: str, threshold: float | jax.Array
           ) -> jax.Array:
  """Which positions to unmask `[B, n]` bool.

  `conf` `[B, n]` confidences (any value where not `masked`), `scheduled` `[B]` the transfer-schedule
  entry of each row's current step.
  * low_confidence_static: the top `min(scheduled, #masked)` masked positions by confidence;
  * low_confidence_dynamic: every masked position with confidence strictly > threshold if there are
    at least `scheduled` of them (possibly zero when the entry is 0), else the static choice;
  * threshold: every masked position with confidence > threshold, and always the most confident one.
  """
  conf = jnp.where(masked, conf, -jnp.inf)
  rank = confidence_rank(conf)
  high = masked & (conf > threshold)
  if strategy == "threshold":
    return high | (masked & (rank == 0))
  k = jnp.minimum(scheduled, masked.sum(-1))
  top = masked & (rank < k[:, None])
  if strategy == "low_confidence_static":
    return top
  if strategy == "low_confidence_dynamic":
    return jnp.where((high.sum(-1) >= scheduled)[:, None], high, top)
  raise ValueError(f"unknown remasking strategy {strategy!r}")


@functools.lru_cache(maxsize=64)
def _default_keys(batch: int, impl: str) -> jax.Array:
  """`row_keys(None, batch)`, made once per batch size (and key implementation): greedy calls pass no key."""
  del impl  # part of the cache key only
  return jax.random.split(jax.random.key(0), batch)


def row_keys(rng: jax.Array | None, batch: int) -> jax.Array:
  """One typed PRNG key per row `[B]` from None (key 0), one key (split), or `batch` keys (kept)."""
  if rng is None:
    return _default_keys(batch, jax.config.jax_default_prng_impl)
  rng = jnp.asarray(rng)
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.dtype != jnp.uint32 or rng.ndim < 1:
      raise TypeError(f"rng must be jax.random.key(seed) or one key per row, got {rng.dtype} of shape {rng.shape}")
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    return jax.random.split(rng, batch)
  if rng.shape != (batch,):
    raise ValueError(f"rng must be one key or {batch} keys (one per row), got shape {rng.shape}")
  return rng
