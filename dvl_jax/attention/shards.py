"""Which mesh axes an attention kernel's rows and heads are split over, to run it per device under `shard_map`.

A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split: left alone, it gathers every operand to
the whole batch and all heads and runs the kernel on every device (compiled for 4 GPUs, the own GPU kernel ran a
training step's whole batch on each of them; the samplers gathered the whole KV cache onto every device each
step). Under a mesh context (`jax.set_mesh`, training) with the project's axes, or the samplers' `splitting`
context, the kernels run instead on each device's rows (the `batch` rule's axes) and kv heads (the `kv_heads`
rule's; a query head follows its kv head), each replicated where the mesh does not divide it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, NamedTuple

import jax
from jax.sharding import PartitionSpec as P

from dvl_jax.parallel.mesh import AXES
from dvl_jax.parallel.rules import RULES, partition_spec

_GIVEN: contextvars.ContextVar[tuple[Any, dict[str, Any]] | None] = contextvars.ContextVar("kernel_split", default=None)


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

  def map(self, fn: Callable[..., Any], in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """`fn` per device (`jax.shard_map`)."""
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@contextlib.contextmanager
def splitting(mesh: jax.sharding.Mesh, rules: dict[str, Any]) -> Iterator[None]:
  """Kernels traced inside split over `mesh` by `rules`, without a mesh context: the samplers leave their
  activations to the partitioner (a context mesh would make the model's pins active) and keep rows on `data`."""
  token = _GIVEN.set((mesh, rules))
  try:
    yield
  finally:
    _GIVEN.reset(token)


def split(batch: int, kv_heads: int) -> Split | None:
  """The split inside `splitting` or under the context mesh; None without either (single-device calls) or inside a
  `shard_map`."""
  context = jax.sharding.get_abstract_mesh()
  mesh, rules = _GIVEN.get() or (context, RULES)
  if context.manual_axes or mesh.empty or not set(AXES) <= set(mesh.axis_names) or mesh.size == 1:
    return None
  axes = lambda name, size: partition_spec((name,), (size,), mesh, rules)[0]  # noqa: E731
  return Split(mesh, axes("batch", batch), axes("kv_heads", kv_heads))


def per_device(fn: Callable[..., Any], q: jax.Array, k: jax.Array, v: jax.Array, spec: Any, *prefix: Any,
               kv_heads: int | None = None) -> Any:
  """`fn(q, k, v, spec, *prefix)` on each device's rows and heads under a split (`split`), else as is: q, k, v and
  the output `[B, L, H, D]`, the spec's arrays `[B, L]`, a `CachePrefix`'s `[layers, B, L, Hkv, D]`. `kv_heads`:
  when `k` holds more heads than its own (q, k and v as one array)."""
  where = split(q.shape[0], kv_heads or k.shape[2])
  if where is None:
    return fn(q, k, v, spec, *prefix)
  x, cache = where.sequences(), P(None, where.rows, None, where.heads, None)
  in_specs = (x, x, x, jax.tree.map(lambda _: where.per_row(), spec),
              *(type(p)(cache, cache, P()) for p in prefix))
  return where.map(fn, in_specs, x)(q, k, v, spec, *prefix)
