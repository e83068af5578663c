"""Streaming a sampler's output while it runs: `generate(..., on_block=fn)` calls `fn(row, tokens)` on the
host each time a row's next piece of generated tokens is final (a denoised block; AR: up to a block of
tokens, cut at EOS). A row's pieces, in call order, concatenate to its decoded tokens.

Each sampler has a streaming variant, compiled on first use, that reports finished pieces from inside the
jitted loop with an unordered `jax.debug.callback` (ordered effects are unsupported on several devices).
Every piece carries its index in the row and the host delivers them in that order. The callback reaches
the user's function through a slot held for the duration of the call, so the compiled program does not
depend on the function (no recompile per callback); the default program has no callback at all.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.diffusion.sampling_mesh import Placement

OnBlock = Callable[[int, np.ndarray], None]

_LOCK = threading.Lock()  # one streaming call at a time: the slot below is shared
_SLOT: list["_Listener"] = []


class _Listener:
  """Delivers the pieces of the first `rows` rows in piece order, holding back any that arrive early."""

  def __init__(self, on_block: OnBlock, rows: int):
    self.on_block, self.rows = on_block, rows
    self.next = [0] * rows
    self.early: dict[tuple[int, int], np.ndarray] = {}

  def __call__(self, on: np.ndarray, index: np.ndarray, tokens: np.ndarray, valid: np.ndarray) -> None:
    for row in np.flatnonzero(np.asarray(on)[:self.rows]).tolist():
      self.early[row, int(index[row])] = np.asarray(tokens[row])[np.asarray(valid[row])]
      while (row, self.next[row]) in self.early:
        self.on_block(row, self.early.pop((row, self.next[row])))
        self.next[row] += 1


def _deliver(*piece: np.ndarray) -> None:
  if _SLOT:
    _SLOT[0](*piece)


def emit(on: jax.Array, index: jax.Array, tokens: jax.Array, valid: jax.Array, placement: Placement) -> None:
  """Inside a jitted sampler: rows `on` `[B]` finished their piece `index` `[B]`, `tokens[r][valid[r]]`
  (`[B, n]` each). Costs a host call only in iterations where some row finished one."""

  def report() -> None:
    piece = (on, index, tokens, valid)
    if placement.mesh is not None:  # gathered on purpose: the host needs whole rows
      piece = jax.lax.with_sharding_constraint(piece, placement.replicated)
    jax.debug.callback(_deliver, *piece)

  jax.lax.cond(jnp.any(on), report, lambda: None)


def call(run: Callable[..., Any], args: tuple, on_block: OnBlock | None, rows: int) -> Any:
  """`run(*args)`; with `on_block`, waits for the result and every piece it streamed to `on_block`."""
  if on_block is None:
    return run(*args)
  with _LOCK:
    _SLOT.append(_Listener(on_block, rows))
    try:
      out = jax.block_until_ready(run(*args))
      jax.effects_barrier()
      return out
    finally:
      _SLOT.clear()
