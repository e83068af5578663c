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

Code: `_run` makes a frozen `_Context` (what no step changes) and runs a `lax.while_loop` over a `_Carry`
whose body, `reference_step` or `fused_step`, is one forward of the batch (`block_pass` / `fused_pass`)
followed by one `denoise` decision and the `block_state` that moves each row on. What the AR sampler
shares (arguments, shardings, jit, prompt embedding, `generate`) is in `dvl_jax.diffusion.sampler_common`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.diffusion import ar_sampler, kv_cache, remask, sampler_common, streaming
from dvl_jax.diffusion.sampler_common import Algorithm, Outputs, Prompt
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig
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
  return sampler_common.generate(_algorithm(config), model, inputs, config, rng=rng, cache=cache,
                                 tokenizer=tokenizer, on_block=on_block)


def lower(model: DiffusionLM, inputs: Any, config: SamplingConfig = SamplingConfig()) -> jax.stages.Lowered:
  """The lowered sampler for these shapes (compile time, memory analysis and HLO in benchmarks and tests)."""
  return sampler_common.lower(_algorithm(config), model, inputs, config)


def _algorithm(config: SamplingConfig) -> Algorithm:
  return ar_sampler.ALGORITHM if config.algorithm == "autoregressive" else ALGORITHM


def _inputs(model: DiffusionLM, prompts: Prompts, config: SamplingConfig) -> tuple[np.ndarray, np.float32]:
  """(the schedule `[bs + 1]`, the threshold `[]`): arrays, so `steps` and the threshold need no compile.

  `num_transfer(bs, steps)` is indexed by `min(step, bs)`: a block never needs more than `bs` denoising
  passes, so entry `i` is the spec's entry `min(i, steps)`."""
  sched = remask.num_transfer(config.block_size, config.steps)
  schedule = np.array([sched[min(i, config.steps)] for i in range(config.block_size + 1)], np.int32)
  return schedule, np.float32(config.confidence_threshold)


# ---- the decoding loop ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Context:
  """What every step of one sampling call reads and none changes."""

  model: DiffusionLM
  config: SamplingConfig  # static: its `steps` / `confidence_threshold` are not used (`schedule`, `threshold`)
  placement: Placement
  stream: bool  # report every block as it becomes final (`streaming.emit`)
  max_len: int  # M, the cache's slots
  prompt: Prompt  # ids [B, W], lengths [B], embeds [B, W, H]
  limit: jax.Array  # [B] end of the decoded slots: P + G rounded up to a block, or P + G in one block
  first_blk: jax.Array  # [B] the first block to denoise (whole prompt blocks before it are prefilled)
  last_blk: jax.Array  # [B]
  keys: jax.Array  # [B] PRNG keys
  schedule: jax.Array  # [bs + 1] tokens to unmask at denoising pass `min(step, bs)`
  threshold: jax.Array  # [] confidence threshold

  @property
  def bs(self) -> int:
    return self.config.block_size


class _Carry(NamedTuple):
  cache: KV
  ids: jax.Array  # [B, M] ids by absolute index: prompt, decoded tokens, the mask id elsewhere
  masked: jax.Array  # [B, M] positions still to decode
  decoded_at: jax.Array  # [B, M] the row's decoding forward that fixed the token, -1
  blk: jax.Array  # [B] block being denoised
  step: jax.Array  # [B] denoising passes done in it
  pending: jax.Array  # [B] a finished block awaits its commit (reference: `blk`; fused: `blk - 1`)
  done: jax.Array  # [B] (dead padding rows start done)
  nfe: jax.Array  # [B] decoding forwards of the row
  forwards: jax.Array  # [] decoding forwards of the batch


def _run(model: DiffusionLM, config: SamplingConfig, cache: KV, prompt: Prompt, keys: jax.Array,
         inputs: tuple[jax.Array, jax.Array], *, placement: Placement, stream: bool) -> tuple[Outputs, KV]:
  """The embedded prompt -> tokens `[B, G]` and statistics; the cache goes through. `inputs`: `_inputs`."""
  ctx = _context(model, config, cache, prompt, keys, *inputs, placement=placement, stream=stream)
  prefilled = ctx.first_blk > 0
  cache = jax.lax.cond(jnp.any(prefilled), functools.partial(prefill, ctx), lambda c: c, cache)
  step = fused_step if config.mode == "fused" else reference_step
  init = _start(ctx, cache)
  with jax.named_scope("decode_loop"):  # names the loop in profiles and HLO
    c = jax.lax.while_loop(lambda c: jnp.any(~c.done), functools.partial(step, ctx), init)
  out_slots = prompt.lengths[:, None] + jnp.arange(config.gen_length)
  out = {
      "tokens": _at(c.ids, out_slots),
      "decoded": jnp.sum(~_at(c.masked, out_slots), axis=1),
      "steps": _at(c.decoded_at, out_slots),
      "nfe": c.nfe + prefilled,
      "forwards": c.forwards + jnp.any(prefilled),
  }
  return out, c.cache


def _context(model: DiffusionLM, config: SamplingConfig, cache: KV, prompt: Prompt, keys: jax.Array,
             schedule: jax.Array, threshold: jax.Array, *, placement: Placement, stream: bool) -> _Context:
  bs, end = config.block_size, prompt.lengths + config.gen_length
  limit = jnp.where(end <= bs, end, -(-end // bs) * bs)  # spec §6.1
  return _Context(model, config, placement, stream, cache[0].shape[2], prompt, limit, prompt.lengths // bs,
                  (limit - 1) // bs, keys, schedule, threshold)


def _start(ctx: _Context, cache: KV) -> _Carry:
  """Every row at its first block: the prompt ids, the mask id elsewhere, slots `[P, limit)` to decode."""
  mask_id = ctx.model.config.mask_token_id
  b, w = ctx.prompt.ids.shape
  plen, slots = ctx.prompt.lengths[:, None], jnp.arange(ctx.max_len)[None, :]
  ids = jnp.full((b, ctx.max_len), mask_id, jnp.int32).at[:, :w].set(ctx.prompt.ids)
  ids = jnp.where(slots < plen, ids, mask_id)
  masked = (slots >= plen) & (slots < ctx.limit[:, None])
  zeros = jnp.zeros((b,), jnp.int32)
  return ctx.placement.pin_loop(_Carry(cache, ids, masked, jnp.full((b, ctx.max_len), -1, jnp.int32), ctx.first_blk,
                                       zeros, zeros.astype(bool), ctx.prompt.lengths == 0, zeros,
                                       jnp.zeros((), jnp.int32)))


def _window(start: jax.Array, n: int) -> jax.Array:
  """`n` absolute slots from each row's `start` `[B]` -> `[B, n]`."""
  return start[:, None] + jnp.arange(n)


def _at(a: jax.Array, window: jax.Array) -> jax.Array:
  """`a` `[B, M]` read at the slots `window` `[B, n]`."""
  return jnp.take_along_axis(a, window, axis=1)


_put = jax.vmap(lambda a, i, x: a.at[i].set(x))  # `a` `[B, M]` written at `[B, n]`: row-sharded arrays update locally


def prefill(ctx: _Context, cache: KV) -> KV:
  """One block-causal pass over each row's whole prompt blocks writes their K/V (spec §6.2)."""
  b, w = ctx.prompt.ids.shape
  valid = jnp.arange(w)[None, :] < (ctx.first_blk * ctx.bs)[:, None]
  spec = AttentionSpec.self_attention(valid, kind="block_causal", block_size=ctx.bs)
  _, kv = ctx.model.decode(ctx.prompt.embeds, jnp.broadcast_to(jnp.arange(w), (b, w)), spec, return_kv=True)
  return kv_cache.write_prefix(cache, kv, ctx.placement.cache)


def forward(ctx: _Context, ids: jax.Array, window: jax.Array, valid: jax.Array, cache_end: jax.Array, cache: KV,
            return_kv: bool) -> tuple[jax.Array, KV | None]:
  """The slots `window` `[B, n]` (their `valid` ones) against the cache slots `< cache_end` `[B]`, block-causal
  -> hidden states `[B, n, H]` (and their K/V). Prompt slots take the prompt's embeddings (images spliced),
  the others those of `ids` `[B, M]`."""
  m, w = ctx.max_len, ctx.prompt.ids.shape[1]
  safe = jnp.clip(window, 0, m - 1)
  tok_emb = ctx.model.embed(_at(ids, safe))
  from_prompt = jnp.take_along_axis(ctx.prompt.embeds, jnp.clip(window, 0, w - 1)[..., None], axis=1)
  x = jnp.where((window < ctx.prompt.lengths[:, None])[..., None], from_prompt, tok_emb)
  spec = kv_cache.window_spec(window, valid, cache_end, m, kind="block_causal", block_size=ctx.bs)
  return ctx.model.decode(x, safe, spec, kv_cache.pinned(cache, ctx.placement.cache), return_kv=return_kv)


def block_pass(ctx: _Context, c: _Carry, cache: KV, return_kv: bool) -> tuple[jax.Array, KV | None]:
  """Each row's current block against its cache (the prefix before the block): hidden `[B, bs, H]`."""
  start = c.blk * ctx.bs
  window = _window(start, ctx.bs)
  return forward(ctx, c.ids, window, window < ctx.limit[:, None], start, cache, return_kv)


def denoise(ctx: _Context, c: _Carry, hidden: jax.Array, rows_on: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One denoising decision (spec §6.4-§6.5) for the current block of the `rows_on` `[B]` rows from its hidden
  states `[B, bs, H]` -> the carry's new (ids, masked, decoded_at)."""
  window = _window(c.blk * ctx.bs, ctx.bs)
  x0, p0 = sampler_common.propose(ctx.config, ctx.model.logits(hidden), ctx.keys, c.nfe)
  masked = _at(c.masked, window)
  pick = remask.select(p0, masked & rows_on[:, None], ctx.schedule[jnp.minimum(c.step, ctx.bs)],
                       strategy=ctx.config.remasking_strategy, threshold=ctx.threshold)
  return (_put(c.ids, window, jnp.where(pick, x0, _at(c.ids, window))),
          _put(c.masked, window, masked & ~pick),
          _put(c.decoded_at, window, jnp.where(pick, c.nfe[:, None], _at(c.decoded_at, window))))


def block_state(ctx: _Context, ids: jax.Array, masked: jax.Array, blk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(no mask left in block `blk` `[B]`, the row stops after it: EOS in its generated part or its last block)."""
  window = _window(blk * ctx.bs, ctx.bs)
  clean = ~jnp.any(_at(masked, window), axis=1)
  generated = window >= ctx.prompt.lengths[:, None]
  eos = jnp.any((_at(ids, window) == ctx.model.config.eos_token_id) & generated, axis=1)
  return clean, eos | (blk == ctx.last_blk)


def report(ctx: _Context, rows: jax.Array, blk: jax.Array, ids: jax.Array) -> None:
  """Streaming only: block `blk` of the `rows` `[B]` has no mask left (its generated slots are final)."""
  if ctx.stream:
    window = _window(blk * ctx.bs, ctx.bs)
    plen = ctx.prompt.lengths[:, None]
    generated = (window >= plen) & (window < plen + ctx.config.gen_length)
    streaming.emit(rows, blk - ctx.first_blk, _at(ids, window), generated, ctx.placement)


def reference_step(ctx: _Context, c: _Carry) -> _Carry:
  """One forward of the original algorithm: each row's block is denoised (its K/V dropped) or, once it has no
  mask left, committed: the pass over its final content is the only writer of its K/V."""
  active = ~c.done
  hidden, kv = block_pass(ctx, c, c.cache, True)
  commit, denoising = active & c.pending, active & ~c.pending
  cache = kv_cache.write(c.cache, kv, c.blk * ctx.bs, commit, ctx.placement.cache)
  ids, masked, decoded_at = jax.lax.cond(jnp.any(denoising), lambda: denoise(ctx, c, hidden, denoising),
                                         lambda: (c.ids, c.masked, c.decoded_at))
  clean, last = block_state(ctx, ids, masked, c.blk)
  report(ctx, denoising & clean, c.blk, ids)
  stop = commit & last
  return ctx.placement.pin_loop(_Carry(cache, ids, masked, decoded_at, c.blk + (commit & ~stop),
                                       jnp.where(commit, 0, c.step + denoising),
                                       jnp.where(commit, False, c.pending | (denoising & clean)), c.done | stop,
                                       c.nfe + active, c.forwards + 1))


def fused_step(ctx: _Context, c: _Carry) -> _Carry:
  """One forward of `fused` mode: every row denoises its block, and a row whose previous block is finished
  commits it in the same forward (`fused_pass`)."""
  active = ~c.done
  commit = active & c.pending
  hidden, cache = jax.lax.cond(jnp.any(commit), functools.partial(fused_pass, ctx, c, commit),
                               lambda cache: (block_pass(ctx, c, cache, False)[0], cache), c.cache)
  ids, masked, decoded_at = denoise(ctx, c, hidden, active)
  clean, last = block_state(ctx, ids, masked, c.blk)
  finished = active & clean
  report(ctx, finished, c.blk, ids)
  advance = finished & ~last
  return ctx.placement.pin_loop(_Carry(cache, ids, masked, decoded_at, c.blk + advance,
                                       jnp.where(advance, 0, c.step + active), advance,
                                       c.done | (finished & last), c.nfe + active, c.forwards + 1))


def fused_pass(ctx: _Context, c: _Carry, commit: jax.Array, cache: KV) -> tuple[jax.Array, KV]:
  """The window `[previous block ; current block]` `[B, 2 bs]`, block-causal: the previous block's rows see the
  cache and themselves (its commit pass: same K/V, written for the `commit` rows `[B]`), the current block sees
  those too (its denoising pass) -> the current block's hidden `[B, bs, H]` and the cache."""
  bs, start = ctx.bs, c.blk * ctx.bs
  window = _window(start - bs, 2 * bs)
  valid = jnp.concatenate([jnp.broadcast_to(commit[:, None], (commit.shape[0], bs)),
                           window[:, bs:] < ctx.limit[:, None]], axis=1)
  hidden, kv = forward(ctx, c.ids, window, valid, jnp.where(commit, start - bs, start), cache, True)
  previous = jax.tree.map(lambda a: a[:, :, :bs], kv)
  return hidden[:, bs:], kv_cache.write(cache, previous, start - bs, commit, ctx.placement.cache)


ALGORITHM = Algorithm(_run, _inputs, per_row=False)
