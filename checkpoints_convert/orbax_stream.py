"""Orbax checkpoints written and read one block at a time (one layer of a stacked param, or one tensor).

`Checkpointer.save(tree)` needs every leaf in memory at once. Here a leaf is a `StreamedArray` that
produces its data block by block while it is saved: `_StreamedArrayHandler` (a `NumpyHandler`) builds
the TensorStore spec exactly as `NumpyHandler` does and writes the blocks into it one after another,
one leaf at a time. The result is an ordinary Orbax checkpoint that `StandardCheckpointer.restore`
reads onto any sharding. Stacked params are chunked one layer per chunk row (`shard_axes=(0,)`), so
a block write never straddles a chunk, and chunks stay below `_CHUNK_BYTES` so that a device reading
its shard decodes little it does not need.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

ParamPath = tuple[str, ...]
_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
  """A leaf whose rows arrive in equal blocks along axis 0; block k is `blocks[k]()`."""

  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Sequence[Callable[[], np.ndarray]]


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes `StreamedArray`s sequentially, block by block, in `NumpyHandler`'s on-disk format."""

  async def serialize(self, values: Sequence[StreamedArray], infos: Sequence[ocp.type_handlers.ParamInfo],
                      args: Sequence[ocp.SaveArgs] | None = None) -> list[Any]:
    args = args or [ocp.SaveArgs()] * len(values)
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      use_ocdbt = bool(info.is_ocdbt_checkpoint)
      tspec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
          process_index=jax.process_index() if use_ocdbt else None, arg=arg)
      if jax.process_index() != 0:  # host data: one process writes it, like NumpyHandler
        continue
      array = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
      rows = value.shape[0] // len(value.blocks)
      for k, block in enumerate(value.blocks):
        await array[k * rows:(k + 1) * rows].write(block())
    return []  # written before returning: nothing left to commit in the background


def save(path: str, tree: Any) -> None:
  """Saves a pytree of `StreamedArray`s (e.g. an nnx State holding them) as an Orbax checkpoint."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (StreamedArray, _StreamedArrayHandler()),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # Orbax takes its metadata store from here
  )
  save_args = jax.tree.map(
      lambda a: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES, shard_axes=(0,) if len(a.blocks) > 1 else ()), tree)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
    ckptr.save(epath.Path(path), args=ocp.args.PyTreeSave(tree, save_args=save_args))


def variables(state: nnx.State) -> dict[ParamPath, nnx.Variable]:
  """The Variables of a state by their path of string keys."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {path_keys(path): var for path, var in flat}


@dataclasses.dataclass(frozen=True)
class CheckpointArrays:
  """The arrays of an Orbax checkpoint, opened lazily for reading one slice at a time."""

  found: dict[ParamPath, ts.TensorStore]  # by param path
  missing: list[str]
  unexpected: list[str]
  mismatched: list[str]

  def read(self, param: ParamPath, layer: int | None) -> np.ndarray:
    array = self.found[param]
    return (array if layer is None else array[layer]).read().result()


def open_arrays(params_dir: str, state: nnx.State) -> CheckpointArrays:
  """Matches the checkpoint's arrays against an (abstract) state, by path and shape."""
  path = epath.Path(params_dir)
  meta = ocp.PyTreeCheckpointHandler().metadata(path)
  stored = {path_keys(p): m for p, m in jax.tree_util.tree_flatten_with_path(meta.tree)[0]}
  # A Variable's array sits below it in the tree (under `value`): zip both flattenings to pair them.
  leaf_paths = [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(path)
  context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
  found, missing, mismatched = {}, [], []
  for (param, var), leaf in zip(variables(state).items(), leaf_paths):
    m = stored.pop(leaf, None)
    if m is None:
      missing.append(".".join(param))
    elif tuple(m.shape) != tuple(var.shape):
      mismatched.append(f"{'.'.join(param)}: {list(m.shape)} in the checkpoint, {list(var.shape)} expected")
    else:
      info = ocp.type_handlers.ParamInfo(name=m.name, parent_dir=path, is_ocdbt_checkpoint=use_ocdbt,
                                         use_zarr3=meta.use_zarr3, ts_context=context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
      found[param] = ts.open(ts.Spec(spec), open=True, context=context).result()
  return CheckpointArrays(found, missing, [".".join(p) for p in stored], mismatched)


def path_keys(path: tuple[Any, ...]) -> ParamPath:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
