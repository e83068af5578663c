"""Small benchmark splits written in the Hub's on-disk forms: parquet files and `save_to_disk` folders whose
image columns hold the `datasets.Image` struct `{bytes, path}`."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image_cell(color: tuple[int, int, int], size: int = 8) -> dict[str, Any]:
  """An embedded PNG, as `datasets` stores an image it was given in memory."""
  buffer = io.BytesIO()
  Image.new("RGB", (size, size), color).save(buffer, format="PNG")
  return {"bytes": buffer.getvalue(), "path": None}


def table(rows: Sequence[dict[str, Any]], image_columns: Sequence[str] = ()) -> pa.Table:
  return pa.table({c: pa.array([r[c] for r in rows], type=IMAGE if c in image_columns else None) for c in rows[0]})


def write_parquet(path: str, rows: Sequence[dict[str, Any]], image_columns: Sequence[str] = ()) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(table(rows, image_columns), path)
  return path


def write_saved(folder: str, rows: Sequence[dict[str, Any]], image_columns: Sequence[str] = ()) -> str:
  """A `Dataset.save_to_disk` folder: one Arrow stream file listed in `state.json`."""
  os.makedirs(folder, exist_ok=True)
  data = table(rows, image_columns)
  with pa.OSFile(os.path.join(folder, "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, data.schema) as writer:
      writer.write_table(data)
  with open(os.path.join(folder, "state.json"), "w") as f:
    json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}, f)
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump({"features": {}}, f)
  return folder


def colour(image: Image.Image) -> tuple[int, int, int]:
  return image.getpixel((0, 0))
