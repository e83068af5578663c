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
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.diffusion import ar_sampler, kv_cache, remask, streaming
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig
from dvl_jax.models.interface import KV
from dvl_jax.diffusion.sampling_mesh import Placement, jit_sampler

TRACES: collections.Counter = collections.Counter()  # traces per sampler: a recompile shows up here


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


def generate(model: nnx.Module, inputs: Any, config: SamplingConfig = SamplingConfig(), *,
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
  config = config.resolve(model.config)
  if config.algorithm == "autoregressive":
    return ar_sampler.generate(model, inputs, config, rng=rng, cache=cache, tokenizer=tokenizer,
                               on_block=on_block)
  run, args, batch = _arguments(model, inputs, config, rng, cache, stream=on_block is not None)
  out, cache = streaming.call(run, args, on_block, batch)
  return GenerateOutput.build(out["tokens"], out["decoded"], out["nfe"], out["forwards"], out["steps"],
                              model.config.eos_token_id, tokenizer, cache, batch=batch)


def lower(model: nnx.Module, inputs: Any, config: SamplingConfig = SamplingConfig()) -> jax.stages.Lowered:
  """The lowered sampler for these shapes (compile time, memory analysis and HLO in benchmarks and tests)."""
  config = config.resolve(model.config)
  if config.algorithm == "autoregressive":
    return ar_sampler.lower(model, inputs, config)
  run, args, _ = _arguments(model, inputs, config, None, None)
  return run.lower(*args)


def _arguments(model: nnx.Module, inputs: Any, config: SamplingConfig, rng: jax.Array | None,
               cache: KV | None, stream: bool = False) -> tuple[Any, tuple, int]:
  """(the jitted sampler for the model's placement, its arguments, the number of real rows)."""
  prompts = Prompts.coerce(inputs).bucketed(config, model.config)
  graphdef, state = nnx.split(model)
  place = Placement.of(model.config, state)
  b, w = prompts.ids.shape
  cache = kv_cache.checked(cache, model.config, place.batch(b), config.cache_len(w), place.cache)
  args = (graphdef, _static(config), state, cache, place.pad_rows(prompts.ids, fill=model.config.pad_token_id),
          place.pad_rows(prompts.lengths), prompts.pixel_values, prompts.vision,
          place.pad_keys(remask.row_keys(rng, b)), _schedule(config), np.float32(config.confidence_threshold))
  return jit_sampler(_run_streaming if stream else _run, place, _shardings), args, b


def _shardings(place: Placement) -> dict[str, Any]:
  rows, rep = place.rows, place.replicated
  outputs = {"tokens": rows, "decoded": rows, "steps": rows, "nfe": rows, "forwards": rep}
  return {"in_shardings": (place.param_shardings, place.cache, rows, rows, rep, rep, rows, rep, rep),
          "out_shardings": (outputs, place.cache)}


def _schedule(config: SamplingConfig) -> np.ndarray:
  """`num_transfer(bs, steps)` as a `[bs + 1]` array indexed by `min(step, bs)`: a block never needs more
  than `bs` denoising passes, so entry `i` is the spec's entry `min(i, steps)` and `steps` needs no compile."""
  sched = remask.num_transfer(config.block_size, config.steps)
  return np.array([sched[min(i, config.steps)] for i in range(config.block_size + 1)], np.int32)


def _static(config: SamplingConfig) -> SamplingConfig:
  """The compile key: `steps` and `confidence_threshold` travel as arrays, so sweeping them reuses one compile."""
  return dataclasses.replace(config, steps=1, confidence_threshold=0.5)


def _run(graphdef: Any, config: SamplingConfig, state: Any, cache: KV, ids: jax.Array, lengths: jax.Array,
         pixel_values: Any, vision: Any, keys: jax.Array, schedule: jax.Array, threshold: jax.Array, *,
         placement: Placement, stream: bool = False) -> tuple[dict[str, jax.Array], KV]:
  """ids `[B, W]`, lengths `[B]` (0: a dead padding row), keys `[B]`, schedule `[bs + 1]`, threshold `[]` ->
  tokens `[B, G]` and statistics; the cache goes through. `config.steps` / `config.confidence_threshold` are
  not used here. `stream`: report every block as it becomes final (`streaming.emit`)."""
  TRACES["block_diffusion_streaming" if stream else "block_diffusion"] += 1
  model = nnx.merge(graphdef, placement.constrain_params(state))
  mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
  bs, gen = config.block_size, config.gen_length
  b, w = ids.shape
  m = cache[0].shape[2]
  put = jax.vmap(lambda a, i, x: a.at[i].set(x))  # per-row scatter: row-sharded arrays update locally
  features = None if pixel_values is None else model.image_features(placement.constrain_patches(pixel_values),
                                                                     vision)
  prompt_emb = model.embed(ids, features)  # images spliced; prompt-tail embeddings are read from here
  plen = lengths.astype(jnp.int32)
  limit = jnp.where(plen + gen <= bs, plen + gen, -(-(plen + gen) // bs) * bs)  # spec §6.1
  first_blk, last_blk = plen // bs, (limit - 1) // bs
  slots = jnp.arange(m)[None, :]
  all_ids = jnp.full((b, m), mask_id, jnp.int32).at[:, :w].set(ids)
  all_ids = jnp.where(slots < plen[:, None], all_ids, mask_id)
  masked = (slots >= plen[:, None]) & (slots < limit[:, None])

  def prefill(cache: KV) -> KV:
    valid = jnp.arange(w)[None, :] < (first_blk * bs)[:, None]
    spec = AttentionSpec.self_attention(valid, kind="block_causal", block_size=bs)
    _, kv = model.decode(prompt_emb, jnp.broadcast_to(jnp.arange(w), (b, w)), spec, return_kv=True)
    return kv_cache.write_prefix(cache, kv, placement.cache)

  has_prefill = first_blk > 0
  cache = jax.lax.cond(jnp.any(has_prefill), prefill, lambda c: c, cache)

  def window(start: jax.Array, n: int) -> jax.Array:
    return start[:, None] + jnp.arange(n)

  def forward(ids: jax.Array, win: jax.Array, valid: jax.Array, cache_end: jax.Array, cache: KV,
              return_kv: bool) -> tuple[jax.Array, KV | None]:
    """The window `win` `[B, n]` (absolute slots) against the valid cache, block-causal."""
    safe = jnp.clip(win, 0, m - 1)
    tok_emb = model.embed(jnp.take_along_axis(ids, safe, axis=1))
    from_prompt = jnp.take_along_axis(prompt_emb, jnp.clip(win, 0, w - 1)[..., None], axis=1)
    x = jnp.where((win < plen[:, None])[..., None], from_prompt, tok_emb)
    spec = kv_cache.window_spec(win, valid, cache_end, m, kind="block_causal", block_size=bs)
    return model.decode(x, safe, spec, kv_cache.pinned(cache, placement.cache), return_kv=return_kv)

  def denoise(c: _Carry, hidden: jax.Array, rows_on: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One denoising decision for the current block of the `rows_on` rows (spec §6.4-§6.5)."""
    win = window(c.blk * bs, bs)
    step_keys = jax.vmap(jax.random.fold_in)(keys, c.nfe)
    x0, p0 = remask.propose(model.logits(hidden), step_keys, temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p)
    masked_w = jnp.take_along_axis(c.masked, win, axis=1)
    pick = remask.select(p0, masked_w & rows_on[:, None], schedule[jnp.minimum(c.step, bs)],
                         strategy=config.remasking_strategy, threshold=threshold)
    ids = put(c.ids, win, jnp.where(pick, x0, jnp.take_along_axis(c.ids, win, axis=1)))
    masked = put(c.masked, win, masked_w & ~pick)
    decoded_at = put(c.decoded_at, win,
                     jnp.where(pick, c.nfe[:, None], jnp.take_along_axis(c.decoded_at, win, axis=1)))
    return ids, masked, decoded_at

  def block_state(ids: jax.Array, masked: jax.Array, blk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(no mask left in block `blk`, the row stops after it: EOS in its generated part or last block)."""
    win = window(blk * bs, bs)
    clean = ~jnp.any(jnp.take_along_axis(masked, win, axis=1), axis=1)
    eos = jnp.any((jnp.take_along_axis(ids, win, axis=1) == eos_id) & (win >= plen[:, None]), axis=1)
    return clean, eos | (blk == last_blk)

  def report(rows: jax.Array, blk: jax.Array, ids: jax.Array) -> None:
    """Streaming only: block `blk` of the `rows` has no mask left (its generated slots are final)."""
    if stream:
      win = window(blk * bs, bs)
      generated = (win >= plen[:, None]) & (win < (plen + gen)[:, None])
      streaming.emit(rows, blk - first_blk, jnp.take_along_axis(ids, win, axis=1), generated, placement)

  def reference_step(c: _Carry) -> _Carry:
    active = ~c.done
    start = c.blk * bs
    win = window(start, bs)
    hidden, kv = forward(c.ids, win, win < limit[:, None], start, c.cache, True)
    commit, denoising = active & c.pending, active & ~c.pending
    cache = kv_cache.write(c.cache, kv, start, commit, placement.cache)
    ids, masked, decoded_at = jax.lax.cond(jnp.any(denoising), lambda: denoise(c, hidden, denoising),
                                           lambda: (c.ids, c.masked, c.decoded_at))
    clean, last = block_state(ids, masked, c.blk)
    report(denoising & clean, c.blk, ids)
    stop = commit & last
    return _Carry(*placement.pin_loop(cache, ids, masked, decoded_at, c.blk + (commit & ~stop),
                                      jnp.where(commit, 0, c.step + denoising),
                                      jnp.where(commit, False, c.pending | (denoising & clean)), c.done | stop,
                                      c.nfe + active, c.forwards + 1))

  def fused_step(c: _Carry) -> _Carry:
    active = ~c.done
    start = c.blk * bs
    commit = active & c.pending

    def with_commit(cache: KV) -> tuple[jax.Array, KV]:
      win = window(start - bs, 2 * bs)
      valid = jnp.concatenate([jnp.broadcast_to(commit[:, None], (b, bs)), win[:, bs:] < limit[:, None]], axis=1)
      hidden, kv = forward(c.ids, win, valid, jnp.where(commit, start - bs, start), cache, True)
      return hidden[:, bs:], kv_cache.write(cache, jax.tree.map(lambda a: a[:, :, :bs], kv), start - bs, commit,
                                          placement.cache)

    def without_commit(cache: KV) -> tuple[jax.Array, KV]:
      win = window(start, bs)
      return forward(c.ids, win, win < limit[:, None], start, cache, False)[0], cache

    hidden, cache = jax.lax.cond(jnp.any(commit), with_commit, without_commit, c.cache)
    ids, masked, decoded_at = denoise(c, hidden, active)
    clean, last = block_state(ids, masked, c.blk)
    finished = active & clean
    report(finished, c.blk, ids)
    advance = finished & ~last
    return _Carry(*placement.pin_loop(cache, ids, masked, decoded_at, c.blk + advance,
                                      jnp.where(advance, 0, c.step + active), advance, c.done | (finished & last),
                                      c.nfe + active, c.forwards + 1))

  zeros = jnp.zeros((b,), jnp.int32)
  init = _Carry(*placement.pin_loop(cache, all_ids, masked, jnp.full((b, m), -1, jnp.int32), first_blk, zeros,
                                    zeros.astype(bool), plen == 0, zeros, jnp.zeros((), jnp.int32)))
  step_fn = fused_step if config.mode == "fused" else reference_step
  with jax.named_scope("decode_loop"):  # names the loop in profiles and HLO
    c = jax.lax.while_loop(lambda c: jnp.any(~c.done), step_fn, init)
  out_slots = plen[:, None] + jnp.arange(gen)
  out = {
      "tokens": jnp.take_along_axis(c.ids, out_slots, axis=1),
      "decoded": jnp.sum(~jnp.take_along_axis(c.masked, out_slots, axis=1), axis=1),
      "steps": jnp.take_along_axis(c.decoded_at, out_slots, axis=1),
      "nfe": c.nfe + has_prefill,
      "forwards": c.forwards + jnp.any(has_prefill),
  }
  return out, c.cache


_run_streaming = functools.partial(_run, stream=True)  # one object: `jit_sampler` caches by it
