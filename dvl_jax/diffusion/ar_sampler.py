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
from dvl_jax.models import layers
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

class Rows(NamedTuple):
  """Per row, what decoding reads and never changes (the serving engine keeps one per slot)."""

  lengths: jax.Array  # [B] prompt lengths
  gen: jax.Array  # [B] tokens to generate
  next_position: jax.Array  # [B] position of the first generated token
  keys: jax.Array  # [B] PRNG keys


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every step of a decoding loop reads and none changes."""

  model: DiffusionLM
  config: SamplingConfig  # static
  placement: Placement
  stream: bool  # report pieces as they are produced (`streaming.emit`)
  max_len: int  # M, the cache's slots
  rows: Rows

  @property
  def mrope(self) -> bool:
    """Positions are `[3, B, n]`, else `[B, n]`."""
    return self.config.positions == "mrope"


class _Carry(NamedTuple):
  cache: KV
  tokens: jax.Array  # [B, G] generated tokens, the pad id after a row's end
  t: jax.Array  # [B] tokens produced by the row (the one being fed back is `t - 1`)
  done: jax.Array  # [B] (dead padding rows start done)
  nfe: jax.Array  # [B] forwards of the row, prefill included
  forwards: jax.Array  # [] decoding forwards of the batch after the prefill


def rows(model: DiffusionLM, config: SamplingConfig, prompt: Prompt, gen: jax.Array, keys: jax.Array,
         inputs: tuple[jax.Array, jax.Array]) -> Rows:
  """The per-row constants of a prompt, gen lengths `[B]`, keys `[B]` and `_inputs`."""
  return Rows(prompt.lengths, gen, inputs[1], keys)


def start(ctx: _Context, cache: KV, prompt: Prompt, inputs: tuple[jax.Array, jax.Array]) -> _Carry:
  """One causal pass over the prompt writes its K/V and gives each row its first token (logits only at the
  prompt's last position): the loop's first carry."""
  cfg, gen, lengths = ctx.model.config, ctx.rows.gen, ctx.rows.lengths
  positions = jnp.moveaxis(inputs[0], 0, -2)  # the model's [B, W] or [3, B, W]
  b, w = prompt.ids.shape
  spec = AttentionSpec.self_attention(jnp.arange(w)[None, :] < lengths[:, None], kind="causal")
  hidden, cache = ctx.model.decode(prompt.embeds, positions, spec,
                                  fill=kv_cache.pinned(cache, ctx.placement.cache))
  cache = kv_cache.pinned(cache, ctx.placement.cache)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
  first, _ = sampler_common.propose_if_sampling(ctx.config, ctx.model.logits(last), ctx.rows.keys,
                                                jnp.zeros((b,), jnp.int32), lengths > 0, ctx.placement)
  first = first[:, 0]
  tokens = jnp.full((b, ctx.config.gen_length), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
  ends = (first == cfg.eos_token_id) | (gen == 1)
  report(ctx, (lengths > 0) & ends, jnp.zeros((b,), jnp.int32), tokens)
  return ctx.placement.pin_loop(_Carry(cache, tokens, jnp.ones((b,), jnp.int32), ends | (lengths == 0),
                                       jnp.ones((b,), jnp.int32), jnp.zeros((), jnp.int32)))


def chunk(ctx: _Context, c: _Carry, max_forwards: int | None, until_active: int = 0) -> _Carry:
  """Decoding forwards until every row is done (`until_active`: until no more rows decode, `compaction`), or (the
  serving engine) at most `max_forwards` of them and until a row finishes."""
  return sampler_common.loop(functools.partial(step, ctx), c, max_forwards, until_active)


def outputs(ctx: _Context, c: _Carry, width: int) -> Outputs:
  """tokens `[B, width]` (the pad id after a row's end) and statistics."""
  produced = jnp.arange(width)[None, :] < c.nfe[:, None]
  return {"tokens": c.tokens[:, :width], "decoded": c.nfe, "nfe": c.nfe, "forwards": c.forwards + 1,
          "steps": jnp.where(produced, jnp.arange(width), -1)}


def step(ctx: _Context, c: _Carry) -> _Carry:
  """Every active row feeds back its last token (slot `P + t - 1`, position `next_position + t - 1`): its K/V
  go to the cache and its hidden state gives the row's next token."""
  cfg, r = ctx.model.config, ctx.rows
  b = c.tokens.shape[0]
  active = ~c.done
  slot = r.lengths + c.t - 1
  pos = (r.next_position + c.t - 1)[:, None]
  if ctx.mrope:
    pos = jnp.broadcast_to(pos[None], (3, b, 1))
  x = ctx.model.embed(jnp.take_along_axis(c.tokens, (c.t - 1)[:, None], axis=1))
  spec = kv_cache.window_spec(slot[:, None], jnp.ones((b, 1), bool), slot, ctx.max_len, kind="causal")
  hidden, kv = ctx.model.decode(x, pos, spec, kv_cache.pinned(c.cache, ctx.placement.cache), return_kv=True)
  # Everything after the forward waits for all of it: compiled for TPUs on a mesh with one kv head per chip,
  # XLA:TPU otherwise copied the whole value cache twice per step (to keep a layer's read apart from the write).
  hidden, kv = jax.lax.optimization_barrier((hidden, kv))
  cache = kv_cache.write(c.cache, kv, slot, active, ctx.placement.cache)
  logits = ctx.model.logits(hidden)
  with jax.named_scope("proposal"):  # names its ops in profiles (`benchmarks/sampling.py --split`)
    token, _ = sampler_common.propose_if_sampling(ctx.config, logits, r.keys, c.nfe, active, ctx.placement)
  new = token[:, 0]
  tokens = _put(c.tokens, jnp.where(active, c.t, ctx.config.gen_length)[:, None], new[:, None])
  ends = ((c.t + 1) % ctx.config.block_size == 0) | (new == cfg.eos_token_id) | (c.t + 1 == r.gen)
  report(ctx, active & ends, c.t, tokens)
  stops = active & ((new == cfg.eos_token_id) | (c.t + 1 == r.gen))
  return ctx.placement.pin_loop(_Carry(cache, tokens, c.t + active, c.done | stops, c.nfe + active,
                                       c.forwards + 1))


_put = jax.vmap(lambda a, i, x: a.at[i].set(x, mode="drop"))  # `a` `[B, G]` written at `[B, n]` (`G`: dropped)


def report(ctx: _Context, rows: jax.Array, t: jax.Array, tokens: jax.Array) -> None:
  """Streaming only: the `rows` `[B]` end their piece (of `block_size` tokens) at token `t` `[B]`."""
  if ctx.stream:
    bs, gen = ctx.config.block_size, ctx.config.gen_length
    window = (t // bs * bs)[:, None] + jnp.arange(bs)
    streaming.emit(rows, t // bs, jnp.take_along_axis(tokens, jnp.minimum(window, gen - 1), axis=1),
                   window <= t[:, None], ctx.placement)


def least_rows() -> int:
  """Two where XLA would turn a single row's products into elementwise products and sums (`layers.ONE_ROW_AS_TWO`):
  a batch-1 request then runs the batch-2 program with a dead row, GEMMs throughout, which launches fewer kernels
  per step than doubling each product's row apart (`layers.matmul`). Compiled for an H200 (3B model): 526 kernels
  per step, against 566 with each product doubled and 708 as one row; on the H200 the batch-2 step took 2.56 ms
  and the one-row step 3.87."""
  return 2 if jax.default_backend() in layers.ONE_ROW_AS_TWO else 1


ALGORITHM = Algorithm(_Context, rows, start, chunk, outputs, _inputs, least_rows)
