"""Writes safetensors checkpoints one tensor at a time.

A safetensors header needs only names, dtypes and shapes, so it is written first and each tensor's
bytes are appended as they are produced; files are split into shards (with the Hugging Face index
json) when the checkpoint is larger than `max_shard_bytes`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Sequence

import numpy as np

from checkpoints_convert.safetensors_reader import DTYPES, INDEX_FILE

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
  """A tensor to write: its header entry now, its data from `produce()` when its turn comes."""

  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def write_checkpoint(dst_dir: str, tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[str]:
  """Writes `model.safetensors`, or numbered shards plus `model.safetensors.index.json`."""
  shards: list[list[PlannedTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  n = len(shards)
  names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  for name, shard in zip(names, shards):
    write_file(os.path.join(dst_dir, name), shard)
  if n > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(dst_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names


def write_file(path: str, tensors: Sequence[PlannedTensor]) -> None:
  """One safetensors file (metadata `format: pt`, which `transformers` requires)."""
  header, offset = {}, 0
  for t in tensors:
    header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  header["__metadata__"] = {"format": "pt"}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for t in tensors:
      f.write(_data(t))  # no reference survives the call: one tensor alive at a time


def _data(t: PlannedTensor) -> np.ndarray:
  x = np.ascontiguousarray(t.produce())
  if x.dtype != t.dtype or x.shape != t.shape:
    raise AssertionError(f"{t.name}: produced {x.dtype}{list(x.shape)}, planned {t.dtype}{list(t.shape)}")
  return x.reshape(-1).view(np.uint8)
