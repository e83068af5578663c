"""What the block-diffusion and AR samplers share: everything around their decoding loops.

A sampler is an `Algorithm`: the pieces of a decoding loop over an embedded prompt (per-row constants, prefill
and first carry, a bounded or whole loop, outputs), and the few host-side inputs it takes beyond the common
ones; `generate` runs the pieces in one program, the serving engine (`dvl_jax.serving`) over slots it keeps.
The rest exists once, here: prompts bucketed and padded to the mesh's rows, the KV cache checked or made, one
PRNG key per row, the shardings of every argument, one jitted program per (algorithm, placement, streaming or
not) that counts its traces and embeds the prompt (image features spliced) before the loop, `lower`, and
`generate` (streaming, `GenerateOutput`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dvl_jax.diffusion import compaction, kv_cache, remask, split_cache, streaming
from dvl_jax.diffusion.sampling_config import GenerateOutput, Prompts, SamplingConfig
from dvl_jax.diffusion.sampling_mesh import Placement, jit_sampler
from dvl_jax.models.interface import KV, DiffusionLM

TRACES: collections.Counter = collections.Counter()  # traces per algorithm (+ "_streaming"): a recompile shows up here

# tokens [B, G], decoded [B], steps [B, G] (the row's forward that fixed each token, -1), nfe [B], forwards []
Outputs = dict[str, jax.Array]


class PromptArrays(NamedTuple):
  """The prompt as the jitted program takes it."""

  ids: Any  # [B, W] right-padded
  lengths: Any  # [B] (0: a dead row padding the batch to the mesh)
  pixel_values: Any  # [N, patch_dim] or None
  vision: Any  # its VisionLayout or None


class Prompt(NamedTuple):
  """The prompt as a decoding loop reads it."""

  ids: jax.Array  # [B, W]
  lengths: jax.Array  # [B] int32
  embeds: jax.Array  # [B, W, H], image features spliced


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One decoding algorithm as pieces that run inside jit (hashable: the jitted programs are cached per
  algorithm). `generate` runs them in one program; the serving engine runs `start` per admitted request and
  `chunk` over a carry it keeps across calls.

  `context(model, config, placement, stream, max_len, rows)`: the frozen context every step reads; `stream`:
    report pieces as they are final (`streaming.emit`).
  `rows(model, config, prompt, gen, sampling, inputs) -> NamedTuple`: the per-row constants (arrays `[B, ...]`)
    from the embedded prompt, gen lengths `[B]`, each row's `remask.Sampling` (its PRNG key and settings, kept
    whole for `propose`) and `inputs`.
  `start(ctx, cache, prompt, inputs) -> carry`: the prefill and the loop's first carry (a NamedTuple: the KV
    cache, then arrays `[B, ...]` per row and scalars; `done` `[B]` among them).
  `chunk(ctx, carry, max_forwards, until_active=0) -> carry`: the decoding loop, to the end (None) or at most
    that many forwards and until a row finishes (`loop`); with `until_active`, until no more rows decode.
  `outputs(ctx, carry, width) -> Outputs`: tokens `[B, width]` from each row's prompt end, and statistics.
  `inputs(model, prompts, config)`: its own arguments, a tuple of NumPy arrays `[B, ...]` made on the host
    (padded with dead rows, sharded over `data`).
  `least_rows()`: the fewest rows `generate` runs (a smaller batch gets dead rows) on this platform.
  """

  context: Callable[..., Any]
  rows: Callable[..., tuple]
  start: Callable[..., tuple]
  chunk: Callable[..., tuple]
  outputs: Callable[..., Outputs]
  inputs: Callable[[DiffusionLM, Prompts, SamplingConfig], tuple]
  least_rows: Callable[[], int] = lambda: 1  # `generate` pads a smaller batch with dead rows up to this many

  def shardings(self, place: Placement) -> dict[str, Any]:
    """The jitted program's explicit shardings on a mesh (`jit_sampler`)."""
    rows, rep = place.rows, place.replicated
    outputs = {"tokens": rows, "decoded": rows, "steps": rows, "nfe": rows, "forwards": rep}
    return {"in_shardings": (place.param_shardings, place.cache, PromptArrays(rows, rows, rep, rep), rows, rows),
            "out_shardings": (outputs, place.cache)}


def generate(algorithm: Algorithm, model: DiffusionLM, inputs: Any, config: SamplingConfig, *,
             rng: jax.Array | None = None, cache: KV | None = None, tokenizer: Any = None,
             on_block: streaming.OnBlock | None = None) -> GenerateOutput:
  """`dvl_jax.diffusion.sampler.generate` with the algorithm chosen."""
  config = config.resolve(model.config)
  run, args, batch = _arguments(algorithm, model, inputs, config, rng, cache, stream=on_block is not None)
  out, cache = streaming.call(run, args, on_block, batch)
  return GenerateOutput.build(out["tokens"], out["decoded"], out["nfe"], out["forwards"], out["steps"],
                              model.config.eos_token_id, tokenizer, cache, batch=batch)


def lower(algorithm: Algorithm, model: DiffusionLM, inputs: Any, config: SamplingConfig) -> jax.stages.Lowered:
  """The lowered sampler for these shapes (compile time, memory analysis and HLO in benchmarks and tests)."""
  config = config.resolve(model.config)
  run, args, _ = _arguments(algorithm, model, inputs, config, None, None, allocate=False)
  return run.lower(*args)


def propose(config: SamplingConfig, logits: jax.Array, sampling: remask.Sampling, count: jax.Array,
            placement: Placement) -> tuple[jax.Array, jax.Array]:
  """`remask.propose` (logits `[B, n, V]` -> tokens, confidences `[B, n]`) with each row's settings `sampling`
  and its key folded with `count` `[B]`, which numbers the row's decoding passes (block diffusion: its positions
  in them too, each position a row of `logits`): fresh randomness per pass, and a row samples as it would alone.
  `config.temperature` 0 (`compile_key`: no row samples) compiles the greedy decision only; `config.confidence`
  None (not resolved against a model) is "sampled". The logits are on `placement`'s mesh (`argmax_in_chunks`)."""
  chunked = argmax_in_chunks(placement)
  if config.temperature == 0:
    return remask.greedy(logits, chunked)
  return remask.propose(logits, jax.vmap(jax.random.fold_in)(sampling.keys, count), temperature=sampling.temperature,
                        top_k=sampling.top_k, top_p=sampling.top_p, confidence=config.confidence or "sampled",
                        chunked=chunked)


def propose_if_sampling(config: SamplingConfig, logits: jax.Array, sampling: remask.Sampling, count: jax.Array,
                        rows: jax.Array, placement: Placement) -> tuple[jax.Array, jax.Array]:
  """`propose`, its sampled path taken only in a forward where one of `rows` samples: a program compiled for
  sampling (the serving engine's slots, whose requests mostly decode greedily) otherwise pays just the argmax
  and its probability, not top-k / top-p sorts over the vocabulary. Greedy rows get the same tokens either way.
  `sampling`, `count` and `rows` are per row `[B]` of logits `[B, n, V]`, or per position `[B * n]`: each position
  then samples as a row of its own (the greedy decision keeps the logits' shape: as `[B * n, 1, V]` XLA:CPU copied
  them twice)."""
  greedy = lambda: remask.greedy(logits, argmax_in_chunks(placement))
  if config.temperature == 0:
    return greedy()
  b, n = logits.shape[:2]

  def sampled() -> tuple[jax.Array, jax.Array]:
    if rows.shape[0] == b:
      return propose(config, logits, sampling, count, placement)
    x0, p0 = propose(config, logits.reshape(b * n, -1), sampling, count, placement)
    return x0.reshape(b, n), p0.reshape(b, n)

  return jax.lax.cond(samples(sampling, rows), sampled, greedy)


def argmax_in_chunks(placement: Placement) -> bool:
  """Whether greedy decisions find the argmax chunk by chunk (`remask.greedy`): on XLA:CPU, whose argmax over a
  vocabulary is ~30x slower than its max (1 to 2 ms of a 10 to 16 ms CPU forward), and on one device only (over
  a vocabulary-sharded mesh the chunks' gather would add collectives; on GPUs the NaN check's `cond` would wait
  for the host, and XLA's GPU argmax is not slow)."""
  return placement.mesh is None and jax.default_backend() == "cpu"


def samples(sampling: remask.Sampling, rows: jax.Array) -> jax.Array:
  """`[]`: whether one of `rows` `[B]` samples (temperature > 0) rather than decoding greedily."""
  return jnp.any(rows & (sampling.temperature > 0))


def loop(step: Callable[[Any], Any], carry: Any, max_forwards: int | jax.Array | None, until_active: int = 0
         ) -> Any:
  """`step` over a loop's `carry` (with `done` `[B]` and a `forwards` count) while more than `until_active` rows
  are not done (`compaction` then moves them into a narrower batch); given `max_forwards` (the serving engine: it
  may be traced), at most that many times and only until a row that was decoding finishes, so that the engine
  hands its request out and refills its slot at once."""
  if max_forwards is None:
    going = lambda c: jnp.sum(~c.done) > until_active
  else:
    stop, was_done = carry.forwards + max_forwards, carry.done
    going = lambda c: jnp.any(~c.done) & (c.forwards < stop) & ~jnp.any(c.done & ~was_done)
  with jax.named_scope("decode_loop"):  # names the loop in profiles and HLO
    return jax.lax.while_loop(going, step, carry)


def _arguments(algorithm: Algorithm, model: DiffusionLM, inputs: Any, config: SamplingConfig,
               rng: jax.Array | None, cache: KV | None, stream: bool = False, allocate: bool = True
               ) -> tuple[Any, tuple, int]:
  """(the jitted program for the model's placement, its arguments, the number of real rows); without `allocate`
  (lowering only) a new cache is its shapes alone."""
  cfg = model.config
  prompts = Prompts.coerce(inputs).bucketed(config, cfg)
  graphdef, state, place = split_cache.split(model)
  b, w = prompts.ids.shape
  rows = place.batch(b, algorithm.least_rows())
  if cache is None and not allocate:
    cache = kv_cache.abstract(cfg, rows, config.cache_len(w), place.cache)
  cache = kv_cache.checked(cache, cfg, rows, config.cache_len(w), place.cache)
  prompt = PromptArrays(place.pad_rows(prompts.ids, cfg.pad_token_id, rows), place.pad_rows(prompts.lengths, 0, rows),
                        prompts.pixel_values, prompts.vision)
  own = tuple(place.pad_rows(a, 0, rows) for a in algorithm.inputs(model, prompts, config))
  sampling = remask.Sampling.of(remask.row_keys(rng, b), config.temperature, config.top_k, config.top_p)
  sampling = jax.tree.map(functools.partial(place.pad_keys, rows=rows), sampling)
  args = (graphdef, compile_key(config), state, cache, prompt, sampling, own)
  return jit_sampler(_program(algorithm, stream), place, algorithm.shardings), args, b


def compile_key(config: SamplingConfig) -> SamplingConfig:
  """The static config: the remasking strategy, `steps` and `confidence_threshold` reach a loop as arrays (its
  `inputs`), if at all, and temperature / top-k / top-p as each row's `remask.Sampling`, so sweeping them reuses
  one compile; `temperature` stays only as a flag, 0 (greedy only: the lean program) or 1 (rows may sample)."""
  return dataclasses.replace(config, steps=1, confidence_threshold=0.5, remasking_strategy="low_confidence_static",
                             temperature=float(config.temperature > 0), top_k=0, top_p=1.0)


@functools.cache
def _program(algorithm: Algorithm, stream: bool) -> Callable[..., tuple[Outputs, KV]]:
  """What `jit_sampler` compiles: one object per (algorithm, stream), since it caches by it."""
  return functools.partial(_sample, algorithm=algorithm, stream=stream)


def _sample(graphdef: Any, config: SamplingConfig, state: Any, cache: KV, prompt: PromptArrays,
            sampling: remask.Sampling, inputs: tuple, *, algorithm: Algorithm, placement: Placement, stream: bool
            ) -> tuple[Outputs, KV]:
  """Inside jit: the algorithm's prefill and whole loop over the embedded prompt, every row `gen_length` tokens."""
  TRACES[config.algorithm + ("_streaming" if stream else "")] += 1
  with placement.tracing():
    model = merged(graphdef, state, placement)
    gen = jnp.full(sampling.keys.shape, config.gen_length, jnp.int32)
    ctx, carry = begin(algorithm, model, config, cache, embed(model, prompt, placement), gen, sampling, inputs,
                       placement=placement, stream=stream)
    if compaction.enabled(config.compact_rows, one_device=placement.mesh is None, stream=stream):
      carry = compaction.decode(algorithm, ctx, carry)
    else:
      carry = algorithm.chunk(ctx, carry, None)
    return algorithm.outputs(ctx, carry, config.gen_length), carry.cache


def merged(graph: split_cache.StaticGraph, state: Any, placement: Placement) -> DiffusionLM:
  """Inside jit: the model on its compute shardings."""
  return nnx.merge(graph.graphdef, placement.constrain_params(state))


def embed(model: DiffusionLM, prompt: PromptArrays, placement: Placement) -> Prompt:
  """Inside jit: the prompt embedded, image features spliced."""
  features = None
  if prompt.pixel_values is not None:
    features = model.image_features(placement.constrain_patches(prompt.pixel_values), prompt.vision)
  return Prompt(prompt.ids, prompt.lengths.astype(jnp.int32), model.embed(prompt.ids, features))


def begin(algorithm: Algorithm, model: DiffusionLM, config: SamplingConfig, cache: KV, prompt: Prompt,
          gen: jax.Array, sampling: remask.Sampling, inputs: tuple, *, placement: Placement, stream: bool
          ) -> tuple[Any, tuple]:
  """Inside jit: (the context of these rows, their first carry after the prefill) on a cache of `max_len` slots."""
  rows = algorithm.rows(model, config, prompt, gen, sampling, inputs)
  ctx = algorithm.context(model, config, placement, stream, cache[0].shape[2], rows)
  return ctx, algorithm.start(ctx, cache, prompt, inputs)
