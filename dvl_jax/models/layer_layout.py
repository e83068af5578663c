"""The stored layout of layer stacks: checkpoints hold every stack stacked (leading `layers` axis) whatever
`scan_layers` the model was built with, so one checkpoint serves scanned training and per-layer decoding
(`layers.stack_modules`) and the converters read one layout.

A per-layer model's Param state differs from the stored one only by one integer path component, the layer's
index in its `nnx.List`: `text/layers/3/mlp/up_proj/kernel` is row 3 of `text/layers/mlp/up_proj/kernel`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dvl_jax.core.config import ModelConfig
from dvl_jax.models.families import abstract_model

Path = tuple[Any, ...]


def stored_params(cfg: ModelConfig) -> nnx.State:
  """The abstract Param state (shapes, dtypes, axes) of `cfg`'s model as checkpoints store it."""
  return nnx.state(abstract_model(cfg.replace(scan_layers=True)), nnx.Param)


def stacked(params: nnx.State, cfg: ModelConfig) -> nnx.State:
  """A model's Param state in the stored layout (each per-layer param stacked; others as they are)."""
  stored = set(dict(nnx.to_flat_state(stored_params(cfg))))
  groups: dict[Path, dict[int, nnx.Variable]] = {}
  for path, var in nnx.to_flat_state(params):
    key, layer = _stored_key(path, stored)
    groups.setdefault(key, {})[layer] = var
  out = []
  for key, layers in groups.items():
    if None in layers:
      out.append((key, layers[None]))
      continue
    first = layers[0]
    value = jnp.stack([layers[i].get_value() for i in range(len(layers))])
    out.append((key, first.replace(value, axes=("layers", *first.get_metadata()["axes"]))))
  return nnx.from_flat_state(out)


def per_layer(stored: nnx.State, like: nnx.State, shardings: Any = None) -> nnx.State:
  """`stored` params in the layout of `like` (a model's abstract Param state), each on its leaf of `shardings`
  (a tree like `like`; None, or None leaves: where the slice lands).

  Consumes `stored`: a stacked array is deleted once its layers are sliced out, so the peak is the params plus
  one stack, not two copies of every stack.
  """
  stored_flat = dict(nnx.to_flat_state(stored))
  wanted: dict[Path, list[tuple[Path, int | None, nnx.Variable, Any]]] = {}
  like_flat = list(nnx.to_flat_state(like))
  placements = [None] * len(like_flat) if shardings is None else [s for _, s in nnx.to_flat_state(shardings)]
  for (path, var), sharding in zip(like_flat, placements, strict=True):
    key, layer = _stored_key(path, stored_flat)
    wanted.setdefault(key, []).append((path, layer, var, sharding))
  out = []
  for key, targets in wanted.items():
    source = stored_flat[key].get_value()
    for path, layer, var, sharding in targets:
      value = source if layer is None else source[layer]
      out.append((path, var.replace(value if sharding is None else jax.device_put(value, sharding))))
    if targets[0][1] is not None:
      jax.block_until_ready([v.get_value() for _, v in out[-len(targets):]])
      source.delete()
  return nnx.from_flat_state(out)


def _stored_key(path: Path, stored: Any) -> tuple[Path, int | None]:
  """(the stored path holding `path`'s values, the layer index into it or None)."""
  if path in stored:
    return path, None
  for j, part in enumerate(path):
    if isinstance(part, int) and path[:j] + path[j + 1:] in stored:
      return path[:j] + path[j + 1:], part
  raise KeyError(f"param {'/'.join(map(str, path))} has no place in the stored layout; was the model built "
                 "from the same config as the checkpoint?")
