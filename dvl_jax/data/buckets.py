"""Length buckets and the global batch plan: few static shapes, the same plan on every process.

Every row goes to the smallest bucket that holds it; batches are formed inside one bucket (and one
modality, the effect of the repo's `group_by_modality_length` sampler, spec §4.7) and padded to the
bucket length, so jit sees at most two shapes per bucket. Image patches are padded per batch shard to
a static budget of the bucket as well. The plan is a pure function of (row shapes, seed, epoch), so
all processes build it independently and agree on every batch's shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def choose_buckets(lengths: np.ndarray, num_buckets: int, multiple: int, max_length: int) -> tuple[int, ...]:
  """The at most `num_buckets` lengths (multiples of `multiple`, capped at `max_length`) that minimise
  the total padding of rows of `lengths` `[n]` (exact dynamic programme over the distinct lengths)."""
  rounded = np.minimum(-(-np.asarray(lengths) // multiple) * multiple, max_length)
  values, counts = np.unique(rounded, return_counts=True)
  n_cnt = np.concatenate([[0], np.cumsum(counts)])
  n_sum = np.concatenate([[0], np.cumsum(counts * values)])

  def cost(i: Any, j: int) -> Any:  # rows with values[i..j] padded to values[j]
    return values[j] * (n_cnt[j + 1] - n_cnt[i]) - (n_sum[j + 1] - n_sum[i])

  # best[j]: least padding of values[0..j] with the current number of buckets, the last ending at j.
  u, k = len(values), min(num_buckets, len(values))
  best, starts = np.array([cost(0, j) for j in range(u)]), []
  for _ in range(1, k):
    new, start = best.copy(), np.zeros(u, np.int64)
    for j in range(1, u):
      i = np.arange(1, j + 1)
      c = best[i - 1] + cost(i, j)
      new[j], start[j] = c.min(), i[c.argmin()]
    best = new
    starts.append(start)
  edges, j = [int(values[-1])], u - 1
  for start in reversed(starts):
    if start[j] == 0:
      break
    j = int(start[j]) - 1
    edges.append(int(values[j]))
  return tuple(sorted(edges))


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One global batch: `rows` `[batch_size]` (dataset indices in batch order) padded to `length`
  tokens, with `patches` pixel rows per batch shard (0: the batch has no images)."""

  length: int
  patches: int
  rows: np.ndarray


def _check_divisible(batch_size: int, shards: int, micro_batches: int) -> None:
  """Every micro-batch gives each batch shard the same whole number of rows: one line naming the fix otherwise."""
  if batch_size % (shards * micro_batches) == 0:
    return
  fits = [a for a in range(micro_batches, 0, -1) if batch_size % (shards * a) == 0]
  fixes = f"batch_size={-(-batch_size // (shards * micro_batches)) * shards * micro_batches}"
  fixes += f" or micro_batches={fits[0]}" if fits else ""
  raise ValueError(f"batch_size={batch_size} must be a multiple of the {shards} batch shards (mesh data x fsdp) "
                   f"times micro_batches={micro_batches}, {shards * micro_batches}: use {fixes}")


class BatchPlan:
  """Deterministic global batches of each epoch, indexable as one endless sequence.

  Rows are shuffled with `(seed, epoch)`; inside each (modality, bucket) group they are cut into
  batches, a group's remainder moves up to the next bucket, and the last remainder is dropped
  (`drop_last`, as the repo). Batches are then shuffled across groups.
  """

  def __init__(self, lengths: np.ndarray, patches: np.ndarray, *, batch_size: int, buckets: Sequence[int],
               num_shards: int, micro_batches: int = 1, seed: int = 0, shuffle: bool = True,
               group_by_modality: bool = True):
    self.lengths, self.patches = np.asarray(lengths, np.int64), np.asarray(patches, np.int64)
    self.buckets = tuple(int(b) for b in buckets)
    if list(self.buckets) != sorted(set(self.buckets)):
      raise ValueError(f"buckets {self.buckets} must be strictly increasing")
    if self.lengths.size and self.lengths.max() > self.buckets[-1]:
      raise ValueError(f"rows have up to {self.lengths.max()} tokens but the largest bucket is {self.buckets[-1]}")
    _check_divisible(batch_size, num_shards, micro_batches)
    num_shards *= micro_batches  # every micro-batch splits over the shards: the plan cuts batches that finely
    self.batch_size, self.num_shards, self.seed, self.shuffle = batch_size, num_shards, seed, shuffle
    self.bucket = np.searchsorted(self.buckets, self.lengths)
    self.group = (self.patches > 0).astype(np.int64) if group_by_modality else np.zeros_like(self.lengths)
    rows_per_shard = batch_size // num_shards
    # Patch budget of a (group, bucket): the largest row it can hold, remainders from below included.
    self.budget = np.zeros((2, len(self.buckets)), np.int64)
    for g in range(2):
      for b in range(len(self.buckets)):
        members = self.patches[(self.group == g) & (self.bucket <= b)]
        self.budget[g, b] = rows_per_shard * members.max(initial=0)
    self._cached: tuple[int, list[PlannedBatch]] = (-1, [])
    self.batches_per_epoch = len(self.epoch(0))
    if not self.batches_per_epoch:
      raise ValueError(f"{len(self.lengths)} usable rows do not fill one batch of {batch_size}")

  def epoch(self, epoch: int) -> list[PlannedBatch]:
    """The batches of one epoch (the latest epoch is cached; a plain attribute keeps the plan picklable)."""
    cached = self._cached  # one read: loader threads may replace it concurrently
    if cached[0] != epoch:
      cached = self._cached = (epoch, self._plan(epoch))
    return cached[1]

  def _plan(self, epoch: int) -> list[PlannedBatch]:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
    batches = []
    for g in np.unique(self.group):
      carry = np.zeros(0, np.int64)
      for b, length in enumerate(self.buckets):
        pool = np.concatenate([carry, order[(self.group[order] == g) & (self.bucket[order] == b)]])
        full = len(pool) // self.batch_size * self.batch_size
        for rows in pool[:full].reshape(-1, self.batch_size):
          patches = int(self.budget[g, b]) if self.patches[rows].any() else 0
          batches.append(PlannedBatch(length, patches, rows))
        carry = pool[full:]
    if self.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def __getitem__(self, index: int) -> PlannedBatch:
    epoch, position = divmod(int(index), self.batches_per_epoch)
    return self.epoch(epoch)[position]
