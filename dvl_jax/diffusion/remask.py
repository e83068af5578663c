"""One denoising decision, vectorised over rows: propose a token and a confidence per position (spec §6.5),
then choose which masked positions take their proposal (spec §6.4, plus Fast-dLLM v2 thresholding).

The AR sampler reuses `propose` for its next token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_transfer(block_size: int, steps: int) -> tuple[int, ...]:
  """Tokens to unmask at each of the `steps + 1` iterations (spec §6.4, vectors in §12).

  All `bs // steps`, the first `bs % steps` entries +1, then the extra last entry `bs // steps`.
  """
  base, extra = divmod(block_size, steps)
  return tuple(base + (i < extra) for i in range(steps)) + (base,)


def propose(logits: jax.Array, keys: jax.Array, *, temperature: float, top_k: int, top_p: float
            ) -> tuple[jax.Array, jax.Array]:
  """logits `[B, n, V]` (fp32), one PRNG key per row `[B]` -> tokens `[B, n]` int32, confidence `[B, n]`.

  Greedy at temperature 0 (confidence = softmax prob of the argmax). Otherwise the logits are
  divided by the temperature, filtered by top-k (keep >= k-th largest) and top-p (smallest prefix
  of the sorted distribution reaching p, the first token always kept), then sampled; the confidence
  is the sampled token's probability under that modified distribution (DiffusionVL-QwenVL).
  """
  if temperature == 0:
    probs = jax.nn.softmax(logits, axis=-1)
    x0 = jnp.argmax(logits, axis=-1)
  else:
    if temperature != 1.0:
      logits = logits / temperature
    if top_k > 0:
      kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
      logits = _top_p(logits, top_p)
    probs = jax.nn.softmax(logits, axis=-1)
    x0 = jax.vmap(lambda key, lg: jax.random.categorical(key, lg, axis=-1))(keys, logits)
  p0 = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  return x0.astype(jnp.int32), p0


def _top_p(logits: jax.Array, top_p: float) -> jax.Array:
  """Removes tokens whose cumulative probability (sorted descending) exceeds `top_p`, shifted right by one."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove = jnp.concatenate([jnp.zeros_like(cumulative[..., :1], bool), cumulative[..., :-1] > top_p], axis=-1)
  remove_unsorted = jnp.put_along_axis(jnp.zeros_like(remove), order, remove, axis=-1, inplace=False)
  return jnp.where(remove_unsorted, -jnp.inf, logits)


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


def row_keys(rng: jax.Array | None, batch: int) -> jax.Array:
  """One typed PRNG key per row `[B]` from None (key 0), one key (split), or `batch` keys (kept)."""
  rng = jax.random.key(0) if rng is None else jnp.asarray(rng)
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    return jax.random.split(rng, batch)
  if rng.shape != (batch,):
    raise ValueError(f"rng must be one key or {batch} keys (one per row), got shape {rng.shape}")
  return rng
