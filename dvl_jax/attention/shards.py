"""Which mesh axes an attention kernel's rows and heads are split over, to run it per device under `shard_map`.

A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split: left alone, it gathers every operand to
the whole batch and all heads and runs the kernel on every device (compiled for 4 GPUs, the own GPU kernel ran a
training step's whole batch on each of them). Under a mesh context (`jax.set_mesh`) with the project's axes,
the kernels run instead on each device's rows (the `batch` rule's axes) and kv heads (the `kv_heads` rule's; a
query head follows its kv head), each replicated where the mesh does not divide it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec as P

from dvl_jax.parallel.mesh import AXES
from dvl_jax.parallel.rules import partition_spec


class Split(NamedTuple):
  """The context mesh and the mesh axes (or None) of the rows and of the kv heads."""

  mesh: Any
  rows: Any
  heads: Any

  def sequences(self) -> P:
    """`[B, L, H, D]` queries, keys, values and outputs."""
    return P(self.rows, None, self.heads, None)

  def per_row(self) -> P:
    """`[B, L]` index and segment arrays."""
    return P(self.rows, None)


def split(batch: int, kv_heads: int) -> Split | None:
  """The split under the context mesh, or None without one (single-device calls) or inside a `shard_map`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names) or mesh.manual_axes:
    return None
  return Split(mesh, partition_spec(("batch",), (batch,), mesh)[0], partition_spec(("kv_heads",), (kv_heads,), mesh)[0])
