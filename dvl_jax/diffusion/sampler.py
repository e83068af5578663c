"""Jitted block-diffusion sampler (spec §6) over a preallocated, donated KV cache.

Per row, exactly the original `generate_with_bd3lm` in `mode="reference"`:
* blocks of `bs` tokens at absolute positions (counted from 0) cover `[0, limit)`, `limit = P + G`
  rounded up to a block, or `P + G` itself when `bs >= P + G` (the one-block "full diffusion" case);
* prefill: one block-causal pass over the `P // bs` whole prompt blocks writes their K/V;
* each later block is denoised with the schedule `num_transfer(bs, steps)` (the partial prompt block
  goes first, its prompt tokens fixed and visible): a pass sees the valid cache and its own block
  bidirectionally and never writes the cache; once no mask is left, a commit pass over the final
  block content is the only writer of its K/V; the row stops after the block that holds EOS in its
  generated part, or after its last block.

Deviation from the original (spec §6.7 quirk 1): the original finds masked positions by comparing
embeddings with the mask embedding, so a position where the model itself picked the mask id stays
"masked" and is re-predicted, and a block whose masks survive all `steps + 1` iterations is never
committed. Here a boolean array records which positions are still to decode: a decoded position is
final whatever its id, so every block ends in at most `bs` denoising passes and is always committed.
Identical outputs whenever the model never proposes the mask id.

Beyond the original: batches of prompts with different lengths (each row runs its own block /
step / commit state machine in the same forwards, at its own cache offset; finished rows are frozen),
per-row EOS (the original stops when any row of the batch has EOS, quirk 2; identical at batch size 1),
`fused` commit and `threshold` decoding (see `SamplingConfig`), and sampling over the device mesh the
params are sharded on (`dvl_jax.diffusion.sampling_mesh`: same tokens, the cache never resharded in the loop).

`fused` mode: a finished block is not committed by its own pass; the next forward runs the window
`[previous block ; current block]` under the block-causal mask, so the previous block's rows attend
to the cache and themselves only (exactly its commit pass: same K/V) while the current block sees
the cache, the previous block and itself (exactly its first denoising pass). The last block needs
no commit at all. Same tokens as `reference`, one forward fewer per decoded block.

Code: a frozen `_Context` holds what no step changes (static options and the per-row `Rows`); `start` prefills
and makes the first `_Carry`; `chunk` runs a `lax.while_loop` over it (to the end, or a bounded number of
forwards: the serving engine keeps one carry over its slots between calls) whose body, `reference_step` or
`fused_step`, is one forward of the batch (`block_pass` / `fused_pass`) followed by one `denoise` decision and
the `block_state` that moves each row on; `outputs` reads the tokens. What the AR sampler shares (arguments,
shardings, jit, prompt embedding, the loop's assembly, `generate`) is in `dvl_jax.diffusion.sampler_common`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.diffusion import ar_sampler, kv_cache, remask, sampler_common, streaming
from dvl_jax.diffusion.sampler_common import Algorithm, Outputs, Prompt
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig, checked_config
from dvl_jax.diffusion.sampling_mesh import Placement
from dvl_jax.models.interface import KV, DiffusionLM

TRACES = sampler_common.TRACES  # traces per algorithm (both samplers): a recompile shows up here


def generate(model: DiffusionLM, inputs: Any, config: SamplingConfig = SamplingConfig(), *,
             rng: jax.Array | None = None, cache: KV | None = None, tokenizer: Any = None,
             on_block: streaming.OnBlock | None = None) -> GenerateOutput:
  """Generates `config.gen_length` tokens per prompt (`inputs`: see `Prompts.coerce`).

  `rng`: one PRNG key, or one per row (a row's sample then equals running it alone with its key).
  `cache`: a previous output's `.cache` of the same shape, reused in place (donated).
  `on_block(row, tokens)`: called on the host while sampling runs, each time a row's block of generated
  tokens is final (`dvl_jax.diffusion.streaming`); same tokens as without it.
  A model whose params are sharded over a `('data', 'fsdp', 'tensor')` mesh samples on that mesh
  (`dvl_jax.diffusion.sampling_mesh`); pick its shape with `suggest_mesh` before `dvl.load(ckpt, mesh=...)`.
  """
  return sampler_common.generate(algorithm_of(config), model, inputs, config, rng=rng, cache=cache,
                                 tokenizer=tokenizer, on_block=on_block)


def lower(model: DiffusionLM, inputs: Any, config: SamplingConfig = SamplingConfig()) -> jax.stages.Lowered:
  """The lowered sampler for these shapes (compile time, memory analysis and HLO in benchmarks and tests)."""
  return sampler_common.lower(algorithm_of(config), model, inputs, config)


def algorithm_of(config: SamplingConfig) -> Algorithm:
  """The decoding algorithm `config` asks for (block diffusion or AR)."""
  return ar_sampler.ALGORITHM if checked_config(config).algorithm == "autoregressive" else ALGORITHM


def _inputs(model: DiffusionLM, prompts: Prompts, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
  """Each row's (schedule `[B, bs + 1]`, threshold `[B]`): arrays, so that the strategy, `steps` and the threshold
  need no compile and may differ per row (the serving engine's slots).

  Every strategy is `low_confidence_dynamic` over these: `low_confidence_static` is it with an infinite
  threshold (no position is ever above it), `threshold` with a schedule of ones (the most confident position is
  above the threshold whenever any is). `num_transfer(bs, steps)` is indexed by `min(step, bs)`: a block never
  needs more than `bs` denoising passes, so entry `i` is the spec's entry `min(i, steps)`. A row whose answer
  fits in its prompt's one block (`P + G <= bs`) counts `num_transfer` over `G` tokens instead when
  `config.ablation_schedule` is "gen_length" (spec §7.5)."""
  bs, b = config.block_size, prompts.ids.shape[0]

  def schedule(tokens: int) -> np.ndarray:
    if config.remasking_strategy == "threshold":
      return np.ones(bs + 1, np.int32)
    sched = remask.num_transfer(tokens, config.steps)
    return np.array([sched[min(i, config.steps)] for i in range(bs + 1)], np.int32)

  one_block = (config.ablation_schedule == "gen_length") & (np.asarray(prompts.lengths) + config.gen_length <= bs)
  schedules = np.where(one_block[:, None], schedule(config.gen_length), schedule(bs))
  static = config.remasking_strategy == "low_confidence_static"
  threshold = np.float32(np.inf if static else config.confidence_threshold)
  return schedules.astype(np.int32), np.full((b,), threshold, np.float32)


# ---- the decoding loop ---------------------------------------------------------------------------

class Rows(NamedTuple):
  """Per row, what decoding reads and never changes (the serving engine keeps one per slot)."""

  lengths: jax.Array  # [B] prompt lengths P
  end: jax.Array  # [B] P + G
  keys: jax.Array  # [B] PRNG keys
  schedule: jax.Array  # [B, bs + 1] tokens to unmask at denoising pass `min(step, bs)`
  threshold: jax.Array  # [B] confidence threshold
  tail: jax.Array  # [B, bs, H] the prompt's embeddings (images spliced) over the first block to denoise


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every step of a decoding loop reads and none changes."""

  model: DiffusionLM
  config: SamplingConfig  # static: strategy, `steps` and threshold reach the loop as `rows` arrays
  placement: Placement
  stream: bool  # report every block as it becomes final (`streaming.emit`)
  max_len: int  # M, the cache's slots
  rows: Rows

  @property
  def bs(self) -> int:
    return self.config.block_size

  @property
  def limit(self) -> jax.Array:
    """`[B]` end of the decoded slots: P + G rounded up to a block, or P + G in one block (spec §6.1)."""
    end = self.rows.end
    return jnp.where(end <= self.bs, end, -(-end // self.bs) * self.bs)

  @property
  def first_blk(self) -> jax.Array:
    """`[B]` the first block to denoise (the whole prompt blocks before it are prefilled)."""
    return self.rows.lengths // self.bs

  @property
  def last_blk(self) -> jax.Array:
    return (self.limit - 1) // self.bs


class _Carry(NamedTuple):
  cache: KV
  ids: jax.Array  # [B, M] ids by absolute index: prompt, decoded tokens, the mask id elsewhere
  masked: jax.Array  # [B, M] positions still to decode
  decoded_at: jax.Array  # [B, M] the row's decoding forward that fixed the token, -1
  blk: jax.Array  # [B] block being denoised
  step: jax.Array  # [B] denoising passes done in it
  pending: jax.Array  # [B] a finished block awaits its commit (reference: `blk`; fused: `blk - 1`)
  done: jax.Array  # [B] (dead padding rows start done)
  nfe: jax.Array  # [B] decoding forwards of the row (the prefill not counted: it keys the row's sampling)
  forwards: jax.Array  # [] decoding forwards of the batch


def rows(model: DiffusionLM, config: SamplingConfig, prompt: Prompt, gen: jax.Array, keys: jax.Array,
         inputs: tuple[jax.Array, jax.Array]) -> Rows:
  """The per-row constants of an embedded prompt, gen lengths `[B]`, keys `[B]` and `_inputs`."""
  bs, w = config.block_size, prompt.ids.shape[1]
  window = jnp.clip(_window(prompt.lengths // bs * bs, bs), 0, w - 1)
  tail = jnp.take_along_axis(prompt.embeds, window[..., None], axis=1)
  return Rows(prompt.lengths, prompt.lengths + gen, keys, *inputs, tail)


def start(ctx: _Context, cache: KV, prompt: Prompt, inputs: tuple) -> _Carry:
  """The prefill, then every row at its first block: the prompt ids, the mask id elsewhere, slots
  `[P, limit)` to decode."""
  prefilled = ctx.first_blk > 0
  cache = jax.lax.cond(jnp.any(prefilled), lambda c: prefill(ctx, prompt, c), lambda c: c, cache)
  mask_id = ctx.model.config.mask_token_id
  b, w = prompt.ids.shape
  plen, slots = prompt.lengths[:, None], jnp.arange(ctx.max_len)[None, :]
  ids = jnp.full((b, ctx.max_len), mask_id, jnp.int32).at[:, :w].set(prompt.ids)
  ids = jnp.where(slots < plen, ids, mask_id)
  masked = (slots >= plen) & (slots < ctx.limit[:, None])
  zeros = jnp.zeros((b,), jnp.int32)
  return ctx.placement.pin_loop(_Carry(cache, ids, masked, jnp.full((b, ctx.max_len), -1, jnp.int32), ctx.first_blk,
                                       zeros, zeros.astype(bool), prompt.lengths == 0, zeros, jnp.zeros((), jnp.int32)))


def chunk(ctx: _Context, c: _Carry, max_forwards: int | None, until_active: int = 0) -> _Carry:
  """Decoding forwards until every row is done (`until_active`: until no more rows decode, `compaction`), or (the
  serving engine) at most `max_forwards` of them and until a row finishes."""
  step = fused_step if ctx.config.mode == "fused" else reference_step
  return sampler_common.loop(functools.partial(step, ctx), c, max_forwards, until_active)


def outputs(ctx: _Context, c: _Carry, width: int) -> Outputs:
  """tokens `[B, width]` from each row's prompt end (the mask id where never decoded) and statistics."""
  out = jnp.minimum(_window(ctx.rows.lengths, width), ctx.max_len - 1)
  generated = jnp.arange(width)[None, :] < (ctx.rows.end - ctx.rows.lengths)[:, None]
  prefilled = ctx.first_blk > 0
  return {"tokens": _at(c.ids, out), "decoded": jnp.sum(~_at(c.masked, out) & generated, axis=1),
          "steps": jnp.where(generated, _at(c.decoded_at, out), -1), "nfe": c.nfe + prefilled,
          "forwards": c.forwards + jnp.any(prefilled)}


def _window(start: jax.Array, n: int) -> jax.Array:
  """`n` absolute slots from each row's `start` `[B]` -> `[B, n]`."""
  return start[:, None] + jnp.arange(n)


def _at(a: jax.Array, window: jax.Array) -> jax.Array:
  """`a` `[B, M]` read at the slots `window` `[B, n]`."""
  return jnp.take_along_axis(a, window, axis=1)


_put = jax.vmap(lambda a, i, x: a.at[i].set(x))  # `a` `[B, M]` written at `[B, n]`: row-sharded arrays update locally


def prefill(ctx: _Context, prompt: Prompt, cache: KV) -> KV:
  """One block-causal pass over each row's whole prompt blocks, their K/V written into `cache`'s first slots
  (spec §6.2) layer by layer."""
  b, w = prompt.ids.shape
  valid = jnp.arange(w)[None, :] < (ctx.first_blk * ctx.bs)[:, None]
  spec = AttentionSpec.self_attention(valid, kind="block_causal", block_size=ctx.bs)
  positions = jnp.broadcast_to(jnp.arange(w), (b, w))
  _, cache = ctx.model.decode(prompt.embeds, positions, spec, fill=kv_cache.pinned(cache, ctx.placement.cache))
  return kv_cache.pinned(cache, ctx.placement.cache)


def forward(ctx: _Context, ids: jax.Array, window: jax.Array, valid: jax.Array, cache_end: jax.Array, cache: KV,
            return_kv: bool, packed: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
  """The slots `window` `[B, n]` (their `valid` ones) against the cache slots `< cache_end` `[B]`, block-causal
  -> hidden states `[B, n, H]` (and their K/V). Prompt slots take the prompt's embeddings (images spliced; only
  those of the first denoised block are ever valid in a window), the others those of `ids` `[B, M]`. `packed`:
  the decoder computes only these of the window's `B * n` positions (`DiffusionLM.decode`)."""
  m, bs = ctx.max_len, ctx.bs
  safe = jnp.clip(window, 0, m - 1)
  tok_emb = ctx.model.embed(_at(ids, safe))
  in_tail = jnp.clip(window - (ctx.first_blk * bs)[:, None], 0, bs - 1)
  from_prompt = jnp.take_along_axis(ctx.rows.tail, in_tail[..., None], axis=1)
  x = jnp.where((window < ctx.rows.lengths[:, None])[..., None], from_prompt, tok_emb)
  spec = kv_cache.window_spec(window, valid, cache_end, m, kind="block_causal", block_size=ctx.bs)
  kw = {} if packed is None else {"packed": packed}  # a family without packing runs whenever it is off
  return ctx.model.decode(x, safe, spec, kv_cache.pinned(cache, ctx.placement.cache), return_kv=return_kv, **kw)


def block_pass(ctx: _Context, ids: jax.Array, blk: jax.Array, cache: KV, return_kv: bool
               ) -> tuple[jax.Array, KV | None]:
  """Each row's block `blk` `[B]` against its cache (the prefix before the block): hidden `[B, bs, H]`."""
  start = blk * ctx.bs
  window = _window(start, ctx.bs)
  return forward(ctx, ids, window, window < ctx.limit[:, None], start, cache, return_kv)


def commit_pass(ctx: _Context, c: _Carry, blk: jax.Array, commit: jax.Array, cache: KV) -> tuple[jax.Array, KV]:
  """`block_pass` over each row's block `blk` `[B]`; the `commit` rows `[B]` write its K/V (their block has no
  mask left: this pass over its final content is its only writer) -> hidden `[B, bs, H]`, the cache."""
  hidden, kv = block_pass(ctx, c.ids, blk, cache, True)
  return hidden, kv_cache.write(cache, kv, blk * ctx.bs, commit, ctx.placement.cache)


def batch_decisions(ctx: _Context, c: _Carry, groups: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each group of rows `groups` `[G, B]`: (how many rows it has, the most masked positions one of them has
  in its current block) `[G]` each, from one sum over the rows (a histogram of the masked counts): on a mesh, one
  all-reduce per step decides them all."""
  masked = jnp.sum(_at(c.masked, _window(c.blk * ctx.bs, ctx.bs)), axis=1)
  bins = jnp.arange(ctx.bs + 1)
  histogram = jnp.sum(groups[:, :, None] & (masked[:, None] == bins)[None], axis=1)  # [G, bs + 1]
  return jnp.sum(histogram, axis=1), jnp.max(jnp.where(histogram > 0, bins, 0), axis=1)


def denoise(ctx: _Context, c: _Carry, hidden: jax.Array, rows_on: jax.Array, widest: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One denoising decision (spec §6.4-§6.5) for the current block of the `rows_on` `[B]` rows from its hidden
  states `[B, bs, H]`, none of which has more than `widest` `[]` masked positions -> the carry's new (ids,
  masked, decoded_at)."""
  window = _window(c.blk * ctx.bs, ctx.bs)
  masked = _at(c.masked, window)
  x0, p0 = proposals(ctx, c, hidden, masked & rows_on[:, None], widest)
  scheduled = _at(ctx.rows.schedule, jnp.minimum(c.step, ctx.bs)[:, None])[:, 0]
  pick = remask.select(p0, masked & rows_on[:, None], scheduled, strategy="low_confidence_dynamic",
                       threshold=ctx.rows.threshold[:, None])
  return (_put(c.ids, window, jnp.where(pick, x0, _at(c.ids, window))),
          _put(c.masked, window, masked & ~pick),
          _put(c.decoded_at, window, jnp.where(pick, c.nfe[:, None], _at(c.decoded_at, window))))


def proposals(ctx: _Context, c: _Carry, hidden: jax.Array, masked: jax.Array, widest: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """Token and confidence `[B, bs]` at every `masked` `[B, bs]` position of the block (other positions: zeros)
  from its hidden states `[B, bs, H]`; no row has more than `widest` `[]` masked positions.

  The lm_head and the proposal run at the masked positions only. On one device the whole batch's are taken
  together as one line, so rows in different phases of their blocks (one with 8 masked positions next to one with
  1) pay for their own positions rather than each for the widest row's; on a mesh each row is a line, on its own
  device. Greedy forwards gather a line's masked positions, in order, to the narrowest of a few compiled widths
  (`widths`). A forward where a row samples gathers them for the lm_head the same way and runs its proposal over
  them `bs` at a time (`_sampled_in_chunks`): its filters and noise compile once, not at every width. A sampled
  position draws its noise from its row's key, pass and place in the block (`propose`), so its token does not
  depend on which positions share its forward."""
  b, bs = masked.shape
  lines = (lambda a: a.reshape(1, b * bs, *a.shape[2:])) if ctx.placement.mesh is None else (lambda a: a)
  most = jnp.sum(masked) if ctx.placement.mesh is None else widest  # masked positions in the fullest line
  line = _Line(lines(hidden), lines(masked), jnp.argsort(~lines(masked), axis=1, stable=True), most,
               lines(jnp.broadcast_to(jnp.arange(b)[:, None], (b, bs))),
               lines(jnp.broadcast_to(jnp.arange(bs), (b, bs))))
  if ctx.config.temperature > 0:
    greedy = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, temperature=0.0))
    x0, p0 = jax.lax.cond(sampler_common.samples(ctx.rows.keys, jnp.any(masked, axis=1)),
                          lambda: _sampled_in_chunks(ctx, c, line), lambda: _gathered(greedy, c, line))
  else:
    x0, p0 = _gathered(ctx, c, line)
  return x0.reshape(b, bs), p0.reshape(b, bs)


class _Line(NamedTuple):
  """`proposals`' positions as lines `[R, n]` (the whole batch's on one device, a row's on a mesh)."""

  hidden: jax.Array  # [R, n, H]
  masked: jax.Array  # [R, n]
  order: jax.Array  # [R, n] masked positions first, in order
  most: jax.Array  # [] masked positions in the fullest line
  row: jax.Array  # [R, n] which batch row each position is
  place: jax.Array  # [R, n] and where in the block

  def at(self, slots: jax.Array) -> "_Line":
    """The line positions `slots` `[R, w]` (`order` and `most` kept)."""
    pick = lambda a: jnp.take_along_axis(a, slots.reshape(slots.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    return self._replace(hidden=pick(self.hidden), masked=pick(self.masked), row=pick(self.row),
                         place=pick(self.place))


def _at_narrowest(ctx: _Context, line: _Line, branch: Callable[[int], Callable[[], Any]]) -> Any:
  """`branch(width)()` at the narrowest of `widths(n, bs)` that holds every line's masked positions."""
  sizes = widths(line.masked.shape[1], ctx.bs)
  return jax.lax.switch(jnp.sum(jnp.array(sizes) < line.most), [branch(w) for w in sizes])


def _gathered(ctx: _Context, c: _Carry, line: _Line) -> tuple[jax.Array, jax.Array]:
  """`proposals` of each line at its masked positions, gathered to the narrowest of `widths(n, bs)` -> tokens,
  confidences `[R, n]` (zeros elsewhere)."""

  def at(width: int) -> Callable[[], tuple[jax.Array, jax.Array]]:
    def gathered() -> tuple[jax.Array, jax.Array]:
      slots = line.order[:, :width]
      part = line.at(slots)
      x0, p0 = propose(ctx, c, ctx.model.logits(part.hidden), part)
      zeros = jnp.zeros(line.masked.shape, jnp.int32)
      return _put(zeros, slots, x0), _put(zeros.astype(p0.dtype), slots, p0)
    return gathered

  return _at_narrowest(ctx, line, at)


def _sampled_in_chunks(ctx: _Context, c: _Carry, line: _Line) -> tuple[jax.Array, jax.Array]:
  """`_gathered` for a forward where a row samples: the lm_head once over each line's masked positions gathered to
  the narrowest width that holds them (as greedy forwards do), the sampled proposal over them `bs` at a time, as
  many times as the fullest line needs (`n` is a multiple of `bs`). One compiled sampled proposal instead of one per
  width (at 8 slots: 11 widths, which took a CPU compile of the batch's sampler from 5 to 13 s); one lm_head
  product, not one per chunk (on the CPU 8-row products cost 2.2x the CPU time of one wide product over as many)."""
  n = line.masked.shape[1]

  def logits_at(width: int) -> Callable[[], jax.Array]:  # `[R, n, V]`, positions past `width` zeros (never read)
    return lambda: jnp.pad(ctx.model.logits(line.at(line.order[:, :width]).hidden), ((0, 0), (0, n - width), (0, 0)))

  logits = _at_narrowest(ctx, line, logits_at)

  def chunk(i: jax.Array, done: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    slots = jax.lax.dynamic_slice_in_dim(line.order, i * ctx.bs, ctx.bs, axis=1)
    part = line.at(slots)
    new = propose(ctx, c, jax.lax.dynamic_slice_in_dim(logits, i * ctx.bs, ctx.bs, axis=1), part)
    # the chunk's masked slots take their proposals (a line's last chunk may run past its masked positions)
    return tuple(_put(old, slots, jnp.where(part.masked, x, _at(old, slots))) for x, old in zip(new, done))

  zeros = jnp.zeros(line.masked.shape, jnp.int32), jnp.zeros(line.masked.shape, jnp.float32)
  return jax.lax.fori_loop(0, -(-line.most // ctx.bs), chunk, zeros)


def widths(n: int, bs: int | None = None) -> tuple[int, ...]:
  """The compiled widths of `proposals` over `n` positions: powers of two below the block size `bs` (default
  `n`), then multiples of it up to `n` (a batch's positions gathered together waste less than a block)."""
  bs = bs or n
  return tuple(2 ** i for i in range(bs.bit_length()) if 2 ** i < bs) + tuple(range(bs, n, bs)) + (n,)


def propose(ctx: _Context, c: _Carry, logits: jax.Array, line: _Line) -> tuple[jax.Array, jax.Array]:
  """The proposal (`sampler_common.propose`) from logits `[R, w, V]` at the line positions `line` (`_Line.at`) ->
  tokens, confidences `[R, w]`. Each position is proposed as a row of its own, with its batch row's settings and a
  key folded with (block, denoising pass, position): the same draw in either mode, whichever forward of the batch
  the pass falls in and whichever positions share the gather. Positions not `masked` (the gather's padding) decode
  greedily, so that they never take the sampled path or its filters."""
  row, place, masked = line.row, line.place, line.masked
  r, w = row.shape
  if ctx.placement.mesh is None:  # one line of the whole batch's positions
    of_row = lambda a: a[row]  # noqa: E731
  else:  # a line per row, on the row's device: no gather across the mesh
    of_row = lambda a: jnp.broadcast_to(a[:, None], (r, w))  # noqa: E731
  sampling = jax.tree.map(lambda a: of_row(a).reshape(-1), ctx.rows.keys)
  sampling = sampling._replace(temperature=jnp.where(masked.reshape(-1), sampling.temperature, 0.0))
  count = (of_row(c.blk * (ctx.bs + 1) + c.step) * ctx.bs + place).reshape(-1)
  with jax.named_scope("proposal"):  # names its ops in profiles (`benchmarks/sampling.py --split`)
    return sampler_common.propose_if_sampling(ctx.config, logits, sampling, count, masked.reshape(-1), ctx.placement)


def block_state(ctx: _Context, ids: jax.Array, masked: jax.Array, blk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(no mask left in block `blk` `[B]`, the row stops after it: EOS in its generated part or its last block)."""
  window = _window(blk * ctx.bs, ctx.bs)
  clean = ~jnp.any(_at(masked, window), axis=1)
  generated = window >= ctx.rows.lengths[:, None]
  eos = jnp.any((_at(ids, window) == ctx.model.config.eos_token_id) & generated, axis=1)
  return clean, eos | (blk == ctx.last_blk)


def report(ctx: _Context, rows: jax.Array, blk: jax.Array, ids: jax.Array) -> None:
  """Streaming only: block `blk` of the `rows` `[B]` has no mask left (its generated slots are final)."""
  if ctx.stream:
    window = _window(blk * ctx.bs, ctx.bs)
    generated = (window >= ctx.rows.lengths[:, None]) & (window < ctx.rows.end[:, None])
    streaming.emit(rows, blk - ctx.first_blk, _at(ids, window), generated, ctx.placement)


def reference_step(ctx: _Context, c: _Carry) -> _Carry:
  """One forward of the original algorithm: each row's block is denoised (its K/V dropped) or, once it has no
  mask left, committed: the pass over its final content is the only writer of its K/V."""
  active = ~c.done
  commit, denoising = active & c.pending, active & ~c.pending
  hidden, cache = commit_pass(ctx, c, c.blk, commit, c.cache)
  count, widest = batch_decisions(ctx, c, denoising[None])
  ids, masked, decoded_at = jax.lax.cond(count[0] > 0, lambda: denoise(ctx, c, hidden, denoising, widest[0]),
                                         lambda: (c.ids, c.masked, c.decoded_at))
  clean, last = block_state(ctx, ids, masked, c.blk)
  report(ctx, denoising & clean, c.blk, ids)
  stop = commit & last
  return ctx.placement.pin_loop(_Carry(cache, ids, masked, decoded_at, c.blk + (commit & ~stop),
                                       jnp.where(commit, 0, c.step + denoising),
                                       jnp.where(commit, False, c.pending | (denoising & clean)), c.done | stop,
                                       c.nfe + active, c.forwards + 1))


def fused_step(ctx: _Context, c: _Carry) -> _Carry:
  """One forward of `fused` mode: a row whose previous block is finished commits it, the others denoise their
  block. Every commit rides in the same forward as its row's next block's first denoising pass (`fused_pass`)
  when at most `packed_rows` rows commit (only their previous blocks are computed besides every row's current
  block) or at least `fused_window_share` of the active rows do (every row's window twice as wide); otherwise the
  committing rows commit alone (`commit_pass` over their previous block) and denoise from the next forward on, so
  that the other rows' forward stays one block wide. Same tokens either way."""
  active = ~c.done
  commit = active & c.pending
  counts, widest = batch_decisions(ctx, c, jnp.stack([commit, active & ~commit]))
  fuse = counts[0] >= jnp.maximum(ctx.config.fused_window_share * (counts[0] + counts[1]), 1)
  packs = packed_rows(ctx, commit.shape[0])
  pack = (counts[0] > 0) & (counts[0] <= packs)
  alone = (counts[0] > 0) & ~fuse & ~pack
  branch = jnp.where(counts[0] == 0, 0, jnp.where(pack, 3, jnp.where(fuse, 2, 1)))

  def written(result: tuple[jax.Array, KV]) -> tuple[jax.Array, KV]:  # (hidden, K/V in the cache's dtype)
    return result[0], jax.tree.map(lambda x, a: x.astype(a.dtype), result[1], c.cache)

  def nothing(cache: KV) -> KV:  # what a forward without commits hands the write (which drops it)
    return jax.tree.map(lambda a: jnp.zeros(a.shape[:2] + (ctx.bs,) + a.shape[3:], a.dtype), cache)

  branches = [lambda cache: (block_pass(ctx, c.ids, c.blk, cache, False)[0], nothing(cache)),
              lambda cache: written(block_pass(ctx, c.ids, c.blk - commit, cache, True)),
              lambda cache: written(fused_pass(ctx, c, commit, cache)),
              *([lambda cache: written(fused_pass(ctx, c, commit, cache, packs=packs))] if packs else [])]
  # The committing rows' previous blocks' K/V leave the switch and are written after it: a cache that a branch
  # wrote and returned was copied whole at every forward that took the branch (XLA:TPU, compiled for a v5e).
  hidden, committed = jax.lax.switch(branch, branches, c.cache)
  cache = kv_cache.write(c.cache, committed, (c.blk - 1) * ctx.bs, commit, ctx.placement.cache)
  denoising = active & ~(commit & alone)
  ids, masked, decoded_at = denoise(ctx, c, hidden, denoising, jnp.where(alone, widest[1], jnp.max(widest)))
  clean, last = block_state(ctx, ids, masked, c.blk)
  finished = denoising & clean
  report(ctx, finished, c.blk, ids)
  advance = finished & ~last
  return ctx.placement.pin_loop(_Carry(cache, ids, masked, decoded_at, c.blk + advance,
                                       jnp.where(advance, 0, c.step + denoising), advance,
                                       c.done | (finished & last), c.nfe + active, c.forwards + 1))


def packed_rows(ctx: _Context, b: int) -> int:
  """How many rows' commits a packed fused forward holds in a batch of `b` rows: `config.packed_commit_share` of
  them, rounded up; 0 where packing is off or does not apply: on a mesh (a packed forward mixes rows), or where
  it would hold every row (then it is the plain fused window)."""
  rows = math.ceil(ctx.config.packed_commit_share * b)
  return 0 if ctx.placement.mesh is not None or rows >= b else rows


def fused_pass(ctx: _Context, c: _Carry, commit: jax.Array, cache: KV, packs: int = 0) -> tuple[jax.Array, KV]:
  """The window `[previous block ; current block]` `[B, 2 bs]`, block-causal: the previous block's rows see the
  cache and themselves (its commit pass: same K/V, for the `commit` rows `[B]` to write), the current block sees
  those too (its denoising pass) -> the current block's hidden `[B, bs, H]` and the previous block's K/V
  `[layers, B, bs, Hkv, D]`. `packs` > 0: at most
  that many rows commit, and the decoder computes every row's current block and the previous blocks of `packs`
  rows, the committing ones first (`packing`): what the others' previous blocks would cost is not spent."""
  bs, start = ctx.bs, c.blk * ctx.bs
  window = _window(start - bs, 2 * bs)
  valid = jnp.concatenate([jnp.broadcast_to(commit[:, None], (commit.shape[0], bs)),
                           window[:, bs:] < ctx.limit[:, None]], axis=1)
  packed = packing(commit, packs, bs) if packs else None
  hidden, kv = forward(ctx, c.ids, window, valid, jnp.where(commit, start - bs, start), cache, True, packed)
  return hidden[:, bs:], jax.tree.map(lambda a: a[:, :, :bs], kv)


def packing(commit: jax.Array, packs: int, bs: int) -> jax.Array:
  """Flat positions `[(B + packs) * bs]` of a fused window `[B, 2 bs]`: the previous blocks of `packs` rows, the
  `commit` `[B]` ones first, then every row's current block."""
  rows = jnp.argsort(~commit, stable=True)[:packs]
  previous = rows[:, None] * 2 * bs + jnp.arange(bs)
  current = jnp.arange(commit.shape[0])[:, None] * 2 * bs + bs + jnp.arange(bs)
  return jnp.concatenate([previous.reshape(-1), current.reshape(-1)])


ALGORITHM = Algorithm(_Context, rows, start, chunk, outputs, _inputs)
