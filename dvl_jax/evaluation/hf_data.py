"""Rows of a benchmark split from a local copy of its Hugging Face dataset, read with pyarrow alone.

Two on-disk forms are accepted, the two a user gets without code of ours:
- the Hub repository as `huggingface-cli download REPO --repo-type dataset --local-dir DIR` leaves it:
  parquet files named `{split}-00000-of-0000N[-hash].parquet` (usually under `data/`), or the Hub's
  converted layout `{config}/{split}/0000.parquet`, or a task's own file name (MMStar's `mmstar.parquet`);
- `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`: `state.json` listing Arrow stream files
  (a `DatasetDict` has `dataset_dict.json` and one such folder per split).

Rows stream in record batches (MME's parquet files hold ~860 MB of images), and an image column holds
the `datasets.Image` feature's struct `{bytes, path}`, decoded to an RGB PIL image as lmms-eval's
`doc_to_visual` does. Every problem is one line naming the command that fetches the data.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BATCH_ROWS = 32


def download_hint(repo: str, data_dir: str) -> str:
  return f"huggingface-cli download {repo} --repo-type dataset --local-dir {data_dir}"


def read_rows(data_dir: str | None, split: str, columns: Sequence[str], repo: str, *, images: Sequence[str] = (),
              file_names: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
  """The `columns` and `images` of every row of `split` in `data_dir` (a local copy of the Hub dataset `repo`),
  in file order, the `images` columns decoded (None stays None); `file_names` are extra parquet names that
  hold this split (for repositories without split names)."""
  hint = download_hint(repo, data_dir or "DIR")
  if data_dir is None:
    raise ValueError(f"{repo} is read from a local directory: pass --data DIR after `{hint}`")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"no data directory {data_dir!r}; fetch {repo} with `{hint}`")
  files = _split_files(pathlib.Path(data_dir), split, file_names)
  if not files:
    raise FileNotFoundError(f"no {split!r} split of {repo} in {data_dir!r} (parquet files named {split}-*.parquet or "
                            f"a datasets.save_to_disk folder); fetch it with `{hint}`")
  wanted = [*columns, *images]
  for path in files:
    batches, schema = _open(path)
    missing = [c for c in wanted if c not in schema.names]
    if missing:
      raise ValueError(f"{path} lacks the columns {missing} of {repo} (it has {schema.names}); fetch the dataset with "
                       f"`{hint}`")
    for batch in batches(wanted):
      for row in batch.to_pylist():
        yield {**row, **{c: None if row[c] is None else decode_image(row[c], data_dir) for c in images}}


def _split_files(root: pathlib.Path, split: str, file_names: Sequence[str]) -> list[pathlib.Path]:
  saved = _saved_split(root, split)
  if saved is not None:
    return saved
  return sorted(p for p in root.rglob("*.parquet")
                if p.name.startswith(f"{split}-") or p.parent.name == split or p.name in file_names)


def _saved_split(root: pathlib.Path, split: str) -> list[pathlib.Path] | None:
  """Arrow files of a `save_to_disk` folder (a `DatasetDict`'s `split` sub-folder), None if not one."""
  if (root / "dataset_dict.json").is_file():
    root = root / split
  state = root / "state.json"
  if not state.is_file():
    return None
  return [root / f["filename"] for f in json.loads(state.read_text())["_data_files"]]


def _open(path: pathlib.Path) -> tuple[Callable[[list[str]], Iterator[pa.RecordBatch]], pa.Schema]:
  """The file's schema, and its record batches of the given columns (parquet reads only those)."""
  if path.suffix == ".parquet":
    parquet = pq.ParquetFile(path)
    return lambda columns: parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns), parquet.schema_arrow
  reader = pa.ipc.open_stream(pa.memory_map(str(path)))
  return lambda columns: (batch.select(columns) for batch in reader), reader.schema


def decode_image(value: Any, data_dir: str) -> Image.Image:
  """A `datasets.Image` cell (`{bytes, path}`: bytes when embedded, else a path, relative ones taken from
  `data_dir`) -> RGB PIL image."""
  if value.get("bytes") is not None:
    image = Image.open(io.BytesIO(value["bytes"]))
  elif value.get("path"):
    image = Image.open(os.path.join(data_dir, value["path"]))
  else:
    raise ValueError("an image cell has neither bytes nor a path")
  return image.convert("RGB")
