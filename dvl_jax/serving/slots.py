"""The serving engine's device side: a fixed number of slots, each a row of one donated KV cache, and the
jitted programs over them (JetStream's prefill / insert / generate); the engine keeps one such pool per algorithm.

The slots' state is the sampler's own loop state over `S` rows: the algorithm's per-row constants (`rows`, with
each row's sampling settings and key: requests with different ones share the programs) and its loop carry (the
KV cache `[layers, S, max_len, kv_heads, head_dim]` first). An idle slot is a dead row (prompt length 0, done
from the start), as the sampler pads a batch. Four programs, each traced once per shape and counted in `TRACES`:

* `empty`: every slot idle (once per pool);
* `insert`: the sampler's own prefill and first carry for one request, on a one-row cache, written over one
  slot; the other slots keep their state (once per prompt-length bucket, and with images once per pair of
  prompt and patch-row buckets: not per image layout);
* `release`: a slot's row marked done (a cancelled request);
* `generate`: the sampler's own decoding loop over all slots for at most `max_forwards` forwards (an array:
  the engine's `chunk` or `admit_every`) and until a busy slot finishes, then each slot's tokens so far; rows
  are independent, so a request decodes as it would alone. It attends to a prefix of the cache that holds every
  busy request (once per such `view` length: a few, `Engine(views=...)`), and with `compact_rows` in the
  engine's config runs only as many rows as hold the busy slots (once per view and row width).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax

from dvl_jax.diffusion import compaction, kv_cache, remask
from dvl_jax.diffusion.sampler_common import Algorithm, PromptArrays, begin, embed, merged
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.diffusion.sampling_mesh import Placement

TRACES: collections.Counter = collections.Counter()  # traces per program: a recompile shows up here
_ONE_ROW = Placement()  # an admitted request's own prefill: unconstrained (the partitioner follows the params)


@dataclasses.dataclass(frozen=True)
class Static:
  """What the programs compile for (hashable: a static argument)."""

  algorithm: Algorithm
  graphdef: Any
  config: SamplingConfig  # `sampler_common.compile_key`'d, rows may sample; `gen_length` is the widest request
  placement: Placement  # the params' mesh; slots (rows) are sharded over `data`, as a sampled batch is


class Slots(NamedTuple):
  """All slots' decoding state (donated through every program)."""

  rows: tuple  # the algorithm's per-row constants, each `[S, ...]`
  carry: tuple  # its loop carry: the KV cache, then `[S, ...]` arrays and scalars


class Prefill(NamedTuple):
  """One request as the programs take it (host arrays, one row)."""

  prompt: PromptArrays  # ids [1, W] bucketed, lengths [1], optional image
  gen: Any  # [1] tokens to generate
  sampling: remask.Sampling  # [1] PRNG key, temperature, top-k, top-p
  inputs: tuple  # the algorithm's own `inputs`, `[1, ...]`


def _pinned(placement: Placement, slots: Slots) -> Slots:
  """Every program returns the slots on the same shardings, so the next one never recompiles for them."""
  rows = slots.rows
  if placement.mesh is not None:
    rows = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, placement.rows), rows)
  return Slots(rows, placement.pin_loop(slots.carry))


def _on_its_mesh(program: Callable[..., Any]) -> Callable[..., Any]:
  """`program(static, ...)` traced inside its placement's context (`Placement.tracing`)."""

  @functools.wraps(program)
  def traced(static: Static, *args: Any, **kwargs: Any) -> Any:
    with static.placement.tracing():
      return program(static, *args, **kwargs)

  return traced


@functools.partial(jax.jit, static_argnums=0)
@_on_its_mesh
def empty(static: Static, state: Any, cache: kv_cache.KV, idle: Prefill) -> Slots:
  """`idle`: a prefill over `S` rows with prompt lengths 0 (dead rows)."""
  TRACES["empty"] += 1
  place = static.placement
  model = merged(static.graphdef, state, place)
  ctx, carry = begin(static.algorithm, model, static.config, cache, embed(model, idle.prompt, place), idle.gen,
                     idle.sampling, idle.inputs, placement=place, stream=False)
  return _pinned(place, Slots(ctx.rows, carry))


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("slots",))
@_on_its_mesh
def insert(static: Static, state: Any, slots: Slots, index: jax.Array, request: Prefill) -> Slots:
  """The request prefilled into slot `index` `[]` (one row: not split over the mesh's `data`): its rows and carry
  written over that slot's."""
  TRACES["insert"] += 1
  model = merged(static.graphdef, state, static.placement)
  cache, *per_row = slots.carry
  one = kv_cache.init(model.config, 1, cache[0].shape[2])
  ctx, carry = begin(static.algorithm, model, static.config, one, embed(model, request.prompt, _ONE_ROW), request.gen,
                     request.sampling, request.inputs, placement=_ONE_ROW, stream=False)
  put = lambda all_rows, row: all_rows if all_rows.ndim == 0 else all_rows.at[index].set(row[0])
  new_rows = jax.tree.map(put, slots.rows, ctx.rows)
  per_row = jax.tree.map(put, tuple(per_row), tuple(carry[1:]))
  new_carry = type(carry)(kv_cache.put_row(cache, carry[0], index), *per_row)
  return _pinned(static.placement, Slots(new_rows, new_carry))


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("slots",))
def release(static: Static, slots: Slots, index: jax.Array) -> Slots:
  """Slot `index` `[]` stops decoding (a cancelled request): its row is done, the others keep their state."""
  TRACES["release"] += 1
  return _pinned(static.placement, Slots(slots.rows, slots.carry._replace(done=slots.carry.done.at[index].set(True))))


@functools.partial(jax.jit, static_argnums=(0, 2, 3), donate_argnames=("slots",))
@_on_its_mesh
def generate(static: Static, max_forwards: jax.Array, view: int, width: int, state: Any, slots: Slots,
             picked: jax.Array) -> tuple[Slots, dict[str, jax.Array]]:
  """At most `max_forwards` `[]` decoding forwards over the slots `picked` `[width]` (distinct; every busy slot
  among them), and only until a busy slot's request finishes (it is handed out and its slot refilled at once),
  attending to the first `view` cache slots only -> the slots and, per slot, tokens `[S, G]`, `steps` `[S, G]`
  (-1 where not decoded yet), `decoded`, `nfe` and `done` `[S]`.

  `view` must hold every busy slot's decoded span (`P + G` rounded up to a block): a row never reads or writes a
  cache slot past it, so its tokens are those of the full cache, while each forward's attention costs what the
  longest busy request needs rather than the longest any request may have (the cache is sized for `max_prompt`
  + `max_tokens`). The loop runs on a copy of the first `view` slots, written back at the end. With `width` < S
  (`compact_rows` in the engine's config, one device) it runs on those rows only, gathered as `compaction` gathers a
  batch's unfinished rows: a few busy slots then cost what they need rather than a whole batch's forward."""
  TRACES["generate"] += 1
  place = static.placement
  model = merged(static.graphdef, state, place)
  cache = slots.carry[0]
  narrow = kv_cache.pinned(tuple(c[:, :, :view] for c in cache), place.cache)
  ctx = static.algorithm.context(model, static.config, place, False, view, slots.rows)
  carry = type(slots.carry)(narrow, *slots.carry[1:])
  if width < slots.carry.done.shape[0]:
    some = dataclasses.replace(ctx, rows=jax.tree.map(lambda x: x[picked], slots.rows))
    carry = compaction.put(carry, static.algorithm.chunk(some, compaction.take(carry, picked), max_forwards), picked)
  else:
    carry = static.algorithm.chunk(ctx, carry, max_forwards)
  out = static.algorithm.outputs(ctx, carry, static.config.gen_length)
  cache = kv_cache.write_prefix(cache, carry[0], place.cache)
  return _pinned(place, Slots(slots.rows, type(carry)(cache, *carry[1:]))), {**out, "done": carry.done}
