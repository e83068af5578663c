"""What the block-diffusion and AR samplers share: everything around their decoding loops.

A sampler is an `Algorithm`: a decoding loop over an embedded prompt, and the few host-side inputs it takes
beyond the common ones. The rest exists once, here: prompts bucketed and padded to the mesh's rows, the KV
cache checked or made, one PRNG key per row, the shardings of every argument, one jitted program per
(algorithm, placement, streaming or not) that counts its traces and embeds the prompt (image features
spliced) before the loop, `lower`, and `generate` (streaming, `GenerateOutput`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dvl_jax.diffusion import kv_cache, remask, streaming
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
  """One decoding algorithm (hashable: the jitted programs are cached per algorithm).

  `run(model, config, cache, prompt, keys, inputs, *, placement, stream) -> (Outputs, cache)`: the decoding
    loop, inside jit; `stream`: report pieces as they are final (`streaming.emit`).
  `inputs(model, prompts, config)`: its own arguments, a tuple of NumPy arrays made on the host.
  `per_row`: those have a leading batch axis (padded with dead rows, sharded over `data`), else all rows
    share them (replicated).
  """

  run: Callable[..., tuple[Outputs, KV]]
  inputs: Callable[[DiffusionLM, Prompts, SamplingConfig], tuple]
  per_row: bool

  def shardings(self, place: Placement) -> dict[str, Any]:
    """The jitted program's explicit shardings on a mesh (`jit_sampler`)."""
    rows, rep = place.rows, place.replicated
    outputs = {"tokens": rows, "decoded": rows, "steps": rows, "nfe": rows, "forwards": rep}
    return {"in_shardings": (place.param_shardings, place.cache, PromptArrays(rows, rows, rep, rep), rows,
                             rows if self.per_row else rep),
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
  run, args, _ = _arguments(algorithm, model, inputs, config, None, None)
  return run.lower(*args)


def propose(config: SamplingConfig, logits: jax.Array, keys: jax.Array, count: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """`remask.propose` (logits `[B, n, V]` -> tokens, confidences `[B, n]`) with each row's key `[B]` folded with
  its forward count `[B]`: fresh randomness per forward, and a row samples as it would alone."""
  return remask.propose(logits, jax.vmap(jax.random.fold_in)(keys, count), temperature=config.temperature,
                        top_k=config.top_k, top_p=config.top_p)


def _arguments(algorithm: Algorithm, model: DiffusionLM, inputs: Any, config: SamplingConfig,
               rng: jax.Array | None, cache: KV | None, stream: bool = False) -> tuple[Any, tuple, int]:
  """(the jitted program for the model's placement, its arguments, the number of real rows)."""
  cfg = model.config
  prompts = Prompts.coerce(inputs).bucketed(config, cfg)
  graphdef, state = nnx.split(model)
  place = Placement.of(cfg, state)
  b, w = prompts.ids.shape
  cache = kv_cache.checked(cache, cfg, place.batch(b), config.cache_len(w), place.cache)
  prompt = PromptArrays(place.pad_rows(prompts.ids, fill=cfg.pad_token_id), place.pad_rows(prompts.lengths),
                        prompts.pixel_values, prompts.vision)
  own = algorithm.inputs(model, prompts, config)
  if algorithm.per_row:
    own = tuple(place.pad_rows(a) for a in own)
  args = (graphdef, _compile_key(config), state, cache, prompt, place.pad_keys(remask.row_keys(rng, b)), own)
  return jit_sampler(_program(algorithm, stream), place, algorithm.shardings), args, b


def _compile_key(config: SamplingConfig) -> SamplingConfig:
  """The static config: `steps` and `confidence_threshold` reach a loop as arrays (its `inputs`), if at all, so
  sweeping them reuses one compile."""
  return dataclasses.replace(config, steps=1, confidence_threshold=0.5)


@functools.cache
def _program(algorithm: Algorithm, stream: bool) -> Callable[..., tuple[Outputs, KV]]:
  """What `jit_sampler` compiles: one object per (algorithm, stream), since it caches by it."""
  return functools.partial(_sample, run=algorithm.run, stream=stream)


def _sample(graphdef: Any, config: SamplingConfig, state: Any, cache: KV, prompt: PromptArrays, keys: jax.Array,
            inputs: tuple, *, run: Callable[..., tuple[Outputs, KV]], placement: Placement, stream: bool
            ) -> tuple[Outputs, KV]:
  """Inside jit: the model on its compute shardings and the prompt embedded, then the algorithm's loop."""
  TRACES[config.algorithm + ("_streaming" if stream else "")] += 1
  model = nnx.merge(graphdef, placement.constrain_params(state))
  features = None
  if prompt.pixel_values is not None:
    features = model.image_features(placement.constrain_patches(prompt.pixel_values), prompt.vision)
  embedded = Prompt(prompt.ids, prompt.lengths.astype(jnp.int32), model.embed(prompt.ids, features))
  return run(model, config, cache, embedded, keys, inputs, placement=placement, stream=stream)
