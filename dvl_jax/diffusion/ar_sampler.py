"""Autoregressive decoding of the same model with the KV cache: the in-stack speed baseline.

In `mrope` mode it is the source Qwen2.5-VL model's own decoding: prompt positions from
`model.positions(..., "mrope")` (host), then each new token at `max prompt position + 1 + t` in all three
rows (the "rope delta" of transformers); greedy output equals transformers' `generate` token for token.
Rows have their own prompt lengths (cache slot = absolute index) and stop at their own EOS; a
finished row is frozen and padded with the pad id. Streaming (`on_block`) reports pieces of up to
`block_size` tokens: each time a row reaches a multiple of it, its EOS or `gen_length`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.diffusion import kv_cache, sampler_common, streaming
from dvl_jax.diffusion.sampler_common import Algorithm, Outputs, Prompt
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig
from dvl_jax.diffusion.sampling_mesh import Placement
from dvl_jax.models.interface import KV, DiffusionLM

TRACES = sampler_common.TRACES  # traces per algorithm (both samplers): a recompile shows up here


def generate(model: DiffusionLM, inputs: Any, config: SamplingConfig, **options: Any) -> GenerateOutput:
  """Greedy (temperature 0) or sampled AR decoding of `config.gen_length` tokens (`options`: see
  `sampler.generate`)."""
  return sampler_common.generate(ALGORITHM, model, inputs, config, **options)


def lower(model: DiffusionLM, inputs: Any, config: SamplingConfig) -> jax.stages.Lowered:
  return sampler_common.lower(ALGORITHM, model, inputs, config)


def _inputs(model: DiffusionLM, prompts: Prompts, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
  """(prompt positions rows first, `[B, W]` flat or `[B, 3, W]` M-RoPE, so that one row sharding fits both;
  each row's first generated position `[B]`)."""
  b, w = prompts.ids.shape
  if config.positions == "mrope" and prompts.pixel_values is not None and prompts.image_grid_thw is None:
    raise ValueError("positions='mrope' with images needs image_grid_thw")
  real = np.arange(w) < prompts.lengths[:, None]
  positions = np.asarray(model.positions(prompts.ids, prompts.image_grid_thw, real.astype(np.int32),
                                         config.positions), np.int32)  # [B, W] or [3, B, W]
  next_position = np.where(real, positions, -1).reshape(-1, b, w).max(axis=(0, 2)) + 1
  return np.moveaxis(positions, -2, 0), next_position.astype(np.int32)


# ---- the decoding loop ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Context:
  """What every step of one sampling call reads and none changes."""

  model: DiffusionLM
  config: SamplingConfig  # static
  placement: Placement
  stream: bool  # report pieces as they are produced (`streaming.emit`)
  max_len: int  # M, the cache's slots
  lengths: jax.Array  # [B] prompt lengths
  next_position: jax.Array  # [B] position of the first generated token
  mrope: bool  # positions are [3, B, n], else [B, n]
  keys: jax.Array  # [B] PRNG keys


class _Carry(NamedTuple):
  cache: KV
  tokens: jax.Array  # [B, G] generated tokens, the pad id after a row's end
  t: jax.Array  # [] tokens produced (the one being fed back is `t - 1`)
  done: jax.Array  # [B] (dead padding rows start done)
  nfe: jax.Array  # [B] forwards of the row, prefill included


def _run(model: DiffusionLM, config: SamplingConfig, cache: KV, prompt: Prompt, keys: jax.Array,
         inputs: tuple[jax.Array, jax.Array], *, placement: Placement, stream: bool) -> tuple[Outputs, KV]:
  """The embedded prompt -> tokens `[B, G]` and statistics; the cache goes through. `inputs`: `_inputs`."""
  positions, next_position = inputs
  positions = jnp.moveaxis(positions, 0, -2)  # the model's [B, W] or [3, B, W]
  ctx = _Context(model, config, placement, stream, cache[0].shape[2], prompt.lengths, next_position,
                 positions.ndim == 3, keys)
  init = prefill(ctx, cache, prompt, positions)
  with jax.named_scope("decode_loop"):  # names the loop in profiles and HLO
    c = jax.lax.while_loop(lambda c: (c.t < config.gen_length) & jnp.any(~c.done), functools.partial(step, ctx), init)
  produced = jnp.arange(config.gen_length)[None, :] < c.nfe[:, None]
  out = {"tokens": c.tokens, "decoded": c.nfe, "nfe": c.nfe, "forwards": c.t,
         "steps": jnp.where(produced, jnp.arange(config.gen_length), -1)}
  return out, c.cache


def prefill(ctx: _Context, cache: KV, prompt: Prompt, positions: jax.Array) -> _Carry:
  """One causal pass over the prompt writes its K/V and gives each row its first token (logits only at the
  prompt's last position): the loop's first carry."""
  cfg, gen = ctx.model.config, ctx.config.gen_length
  b, w = prompt.ids.shape
  spec = AttentionSpec.self_attention(jnp.arange(w)[None, :] < ctx.lengths[:, None], kind="causal")
  hidden, kv = ctx.model.decode(prompt.embeds, positions, spec, return_kv=True)
  cache = kv_cache.write_prefix(cache, kv, ctx.placement.cache)
  last = jnp.take_along_axis(hidden, (ctx.lengths - 1)[:, None, None], axis=1)
  first, _ = sampler_common.propose(ctx.config, ctx.model.logits(last), ctx.keys, jnp.zeros((b,), jnp.int32))
  first = first[:, 0]
  tokens = jnp.full((b, gen), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
  report(ctx, (ctx.lengths > 0) & ((first == cfg.eos_token_id) | (gen == 1)), jnp.int32(0), tokens)
  done = (first == cfg.eos_token_id) | (ctx.lengths == 0)
  return ctx.placement.pin_loop(_Carry(cache, tokens, jnp.int32(1), done, jnp.ones((b,), jnp.int32)))


def step(ctx: _Context, c: _Carry) -> _Carry:
  """Every active row feeds back its last token (slot `P + t - 1`, position `next_position + t - 1`): its K/V
  go to the cache and its hidden state gives the row's next token."""
  cfg = ctx.model.config
  b = c.tokens.shape[0]
  active = ~c.done
  slot = ctx.lengths + c.t - 1
  pos = (ctx.next_position + c.t - 1)[:, None]
  if ctx.mrope:
    pos = jnp.broadcast_to(pos[None], (3, b, 1))
  x = ctx.model.embed(jax.lax.dynamic_slice_in_dim(c.tokens, c.t - 1, 1, axis=1))
  spec = kv_cache.window_spec(slot[:, None], jnp.ones((b, 1), bool), slot, ctx.max_len, kind="causal")
  hidden, kv = ctx.model.decode(x, pos, spec, kv_cache.pinned(c.cache, ctx.placement.cache), return_kv=True)
  cache = kv_cache.write(c.cache, kv, slot, active, ctx.placement.cache)
  token, _ = sampler_common.propose(ctx.config, ctx.model.logits(hidden), ctx.keys, c.nfe)
  new = jnp.where(active, token[:, 0], cfg.pad_token_id)
  tokens = jax.lax.dynamic_update_slice_in_dim(c.tokens, new[:, None], c.t, axis=1)
  ends = ((c.t + 1) % ctx.config.block_size == 0) | (new == cfg.eos_token_id) | (c.t + 1 == ctx.config.gen_length)
  report(ctx, active & ends, c.t, tokens)
  return ctx.placement.pin_loop(_Carry(cache, tokens, c.t + 1, c.done | (active & (new == cfg.eos_token_id)),
                                       c.nfe + active))


def report(ctx: _Context, rows: jax.Array, t: jax.Array, tokens: jax.Array) -> None:
  """Streaming only: the `rows` `[B]` end their piece (of `block_size` tokens) at token `t`."""
  if ctx.stream:
    bs, gen, b = ctx.config.block_size, ctx.config.gen_length, tokens.shape[0]
    window = (t // bs) * bs + jnp.arange(bs)
    streaming.emit(rows, jnp.broadcast_to(t // bs, (b,)), tokens[:, jnp.minimum(window, gen - 1)],
                   jnp.broadcast_to(window <= t, (b, bs)), ctx.placement)


ALGORITHM = Algorithm(_run, _inputs, per_row=True)
