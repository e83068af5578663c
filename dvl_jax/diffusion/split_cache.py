"""`nnx.split` of a model, its graph walk reused across sampler calls while the model's structure is unchanged.

A sampler is called many times on one model (an evaluator's batches, a benchmark's repeats), and splitting an
NNX graph is milliseconds of Python per call (about 1.4 ms for the demo's model: a tenth of a batch-1 answer).
What is kept is the graphdef, the model's own Variables in the state's order and their `Placement`; each call
reads their current arrays into a fresh state, so params assigned anew (an optimizer step, `nnx.update`, a
reloaded checkpoint) are seen, and no earlier arrays are held after the model drops them. The state is a pure
nested dict of arrays (`nnx.merge` restores the Variables from the graphdef): jit flattens it in C++, where a
state of Variables costs Python per leaf (0.3 ms a call for a per-layer model's ~100 params). The structure is
checked by identity, in a fraction of a split's time: every attribute object reachable through the model's
modules. Any attribute reassigned (a submodule, a config, a dtype) is a different object, so the next call
splits again.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple

import jax
from flax import nnx

from dvl_jax.diffusion.sampling_mesh import Placement
from dvl_jax.models.interface import DiffusionLM


class StaticGraph:
  """A graphdef as a jit static argument, hashed once: jit hashes its static arguments on every call, and
  hashing a graphdef walks all of it (about 0.8 ms for the demo's model). Equal when the graphdefs are."""

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef: Any):
    self.graphdef, self._hash = graphdef, hash(graphdef)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    return isinstance(other, StaticGraph) and (self.graphdef is other.graphdef or (
        self._hash == other._hash and self.graphdef == other.graphdef))


class ModelSplit(NamedTuple):
  graph: StaticGraph
  state: dict  # the params' current arrays as a pure nested dict (what the jitted programs take)
  placement: Placement  # where they live (`Placement.of`)


class _Split(NamedTuple):
  graph: StaticGraph
  treedef: Any  # of the pure state
  variables: list[nnx.Variable]  # the model's own, in the pure state's leaf order
  live: nnx.State  # of those Variables (their metadata for `Placement.of`)
  reachable: list[Any]  # `_reachable(model)` when it was split (held, so no id is reused)
  placed: dict[str, Any]  # {"shardings": of the arrays last placed, "placement": theirs}


_SPLITS: "weakref.WeakKeyDictionary[DiffusionLM, _Split]" = weakref.WeakKeyDictionary()


def split(model: DiffusionLM) -> ModelSplit:
  """`nnx.split(model)` as a `ModelSplit`; the graphdef is the previous call's when nothing reachable in the model
  changed, the state always holds the params' current arrays, and the placement is recomputed when a sharding
  changed."""
  reachable = _reachable(model)
  hit = _SPLITS.get(model)
  if hit is None or len(hit.reachable) != len(reachable) or not all(a is b for a, b in zip(hit.reachable, reachable)):
    graphdef, flat = nnx.graph.flatten(model, with_paths=True)
    live = nnx.from_flat_state(zip(flat.paths, flat.leaves))
    pure_leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(live))
    by_array = {id(v.get_raw_value()): v for v in flat.leaves}
    hit = _Split(StaticGraph(graphdef), treedef, [by_array[id(a)] for a in pure_leaves], live, reachable, {})
    _SPLITS[model] = hit
  arrays = [v.get_raw_value() for v in hit.variables]
  shardings = tuple(a.sharding for a in arrays)
  if hit.placed.get("shardings") != shardings:
    hit.placed.update(shardings=shardings, placement=Placement.of(model.config, hit.live))
  return ModelSplit(hit.graph, jax.tree.unflatten(hit.treedef, arrays), hit.placed["placement"])


def _reachable(model: DiffusionLM) -> list[Any]:
  """Every attribute object of the model's modules (and of their lists, tuples and dicts) in a fixed order."""
  seen, stack, modules = [], [model], set()
  while stack:
    node = stack.pop()
    kind = _kind(type(node))
    if kind == "module":
      if id(node) in modules:  # shared (tied) modules are walked once
        continue
      modules.add(id(node))
    for value in (vars(node).values() if kind == "module" else node):
      seen.append(value)
      inner = _kind(type(value))
      if inner == "dict":
        stack.append(list(value.items()))
      elif inner is not None:
        stack.append(value)
  return seen


@functools.cache
def _kind(cls: type) -> str | None:
  """How `_reachable` walks an object of this type (cached: `nnx.Pytree` is an ABC, slow to test per object)."""
  if issubclass(cls, nnx.Pytree):
    return "module"
  if issubclass(cls, (list, tuple)):
    return "sequence"
  return "dict" if issubclass(cls, dict) else None
