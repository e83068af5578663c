"""Reads safetensors files tensor by tensor with plain file reads.

`safe_open` memory-maps whole files, and every page it touches stays resident in the process until
the file is closed: reading a 1 GB file tensor by tensor that way peaks at 1 GB of RSS. Reading each
tensor with `pread` into a fresh buffer keeps the peak at the tensor being converted. The format is
small: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`,
then the raw little-endian tensor data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from checkpoints_convert.errors import CorruptCheckpointError, NotACheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 << 20  # the Rust reader's own limit


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """Where one tensor lives: enough to read it (or a range of its rows) later."""

  name: str
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in the file

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str) -> dict[str, TensorRef]:
  """All tensors of one file; a truncated file or a broken header is a `CorruptCheckpointError`."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CorruptCheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER_BYTES, size - 8):
      raise CorruptCheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, "
                                   f"file of {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  refs, end = {}, 0
  for name, entry in header.items():
    try:
      dtype, shape, (begin, stop) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CorruptCheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {entry}") from None
    ref = TensorRef(name, path, dtype, shape, 8 + n + begin)
    if stop - begin != ref.nbytes:
      raise CorruptCheckpointError(f"{path}: {name!r} has {stop - begin} bytes but its shape {list(shape)} "
                                   f"and dtype {entry['dtype']} need {ref.nbytes}")
    refs[name], end = ref, max(end, stop)
  if 8 + n + end > size:
    raise CorruptCheckpointError(f"{path}: truncated: the header needs {8 + n + end} bytes, the file has {size}")
  return refs


def weight_files(src_dir: str, exclude: tuple[str, ...] = ()) -> list[str]:
  """The weight files of a checkpoint: those named by the index when there is one, else every file."""
  index_path = os.path.join(src_dir, INDEX_FILE)
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise CorruptCheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
    missing = [n for n in names if not os.path.isfile(os.path.join(src_dir, n))]
    if missing:
      raise CorruptCheckpointError(f"{index_path} names files that do not exist: {missing}")
  else:
    names = sorted(n for n in os.listdir(src_dir) if n.endswith(".safetensors") and n not in exclude)
  if not names:
    raise NotACheckpointError(f"{src_dir} is not a checkpoint: it holds no *.safetensors files")
  return [os.path.join(src_dir, n) for n in names]


def read(ref: TensorRef, rows: slice = slice(None)) -> np.ndarray:
  """The tensor (or a contiguous range of its leading rows) in a fresh, writable array."""
  start, stop, _ = rows.indices(ref.shape[0] if ref.shape else 1)
  row_bytes = ref.nbytes // ref.shape[0] if ref.shape else ref.nbytes
  shape = (stop - start, *ref.shape[1:]) if ref.shape else ()
  out = np.empty(shape, ref.dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  pos, done = ref.offset + start * row_bytes, 0
  with open(ref.path, "rb", buffering=0) as f:
    while done < buf.nbytes:  # one read returns at most ~2 GB on Linux
      got = os.preadv(f.fileno(), [buf[done:]], pos + done)
      if got == 0:
        raise CorruptCheckpointError(f"{ref.path}: truncated while reading {ref.name!r}")
      done += got
  return out
