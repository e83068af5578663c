"""Finished rows leave the batch: a decoding loop over rows that need different numbers of forwards (prompts and
answers of different lengths; dynamic and threshold decoding's confidences) otherwise computes every row until the
slowest one is done.

Inside the one sampling program, the loop runs over all `B` rows until no more than `widths(B)[1]` of them are
still decoding, gathers those (their carry, KV-cache rows and per-row constants) into a batch that narrow, runs on
until the next width, and so on down to one row; at the end every row's final carry is back at its own index. Rows
are independent (each has its own positions, cache row, schedule and PRNG key), so the tokens are those of the
whole-batch loop: at a narrower width a row's numbers may differ in their last bits (XLA picks other kernels for
other shapes, as for a row run alone rather than in a batch), which changes a decision only at a near-tie. It pays
where a forward's cost grows with its rows: on a CPU a batch of 8 dynamic-decoding rows ran 280 forwards for rows
that needed 155 on average, and compacting them made it 13-18% faster (the decoder and the lm_head over one row
cost more than an eighth of eight rows'). Each narrower batch is one more copy of the loop body in the program
(longer compiles), and on an accelerator a forward over a few rows costs about what one row's does, so
`SamplingConfig.compact_rows` is off unless asked for. One device only (on a mesh the rows are split over `data`),
and not while streaming (pieces are reported by row index). `take` / `put` also gather the serving engine's busy
slots for a narrower chunk (`serving.slots.generate`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def widths(batch: int) -> tuple[int, ...]:
  """The batch's widths as its rows finish: `B`, then halved (rounded up) down to 1."""
  out = [batch]
  while out[-1] > 1:
    out.append(-(-out[-1] // 2))
  return tuple(out)


def enabled(compact_rows: bool, *, one_device: bool, stream: bool) -> bool:
  return compact_rows and one_device and not stream


def decode(algorithm: Any, ctx: Any, carry: Any) -> Any:
  """`algorithm.chunk(ctx, carry, None)` (the loop to the end) with finished rows moved out at each of `widths`."""
  full, index, rows = carry, None, ctx.rows
  for width in widths(carry.done.shape[0])[1:]:
    carry = algorithm.chunk(ctx, carry, None, until_active=width)
    full = carry if index is None else put(full, carry, index)
    keep = jnp.argsort(carry.done, stable=True)[:width]  # the rows still decoding first
    index = keep if index is None else index[keep]
    carry = take(carry, keep)
    ctx = dataclasses.replace(ctx, rows=jax.tree.map(lambda x: x[index], rows))
  carry = algorithm.chunk(ctx, carry, None)
  return carry if index is None else put(full, carry, index)


def take(carry: Any, index: jax.Array) -> Any:
  """The carry's rows `index` (the KV cache `[layers, B, ...]` first, then `[B, ...]` arrays and scalars)."""
  cache, *rest = carry
  rest = jax.tree.map(lambda x: x if x.ndim == 0 else x[index], tuple(rest))
  return type(carry)(jax.tree.map(lambda c: c[:, index], cache), *rest)


def put(full: Any, part: Any, index: jax.Array) -> Any:
  """`full` with its rows `index` replaced by `part`'s rows (scalars, the batch's counts: `part`'s)."""
  cache, *rest = full
  rest = jax.tree.map(lambda x, y: y if x.ndim == 0 else x.at[index].set(y), tuple(rest), tuple(part[1:]))
  return type(full)(jax.tree.map(lambda c, p: c.at[:, index].set(p), cache, part[0]), *rest)
