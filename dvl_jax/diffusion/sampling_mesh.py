"""The samplers over a `('data', 'fsdp', 'tensor')` mesh: which mesh to pick, and what goes where.

The mesh comes from the model: params placed by `dvl.load(ckpt, mesh=...)` (or `jax.device_put` with
`rules.logical_shardings`) carry `NamedSharding`s, and `Placement.of` derives every other sharding from
their mesh, so a user passes a sharded model and nothing else. Layout while sampling:

* params stay where the logical rules put them. Inside the jitted sampler, attention projections whose
  head count `tensor` does not divide are gathered over `tensor` once per call (outside the decoding
  loop): every device then holds whole heads, so RoPE and attention need no collectives;
* batch rows (prompts, outputs, per-row loop state, the KV cache) are sharded over `data` only. `fsdp`
  keeps sharding the params' embedding dimension while activations stay replicated over it: a forward
  then moves activation-sized partial sums over `fsdp`, whereas rows sharded over `fsdp` as well would
  all-gather every weight in every forward (the whole model per denoising step, at sampling's small
  batches). A batch that `data` does not divide is padded with dead rows (length 0, done from the start);
* the KV cache `[layers, B, max_len, kv_heads, head_dim]` is `P(None, 'data', None, 'tensor', None)`
  when `tensor` divides the KV heads, else replicated over `tensor` (with a one-time warning);
* image patches are sharded over `data` when it divides their count; ViT heads / MLP follow the rules;
* Pallas attention kernels, which XLA cannot split, run per device under `shard_map` on these rows and kv heads
  (`Placement.tracing` around every program's body).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dvl_jax.attention import shards
from dvl_jax.core.config import ModelConfig
from dvl_jax.models.families import abstract_model
from dvl_jax.parallel import rules
from dvl_jax.parallel.mesh import AXES

PARAM_SHARE = 0.5  # suggest_mesh keeps params within this share of a device's memory (the rest: cache, activations)
_WARNED: set[tuple[int, int]] = set()
Carry = TypeVar("Carry", bound=tuple)  # a decoding loop's carry: a NamedTuple, the KV cache first


def suggest_mesh(cfg: ModelConfig, num_devices: int | None = None, *, batch: int | None = None,
                 memory_per_device: int | None = None, override: str | Sequence[int] | None = None
                 ) -> tuple[int, int, int]:
  """A `(data, fsdp, tensor)` shape for sampling `cfg` on `num_devices` (default: all devices).

  `tensor` is the largest device-count divisor that divides both the query and the KV heads (whole KV
  heads per device, so the cache is sharded, never replicated); `fsdp` is the smallest factor that fits
  the params in `PARAM_SHARE` of `memory_per_device` bytes (default: the device's reported limit; none on
  CPU); `data` takes what is left up to `batch` rows, and devices beyond that go to `fsdp`, which splits
  the weights further instead of computing padding rows. `override` ("2,1,4", "2x1x4" or a sequence: the
  CLI's / config's `mesh` value) is validated and returned as is.
  """
  n = jax.device_count() if num_devices is None else int(num_devices)
  if override is not None:
    shape = tuple(int(s) for s in (re.split(r"[x,\s]+", override.strip()) if isinstance(override, str) else override))
    if len(shape) != len(AXES) or int(np.prod(shape)) != n:
      raise ValueError(f"mesh {override!r} must be {len(AXES)} sizes for {AXES} whose product is {n} devices")
    return shape
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  tensor = max(d for d in divisors if cfg.text.num_kv_heads % d == 0 and cfg.text.num_heads % d == 0)
  rest = n // tensor
  if memory_per_device is None:
    memory_per_device = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  need = 1.0 if memory_per_device is None else param_bytes(cfg) / (tensor * PARAM_SHARE * memory_per_device)
  fsdp = next((f for f in divisors if rest % f == 0 and f >= need), rest)
  data = max(d for d in divisors if (rest // fsdp) % d == 0 and d <= (batch or n))
  return data, n // (tensor * data), tensor


def param_bytes(cfg: ModelConfig) -> int:
  """Bytes of all params of the model `cfg` (from shapes only)."""
  state = nnx.state(abstract_model(cfg))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the sampler's arrays live: hashable, so the jitted samplers are cached per placement.

  `mesh` None is one device: no shardings, no constraints, no padded rows (the unsharded sampler).
  `tree` is the structure of the params as a pure nested dict (the state the jitted programs take);
  `params` are the logical-rule shardings the params must already have (the jit's in_shardings);
  `compute_params` are the ones the sampler computes with (whole heads per device, see the module doc).
  """

  mesh: Mesh | None = None
  tree: Any = None
  params: tuple[NamedSharding, ...] = ()
  compute_params: tuple[NamedSharding, ...] = ()
  kv_sharded: bool = True
  activations: tuple[tuple[str, Any], ...] = ()  # the rules' overrides for the rows and heads of activations

  @classmethod
  def of(cls, cfg: ModelConfig, state: nnx.State) -> "Placement":
    """The placement of a model's params: one device, or the mesh their `NamedSharding`s share."""
    shardings = {x.sharding for x in jax.tree.leaves(state)}
    meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding)}
    if not meshes:
      if len({d for s in shardings for d in s.device_set}) > 1:
        raise ValueError("params are spread over several devices without a mesh; place them with "
                         "dvl.load(ckpt, mesh=dvl.make_mesh(shape)) to sample on several devices")
      return cls()
    mesh = meshes.pop()
    if meshes or not all(isinstance(s, NamedSharding) for s in shardings):
      raise ValueError("params must all live on one mesh (dvl.load(ckpt, mesh=...)) or on one device")
    if tuple(mesh.axis_names) != AXES:
      raise ValueError(f"sampling needs a mesh with axes {AXES} (dvl.make_mesh), got {tuple(mesh.axis_names)}")
    want, tree = jax.tree.flatten(nnx.to_pure_dict(rules.logical_shardings(state, mesh)))
    for (path, x), s in zip(jax.tree.leaves_with_path(nnx.to_pure_dict(state)), want, strict=True):
      if not x.sharding.is_equivalent_to(s, x.ndim):
        raise ValueError(f"param {jax.tree_util.keystr(path)} is sharded as {x.sharding.spec}, the logical rules "
                         f"say {s.spec}; place params with dvl_jax.parallel.rules.logical_shardings (dvl.load does)")
    t = cfg.text
    tensor = mesh.shape["tensor"]
    kv_sharded, heads_sharded = t.num_kv_heads % tensor == 0, t.num_heads % tensor == 0
    if not kv_sharded and (t.num_kv_heads, tensor) not in _WARNED:
      _WARNED.add((t.num_kv_heads, tensor))
      warnings.warn(f"the mesh's tensor axis ({tensor}) does not divide the model's {t.num_kv_heads} KV heads: "
                    f"K/V projections and the KV cache are replicated over 'tensor' ({tensor}x the cache memory "
                    f"per device); a tensor axis dividing {t.num_kv_heads} avoids it (see suggest_mesh)",
                    stacklevel=5)
    compute_rules = {**rules.RULES, "heads": "tensor" if heads_sharded else None,
                     "kv_heads": "tensor" if kv_sharded else None}
    compute = jax.tree.map(
        lambda v: NamedSharding(mesh, rules.partition_spec(v.get_metadata().get("axes", (None,) * v.get_value().ndim),
                                                           v.get_value().shape, mesh, compute_rules)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    activations = (("batch", "data"), ("heads", compute_rules["heads"]), ("kv_heads", compute_rules["kv_heads"]))
    return cls(mesh, tree, tuple(want), tuple(jax.tree.leaves(nnx.to_pure_dict(compute))), kv_sharded, activations)

  def _named(self, *spec: Any) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  @property
  def param_shardings(self) -> Any:
    return jax.tree.unflatten(self.tree, self.params)

  @property
  def rows(self) -> NamedSharding:
    """Arrays whose leading axis is the batch."""
    return self._named("data")

  @property
  def replicated(self) -> NamedSharding:
    return self._named()

  @property
  def cache(self) -> NamedSharding:
    """The KV cache `[layers, B, max_len, kv_heads, head_dim]` (one sharding for keys and values)."""
    return self._named(None, "data", None, "tensor" if self.kv_sharded else None, None) if self.mesh else None

  def batch(self, rows: int, least: int = 1) -> int:
    """Rows after padding: at least `least`, a multiple of the `data` axis."""
    rows = max(rows, least)
    return rows if self.mesh is None else -(-rows // self.mesh.shape["data"]) * self.mesh.shape["data"]

  def pad_rows(self, a: Any, fill: Any = 0, rows: int | None = None) -> np.ndarray:
    """`a` `[B, ...]` (NumPy) with dead rows of `fill` appended up to `rows` (default `batch(B)`)."""
    a = np.asarray(a)
    rows = rows or self.batch(a.shape[0])
    if rows == a.shape[0]:
      return a
    return np.concatenate([a, np.full((rows - a.shape[0], *a.shape[1:]), fill, a.dtype)])

  def pad_keys(self, keys: jax.Array, rows: int | None = None) -> jax.Array:
    """Row keys `[B]` with the last key repeated for the dead rows, up to `rows` (default `batch(B)`)."""
    rows = rows or self.batch(keys.shape[0])
    return keys if rows == keys.shape[0] else keys[np.minimum(np.arange(rows), keys.shape[0] - 1)]

  # ---- inside the jitted sampler (identity on one device) ----------------------------------------
  def tracing(self) -> contextlib.AbstractContextManager:
    """Around a program's body: attention kernels split per device as the rows and heads above
    (`attention.shards`; XLA cannot split a kernel and would gather the whole KV cache onto every device each
    step)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return shards.splitting(self.mesh, {**rules.RULES, **dict(self.activations)})

  def constrain_params(self, state: Any) -> Any:
    if self.mesh is None:
      return state
    return jax.lax.with_sharding_constraint(state, jax.tree.unflatten(self.tree, self.compute_params))

  def pin_loop(self, carry: Carry) -> Carry:
    """A decoding loop's carry (a NamedTuple: the KV cache, then arrays) pinned: the cache to `.cache`, arrays
    with a leading batch axis to `rows`, scalars replicated. Its sharding then cannot drift between iterations."""
    if self.mesh is None:
      return carry
    constrain = jax.lax.with_sharding_constraint
    cache, *per_row = carry
    return type(carry)(constrain(cache, self.cache),
                       *(constrain(x, self.rows if x.ndim else self.replicated) for x in per_row))

  def constrain_patches(self, pixel_values: jax.Array) -> jax.Array:
    """Image patch rows over `data`, so the vision tower's per-patch work is split like the batch."""
    if self.mesh is None or pixel_values.shape[0] % self.mesh.shape["data"]:
      return pixel_values
    return jax.lax.with_sharding_constraint(pixel_values, self.rows)


@functools.lru_cache(maxsize=None)
def jit_sampler(fun: Callable[..., Any], placement: Placement,
                shardings: Callable[[Placement], dict[str, Any]]) -> Callable[..., Any]:
  """`fun(graphdef, config, *arrays, placement=...)` jitted once per placement: static graphdef and config,
  donated `cache`, and on a mesh the explicit `in_shardings` / `out_shardings` (of the arrays) that
  `shardings(placement)` gives."""
  return jax.jit(functools.partial(fun, placement=placement), static_argnums=(0, 1), donate_argnames=("cache",),
                 **({} if placement.mesh is None else shardings(placement)))
