"""The training input pipeline: LLaVA rows -> bucketed global batches on the mesh, resumable.

    pipeline = DataPipeline.from_json("train.json", processor, DataConfig(batch_size=32), mesh,
                                      image_folder="images/")
    it = iter(pipeline)
    batch = next(it)          # dict of global jax.Arrays, batch axis sharded over ('data', 'fsdp')
    state = it.get_state()    # JSON-able; it.set_state(state) resumes with the same next batches
    it.metrics()              # bad rows per kind, padding fractions

Every process indexes all rows and builds the same seeded batch plan, then loads only the rows of the
batch shards its devices hold (per-process sharding without any communication) and the arrays are
assembled with `jax.make_array_from_process_local_data`. grain runs the loading (threads by default,
worker processes with `worker_count`); placement on devices happens in the consuming thread.

Batch dict (the losses' input, `dvl_jax.diffusion.loss`): `input_ids`, `labels`, `attention_mask`
`[B, L]` int32 with `L` a bucket length; with images also `pixel_values` `[K * P, patch_dim]` float32
(K batch shards of P pixel rows, each zero-padded) and `vision`, the matching layout of the model family
(its image hook's `sharded_layout`: Qwen2.5-VL's `VisionLayout`, DiffusionVL-Qwen's `AnyresLayout`;
replicated).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dvl_jax.data.bad_rows import BadRowCounter
from dvl_jax.data.buckets import BatchPlan, choose_buckets
from dvl_jax.data.dataset_index import DatasetIndex
from dvl_jax.data.host_batch import HostBatcher
from dvl_jax.data.llava_json import read_rows
from dvl_jax.data.processor import Processor
from dvl_jax.data.samples import SampleEncoder
from dvl_jax.parallel.rules import RULES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Data options of a run; token ids and the block size come from the model config.

  These defaults are the run config's too: its `data` section is generated from this class
  (`dvl_jax/training/run_config.py`). `buckets=None` picks `num_buckets` lengths (multiples of
  `length_multiple` and of the block size) minimising padding on the data. `square_pad` and
  `block_aligned_eos` are the training settings of spec §2.1 / §4.5 (turn EOS padding off for AR
  training; `square_pad` None: the model family's default, see `SampleEncoder`). min/max pixels
  belong to the `Processor`.
  """

  batch_size: int = 256      # global, all processes
  max_length: int = 8192
  buckets: tuple[int, ...] | None = None
  num_buckets: int = 4
  length_multiple: int = 64
  square_pad: bool | None = None
  block_aligned_eos: bool = True
  group_by_modality: bool = True
  shuffle: bool = True
  seed: int = 0
  num_threads: int = 16      # grain reader threads
  prefetch: int = 4
  worker_count: int = 0      # grain worker processes (0: threads of this process)
  micro_batches: int | None = None  # A: batch leaves [A, batch_size / A, ...]; None: [batch_size, ...]


def batch_shards(mesh: Mesh) -> tuple[int, list[int]]:
  """(number of batch shards K over the batch mesh axes, the shards this process's devices hold)."""
  axes = RULES["batch"]
  num = math.prod(mesh.shape[a] for a in axes)
  indices = NamedSharding(mesh, PartitionSpec(axes)).addressable_devices_indices_map((num,))
  return num, sorted({idx[0].start or 0 for idx in indices.values()})


class DataPipeline:
  """Indexes the rows, plans bucketed batches, and makes resumable iterators of global batches."""

  def __init__(self, rows: Sequence[Any], processor: Processor, config: DataConfig, mesh: Mesh, *,
               image_folder: str | None = None):
    model = processor.config
    if config.buckets and any(b % model.block_size for b in config.buckets):
      raise ValueError(f"buckets {config.buckets} must be multiples of block_size={model.block_size}")
    self.config, self.mesh = config, mesh
    self.bad_rows = BadRowCounter()
    encoder = SampleEncoder(processor, max_length=config.max_length, square_pad=config.square_pad,
                            block_aligned_eos=config.block_aligned_eos, image_folder=image_folder)
    self.index = DatasetIndex.build(rows, encoder, self.bad_rows)
    if not len(self.index):
      raise ValueError(f"none of the {len(rows)} rows is usable: {self.bad_rows.as_dict()}")
    multiple = math.lcm(config.length_multiple, model.block_size)
    buckets = config.buckets or choose_buckets(self.index.lengths, config.num_buckets, multiple, config.max_length)
    self.num_shards, owned = batch_shards(mesh)
    self.micro_batches = config.micro_batches or 1
    self.plan = BatchPlan(self.index.lengths, self.index.patches, batch_size=config.batch_size, buckets=buckets,
                          num_shards=self.num_shards, micro_batches=self.micro_batches, seed=config.seed,
                          shuffle=config.shuffle, group_by_modality=config.group_by_modality)
    self.batcher = HostBatcher(self.index, encoder, model, num_shards=self.num_shards, owned=owned,
                               micro_batches=config.micro_batches)
    report = self.padding_report()
    log.info("data: %d rows (%d skipped: %s), buckets %s, %d batches/epoch, padding: tokens %.1f%% "
             "(+%.1f%% block EOS), pixel rows %.1f%%", len(self.index), self.bad_rows.total,
             self.bad_rows.as_dict(), buckets, self.plan.batches_per_epoch, 100 * report["token_padding"],
             100 * report["eos_fraction"], 100 * report["patch_padding"])

  @classmethod
  def from_json(cls, path: str, processor: Processor, config: DataConfig, mesh: Mesh, *,
                image_folder: str | None = None) -> "DataPipeline":
    """From a LLaVA `.json` / `.jsonl` file; image paths are relative to `image_folder`."""
    return cls(read_rows(path), processor, config, mesh, image_folder=image_folder)

  def padding_report(self, epoch: int = 0) -> dict[str, Any]:
    """Waste of one epoch's plan: the fraction of token slots that are padding, of token slots that
    are block-aligned EOS (attended and supervised, so counted as real tokens otherwise), of pixel rows
    that are padding; rows dropped by `drop_last`; the distinct (length, patches per shard) shapes."""
    batches = self.plan.epoch(epoch)
    lengths, eos, patches = self.index.lengths, self.index.eos_tokens, self.index.patches
    token_slots = sum(self.plan.batch_size * b.length for b in batches)
    patch_slots = sum(self.num_shards * self.micro_batches * b.patches for b in batches)
    rows = np.concatenate([b.rows for b in batches])
    return {
        "batches": len(batches),
        "dropped_rows": len(self.index) - len(rows),
        "token_padding": float(1 - lengths[rows].sum() / token_slots),
        "eos_fraction": float(eos[rows].sum() / token_slots),
        "patch_padding": float(1 - sum(patches[b.rows].sum() for b in batches if b.patches) / max(1, patch_slots)),
        "shapes": sorted({(b.length, b.patches) for b in batches}),
    }

  def host_dataset(self) -> grain.IterDataset:
    """The endless grain dataset of this process's host batches (NumPy), in plan order."""
    ds = grain.MapDataset.range(sys.maxsize).map(self.plan.__getitem__).map(self.batcher)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.config.num_threads,
                                              prefetch_buffer_size=self.config.prefetch))
    if self.config.worker_count:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller never parsed them
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.worker_count))
    return ds

  def __iter__(self) -> "DataIterator":
    return DataIterator(self, iter(self.host_dataset()))


class DataIterator:
  """Global batches; `get_state`/`set_state` checkpoint the position (grain's) and the bad-row counts."""

  def __init__(self, pipeline: DataPipeline, host_iterator: Any):
    self._pipeline, self._host = pipeline, host_iterator
    self.bad_rows = BadRowCounter(pipeline.bad_rows.as_dict())
    self._tokens = np.zeros(2, np.int64)   # attended, slots (this process's rows)
    self._patches = np.zeros(2, np.int64)  # real, slots (whole batch)
    mesh, axes = pipeline.mesh, RULES["batch"]
    self._micro = () if pipeline.config.micro_batches is None else (pipeline.config.micro_batches,)
    self._rows = NamedSharding(mesh, PartitionSpec(*(None,) * len(self._micro), axes, None))
    self._replicated = NamedSharding(mesh, PartitionSpec())

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    host = next(self._host)
    for row_id, error in host.pop("bad_rows"):
      self.bad_rows.add(error, row_id)
    self._patches += host.pop("pixel_rows")
    self._tokens += (host["attention_mask"].sum(), host["attention_mask"].size)
    micro = self._micro
    rows_shape = (*micro, self._pipeline.config.batch_size // (micro or (1,))[0], host["input_ids"].shape[-1])
    batch = {k: jax.make_array_from_process_local_data(self._rows, host[k], rows_shape)
             for k in ("input_ids", "labels", "attention_mask")}
    if "pixel_values" in host:
      local = host["pixel_values"]  # this process's batch shards, all of the same number of rows
      shards, owned = self._pipeline.num_shards, len(self._pipeline.batcher.owned)
      patches_shape = (*local.shape[:-2], local.shape[-2] // owned * shards, local.shape[-1])
      batch["pixel_values"] = jax.make_array_from_process_local_data(self._rows, local, patches_shape)
      batch["vision"] = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self._replicated, x, x.shape), host["vision"])
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._host.get_state(), "bad_rows": self.bad_rows.as_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._host.set_state(state["grain"])
    self.bad_rows = BadRowCounter(state["bad_rows"])

  def close(self) -> None:
    """Stops grain's prefetch threads / worker processes."""
    self._host.close()

  def metrics(self) -> dict[str, float]:
    """Skipped rows per kind (indexing and loading, whole run) and padding fractions since this
    iterator started (tokens over this process's rows, pixel rows over whole batches)."""
    out = {f"data/bad_rows/{kind}": float(n) for kind, n in self.bad_rows.as_dict().items()}
    out["data/token_padding"] = float(1 - self._tokens[0] / max(1, self._tokens[1]))
    out["data/patch_padding"] = float(1 - self._patches[0] / max(1, self._patches[1]))
    return out
