"""Autoregressive decoding of the same model with the KV cache: the in-stack speed baseline.

In `mrope` mode it is the source Qwen2.5-VL model's own decoding: prompt positions from
`get_rope_index` (host), then each new token at `max prompt position + 1 + t` in all three rows (the
"rope delta" of transformers); greedy output equals transformers' `generate` token for token.
Rows have their own prompt lengths (cache slot = absolute index) and stop at their own EOS; a
finished row is frozen and padded with the pad id. Streaming (`on_block`) reports pieces of up to
`block_size` tokens: each time a row reaches a multiple of it, its EOS or `gen_length`.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.diffusion import kv_cache, remask, streaming
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig
from dvl_jax.models.rope import get_rope_index
from dvl_jax.models.interface import KV
from dvl_jax.diffusion.sampling_mesh import Placement, jit_sampler

TRACES: collections.Counter = collections.Counter()


def generate(model: nnx.Module, inputs: Any, config: SamplingConfig, *, rng: jax.Array | None = None,
             cache: KV | None = None, tokenizer: Any = None,
             on_block: streaming.OnBlock | None = None) -> GenerateOutput:
  """Greedy (temperature 0) or sampled AR decoding of `config.gen_length` tokens (see `sampler.generate`)."""
  config = config.resolve(model.config)
  run, args, batch = _arguments(model, inputs, config, rng, cache, stream=on_block is not None)
  out, cache = streaming.call(run, args, on_block, batch)
  return GenerateOutput.build(out["tokens"], out["nfe"], out["nfe"], out["forwards"], out["steps"],
                              model.config.eos_token_id, tokenizer, cache, batch=batch)


def lower(model: nnx.Module, inputs: Any, config: SamplingConfig) -> jax.stages.Lowered:
  config = config.resolve(model.config)
  run, args, _ = _arguments(model, inputs, config, None, None)
  return run.lower(*args)


def _arguments(model: nnx.Module, inputs: Any, config: SamplingConfig, rng: jax.Array | None,
               cache: KV | None, stream: bool = False) -> tuple[Any, tuple, int]:
  """(the jitted sampler for the model's placement, its arguments, the number of real rows)."""
  cfg = model.config
  prompts = Prompts.coerce(inputs).bucketed(config, cfg)
  b, w = prompts.ids.shape
  real = np.arange(w) < prompts.lengths[:, None]
  if config.positions == "mrope":
    grid = None if prompts.image_grid_thw is None else np.asarray(prompts.image_grid_thw)
    if prompts.pixel_values is not None and grid is None:
      raise ValueError("positions='mrope' with images needs image_grid_thw")
    positions, _ = get_rope_index(prompts.ids, grid, real.astype(np.int64), image_token_id=cfg.image_token_id,
                                  vision_start_token_id=cfg.vision_start_token_id,
                                  spatial_merge_size=cfg.vision.spatial_merge_size)
    next_position = (np.where(real, positions, -1).max(axis=(0, 2)) + 1).astype(np.int32)
  else:
    positions = np.broadcast_to(np.arange(w), (b, w))
    next_position = prompts.lengths
  graphdef, state = nnx.split(model)
  place = Placement.of(cfg, state)
  cache = kv_cache.checked(cache, cfg, place.batch(b), config.cache_len(w), place.cache)
  rows_first = np.asarray(positions, np.int32).swapaxes(0, positions.ndim - 2)  # [B, W] or [B, 3, W]
  args = (graphdef, config, state, cache, place.pad_rows(prompts.ids, fill=cfg.pad_token_id),
          place.pad_rows(prompts.lengths), place.pad_rows(rows_first), place.pad_rows(next_position),
          prompts.pixel_values, prompts.vision, place.pad_keys(remask.row_keys(rng, b)))
  return jit_sampler(_run_streaming if stream else _run, place, _shardings), args, b


def _shardings(place: Placement) -> dict[str, Any]:
  rows, rep = place.rows, place.replicated
  outputs = {"tokens": rows, "nfe": rows, "forwards": rep, "steps": rows}
  return {"in_shardings": (place.param_shardings, place.cache, rows, rows, rows, rows, rep, rep, rows),
          "out_shardings": (outputs, place.cache)}


def _run(graphdef: Any, config: SamplingConfig, state: Any, cache: KV, ids: jax.Array, lengths: jax.Array,
         positions: jax.Array, next_position: jax.Array, pixel_values: Any, vision: Any, keys: jax.Array, *,
         placement: Placement, stream: bool = False) -> tuple[dict[str, jax.Array], KV]:
  """ids `[B, W]`, lengths `[B]` (0: a dead padding row), positions `[B, W]` or `[B, 3, W]` (rows first, so
  one row sharding fits both), next_position `[B]` -> tokens `[B, G]` and statistics. `stream`: report
  pieces of tokens as they are produced (`streaming.emit`)."""
  TRACES["autoregressive_streaming" if stream else "autoregressive"] += 1
  model = nnx.merge(graphdef, placement.constrain_params(state))
  positions = jnp.swapaxes(positions, 0, positions.ndim - 2)  # the model's [B, W] or [3, B, W]
  pad_id, eos_id = model.config.pad_token_id, model.config.eos_token_id
  b, w = ids.shape
  m, gen = cache[0].shape[2], config.gen_length
  propose = functools.partial(remask.propose, temperature=config.temperature, top_k=config.top_k,
                              top_p=config.top_p)
  plen = lengths.astype(jnp.int32)
  features = None if pixel_values is None else model.image_features(placement.constrain_patches(pixel_values),
                                                                     vision)
  spec = AttentionSpec.self_attention(jnp.arange(w)[None, :] < plen[:, None], kind="causal")
  hidden, kv = model.decode(model.embed(ids, features), positions, spec, return_kv=True)
  cache = kv_cache.write_prefix(cache, kv, placement.cache)
  last = jnp.take_along_axis(hidden, (plen - 1)[:, None, None], axis=1)  # logits only where needed
  first, _ = propose(model.logits(last), jax.vmap(jax.random.fold_in)(keys, jnp.zeros((b,), jnp.int32)))
  tokens = jnp.full((b, gen), pad_id, jnp.int32).at[:, 0].set(first[:, 0])

  def report(rows: jax.Array, t: jax.Array, tokens: jax.Array) -> None:
    """Streaming only: the `rows` end their piece (of `block_size` tokens) at token `t`."""
    if stream:
      bs = config.block_size
      win = (t // bs) * bs + jnp.arange(bs)
      streaming.emit(rows, jnp.broadcast_to(t // bs, (b,)), tokens[:, jnp.minimum(win, gen - 1)],
                     jnp.broadcast_to(win <= t, (b, bs)), placement)

  report((plen > 0) & ((first[:, 0] == eos_id) | (gen == 1)), jnp.int32(0), tokens)

  def step(carry):
    cache, tokens, t, done, nfe = carry
    active = ~done
    slot = plen + t - 1  # the previous token's absolute index: its K/V are written there
    pos = (next_position + t - 1)[:, None]
    if positions.ndim == 3:
      pos = jnp.broadcast_to(pos[None], (3, b, 1))
    x = model.embed(jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1))
    spec = kv_cache.window_spec(slot[:, None], jnp.ones((b, 1), bool), slot, m, kind="causal")
    hidden, kv = model.decode(x, pos, spec, kv_cache.pinned(cache, placement.cache), return_kv=True)
    cache = kv_cache.write(cache, kv, slot, active, placement.cache)
    tok, _ = propose(model.logits(hidden), jax.vmap(jax.random.fold_in)(keys, nfe))
    new = jnp.where(active, tok[:, 0], pad_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], t, axis=1)
    report(active & (((t + 1) % config.block_size == 0) | (new == eos_id) | (t + 1 == gen)), t, tokens)
    return placement.pin_loop(cache, tokens, t + 1, done | (active & (new == eos_id)), nfe + active)

  init = placement.pin_loop(cache, tokens, jnp.int32(1), (tokens[:, 0] == eos_id) | (plen == 0),
                            jnp.ones((b,), jnp.int32))
  with jax.named_scope("decode_loop"):  # names the loop in profiles and HLO
    cache, tokens, t, _, nfe = jax.lax.while_loop(lambda c: (c[2] < gen) & jnp.any(~c[3]), step, init)
  produced = jnp.arange(gen)[None, :] < nfe[:, None]
  out = {"tokens": tokens, "nfe": nfe, "forwards": t, "steps": jnp.where(produced, jnp.arange(gen), -1)}
  return out, cache


_run_streaming = functools.partial(_run, stream=True)  # one object: `jit_sampler` caches by it
