"""A planned global batch -> this process's NumPy arrays: its batch shards' rows and pixels.

Runs inside grain workers/threads. A row that fails only now (an image deleted or corrupted after
indexing) cannot be dropped without changing the batch shape every process agreed on, so it becomes
a dead row: no attention, no labels, zero pixels, but as many image tokens as the plan expects, which
keeps the image-feature splice of the other rows aligned.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from dvl_jax.core.config import ModelConfig
from dvl_jax.data.bad_rows import UNREADABLE_IMAGE, BadRow
from dvl_jax.data.buckets import PlannedBatch
from dvl_jax.data.dataset_index import DatasetIndex
from dvl_jax.data.labels import IGNORE
from dvl_jax.data.samples import SampleEncoder, patch_dim


class HostBatcher:
  """Builds `input_ids`, `labels`, `attention_mask` `[len(owned) * B / K, L]`, `pixel_values`
  `[len(owned) * patches, patch_dim]` and the global image layout (the family's `sharded_layout`; every
  process computes the same one) for the batch shards `owned` of the `num_shards` shards of a planned
  batch. `bad_rows` lists the `(row_id, BadRow)` that became dead rows; `pixel_rows` `[2]` counts the real
  and all pixel rows of the whole batch (padding metrics).

  With `micro_batches=A` the planned batch (planned with `num_shards * A` shards) is cut into A
  micro-batches stacked on a new leading axis; micro-batch `a` of batch shard `s` is plan shard
  `s * A + a`, so a process still owns the same rows and each micro-batch's patch budget covers only
  its own rows (no A-fold ViT padding).
  """

  def __init__(self, index: DatasetIndex, encoder: SampleEncoder, config: ModelConfig, *, num_shards: int,
               owned: Sequence[int], micro_batches: int | None = None):
    self.index, self.encoder, self.config = index, encoder, config
    self.num_shards, self.owned, self.micro_batches = num_shards, tuple(owned), micro_batches

  def __call__(self, planned: PlannedBatch) -> dict[str, Any]:
    if self.micro_batches is None:
      return self._batch(planned.length, planned.patches, np.split(planned.rows, self.num_shards))
    a = self.micro_batches
    chunks = np.split(planned.rows, self.num_shards * a)
    micro = [self._batch(planned.length, planned.patches, chunks[i::a]) for i in range(a)]
    out = {k: np.stack([m[k] for m in micro]) for k in micro[0] if k not in ("vision", "bad_rows", "pixel_rows")}
    if "vision" in micro[0]:
      out["vision"] = jax.tree.map(lambda *x: np.stack(x), *[m["vision"] for m in micro])
    out["bad_rows"] = [bad for m in micro for bad in m["bad_rows"]]
    out["pixel_rows"] = sum(m["pixel_rows"] for m in micro)
    return out

  def _batch(self, length: int, budget: int, shards: Sequence[np.ndarray]) -> dict[str, Any]:
    cfg = self.config
    n = len(self.owned) * len(shards[0])
    out = {
        "input_ids": np.full((n, length), cfg.pad_token_id, np.int32),
        "labels": np.full((n, length), IGNORE, np.int32),
        "attention_mask": np.zeros((n, length), np.int32),
    }
    pixels = np.zeros((len(self.owned) * budget, patch_dim(cfg)), np.float32)
    bad_rows, row = [], 0
    for s, k in enumerate(self.owned):
      offset = s * budget
      for i in shards[k]:
        ids, labels, alive, px = self._row(int(i), bad_rows)
        out["input_ids"][row, :len(ids)], out["labels"][row, :len(ids)] = ids, labels
        out["attention_mask"][row, :len(ids)] = alive
        pixels[offset:offset + len(px)] = px
        offset, row = offset + len(px), row + 1
    shapes = [[self.index.shapes[i] for i in rows] for rows in shards]
    if budget:
      layout = self.encoder.images.sharded_layout(
          [np.array([g for row in shard for g in row.grids]) for shard in shapes],
          [np.array([u for row in shard for u in row.used_tokens], np.int64) for shard in shapes], budget, cfg.vision)
      out["pixel_values"], out["vision"] = pixels, layout
    out["bad_rows"] = bad_rows
    out["pixel_rows"] = np.array([sum(row.patches for shard in shapes for row in shard), len(shards) * budget])
    return out

  def _row(self, i: int, bad_rows: list) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(input_ids, labels, attention value, pixel_values) of dataset row `i`, or its dead row."""
    record, shape = self.index.records[i], self.index.shapes[i]
    try:
      sample = self.encoder.encode(record)
      if sample.shape != shape:
        raise BadRow(UNREADABLE_IMAGE, "its images changed since the data set was indexed")
      return sample.input_ids, sample.labels, 1, sample.pixel_values
    except BadRow as e:
      bad_rows.append((record.id, e))
      ids = np.full(sum(shape.used_tokens), self.config.image_token_id, np.int64)
      return ids, np.full_like(ids, IGNORE), 0, np.zeros((shape.patches, patch_dim(self.config)), np.float32)
