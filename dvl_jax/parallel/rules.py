"""Logical axis names -> mesh axes: one short table, applied to the `axes` metadata of every param."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Weights: FSDP shards the model dimension, tensor parallelism shards heads / MLP / vocab.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "vision_patch": None,
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "vision_merge": "tensor",
}


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: dict[str, Any] = RULES) -> PartitionSpec:
  """Maps logical axes to mesh axes; a dimension a mesh axis does not divide stays replicated."""
  spec, used = [], set()
  for name, size in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to dvl_jax.parallel.rules.RULES")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    n = 1
    for t in targets:
      n *= mesh.shape[t]
    if not targets or size % n:
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Pins activation `x` to the sharding of its logical `axes` on the mesh of `jax.set_mesh`; a no-op
  without one (single-device calls, the samplers).

  Without the pins, GSPMD settles FSDP's conflict (batch and weights' `embed` dim both on `fsdp`) by
  gathering the batch: every device then computes every row, and holds every row's logits.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, mesh))


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def logical_shardings(state: nnx.State, mesh: Mesh | None) -> Any:
  """A pytree of `NamedSharding` mirroring `state` (None leaves when `mesh` is None)."""

  def one(var: nnx.Variable):
    if mesh is None:
      return None
    axes = var.get_metadata().get("axes", (None,) * var.get_value().ndim)
    return NamedSharding(mesh, partition_spec(axes, var.get_value().shape, mesh))

  return jax.tree.map(one, state, is_leaf=_is_var)


def abstract_arrays(state: nnx.State, mesh: Mesh | None) -> Any:
  """`ShapeDtypeStruct` leaves carrying their target sharding: the restore target for Orbax."""
  shardings = logical_shardings(state, mesh)

  def one(var: nnx.Variable, sharding):
    return jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype, sharding=sharding)

  return jax.tree.map(one, state, shardings, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """The model (identical on every process, e.g. the same seed) with every param placed on its
  logical-rule sharding over `mesh`; each process fills the shards it holds."""
  graphdef, state = nnx.split(model)

  def place(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  shardings = logical_shardings(state, mesh)
  return nnx.merge(graphdef, jax.tree.map(lambda v, s: v.replace(place(v.get_value(), s)), state, shardings,
                                          is_leaf=_is_var))
