"""The shape of every usable row, computed once before training (text tokenized, image headers read).

Knowing every row's length and image grids up front is what lets all processes agree on the same
bucketed batch shapes without talking to each other, and it finds most bad rows before the first
step instead of in the middle of a run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import tqdm

from dvl_jax.data.bad_rows import BadRow, BadRowCounter
from dvl_jax.data.llava_json import Record, to_record
from dvl_jax.data.samples import RowShape, SampleEncoder


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
  """Usable rows and their shapes; `lengths`, `patches` `[num_rows]`."""

  records: tuple[Record, ...]
  shapes: tuple[RowShape, ...]

  @property
  def lengths(self) -> np.ndarray:
    return np.array([s.length for s in self.shapes], np.int64)

  @property
  def patches(self) -> np.ndarray:
    return np.array([s.patches for s in self.shapes], np.int64)

  @property
  def eos_tokens(self) -> np.ndarray:
    return np.array([s.eos_tokens for s in self.shapes], np.int64)

  def __len__(self) -> int:
    return len(self.records)

  @classmethod
  def build(cls, rows: Sequence[Any], encoder: SampleEncoder, counter: BadRowCounter) -> "DatasetIndex":
    """Measures every raw row; bad rows are counted in `counter` and left out."""
    records, shapes = [], []
    for position, row in enumerate(tqdm.tqdm(rows, desc="indexing rows", unit="row", disable=None)):
      try:
        record = to_record(row, position)
        shapes.append(encoder.shape(record))
        records.append(record)
      except BadRow as e:
        counter.add(e, str(row.get("id", position)) if isinstance(row, dict) else str(position))
    return cls(tuple(records), tuple(shapes))
