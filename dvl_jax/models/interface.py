"""The one interface between a model family and everything that runs it.

The losses, both samplers, the train step, the server and the evaluator see a model only through
`DiffusionLM` below; a family (one folder under `dvl_jax/models/`, registered in `families`) implements it
and may hold any submodules it likes. Nothing outside a family's folder reaches into those submodules or
checks a model's class.

The pieces, in the order a forward runs them:

* `image_features(pixel_values, layout)`: `[N_patches, patch_dim]` pixels laid out by a `VisionLayout` ->
  `[N_tokens, H]` features, one per image token (row-major over the batch). A text-only family raises.
* `embed(input_ids, image_features=None)`: `[B, L]` ids -> `[B, L, H]` embeddings, the features spliced at
  the `config.image_token_id` positions in order.
* `decode(embeds, positions, spec, cache=None, *, return_kv=False, packed=None, fill=None)`: the decoder stack over
  `[B, L, H]` embeddings at `positions` (`[B, L]` flat or `[3, B, L]` M-RoPE) under an `AttentionSpec`; `cache`
  is a read-only KV prefix `(k, v)` each `[layers, B, Lc, kv_heads, head_dim]`. Returns the final-normed hidden
  states `[B, L, H]` and, if asked, this call's K/V `[layers, B, L, kv_heads, head_dim]`. `packed` `[P]` (flat
  indices into the `B * L` positions; one device): compute those positions only, attention in the padded layout
  (the spec marks the others invalid), the others' hidden states and K/V zeros: the block sampler's fused
  commit of a few rows' previous blocks (`SamplingConfig.packed_commit_share`). `fill`: a KV cache
  `[layers, B, Lf >= L, ...]` each layer writes its K/V into at slots `[0, L)`, returned in place of the K/V
  (the samplers' prefill: no copy of every layer's K/V beside the cache).
* `logits(hidden)`: `[..., H]` -> `[..., vocab]` fp32 (spec §10.7).
* `positions(input_ids, image_grid_thw, attention_mask, mode)`: host-side position ids for a prompt
  (`mode` "flat" or "mrope"; an array passes through).
* `param_group(path)`: "vision", "projector" or "language" for a param path of the model's state; the
  optimizer's per-group learning rates and stage 1's trainable set (the projector) are chosen from it.

Config fields the runners read (`model.config`, a `dvl_jax.core.config.ModelConfig`): `mask_token_id`,
`eos_token_id`, `pad_token_id`, `image_token_id`, `block_size`, `position_mode`, `family`, and the
decoder's shape in `config.text` (layers, KV heads, head dim: the KV cache and the sampling mesh).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import jax
import numpy as np

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.config import ModelConfig
from dvl_jax.core.vision_layout import VisionLayout

KV = tuple[jax.Array, jax.Array]  # keys, values: [layers, B, L, kv_heads, head_dim] (per layer: [B, L, ...])
ParamGroup = Literal["vision", "projector", "language"]


@runtime_checkable
class DiffusionLM(Protocol):
  """A model the losses and samplers can run (see the module docstring for each piece)."""

  config: ModelConfig

  def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    ...

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
    ...

  def decode(self, embeds: jax.Array, positions: jax.Array, spec: AttentionSpec, cache: KV | None = None,
             *, return_kv: bool = False, packed: jax.Array | None = None,
             fill: KV | None = None) -> tuple[jax.Array, KV | None]:
    ...

  def logits(self, hidden: jax.Array) -> jax.Array:
    ...

  def positions(self, input_ids: Any, image_grid_thw: Any, attention_mask: Any,
                mode: str | jax.Array | np.ndarray) -> jax.Array:
    ...

  @staticmethod
  def param_group(path: tuple[str, ...]) -> ParamGroup:
    ...


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A state path (of `jax.tree_util` keys or plain strings) as plain names, for `param_group`."""
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
