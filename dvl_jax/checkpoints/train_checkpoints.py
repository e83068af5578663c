"""Training checkpoints: Orbax `CheckpointManager` over the train state and the data iterator.

Each step directory holds `state` (every array of the `TrainState`, written by each process for the
shards it owns, restorable onto any mesh from an abstract target) and `data` (the grain iterator's
JSON state, so a resumed run sees the same batches). Saves are asynchronous; Orbax writes a step to a
temporary directory and renames it only when complete, so a run killed mid-write resumes from the
previous step; `keep` bounds how many steps stay on disk.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from dvl_jax.core import storage


class TrainCheckpoints:
  """`save(step, state, data_state)`, `latest_step()`, `restore(step, abstract_state)`; paths may be `gs://`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(storage.as_path(directory), options=options, item_names=("state", "data"))

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts writing `step` (returns once the arrays are copied off the devices)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)), force=True)

  def latest_step(self) -> int | None:
    """The newest complete step (incomplete writes are never listed)."""
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(train state placed as `abstract_state`'s shardings, data iterator state) of `step`."""
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
