"""LLaVA-format rows: a JSON array or JSONL file of `{"id", "image"?, "conversations"}` plus an image folder.

`image` is one path or a list of paths, relative to the image folder unless absolute; the file, the
folder and the paths may be `gs://` URLs (read through `dvl_jax.core.storage`). Rows built in
memory (the synthetic data set) may carry PIL images instead of paths. Problems of a single row are
`BadRow`s for the caller to count; a file that cannot be read at all is the user's error and raises.
"""

from __future__ import annotations

import dataclasses
import json
import io
from typing import Any, Union

from PIL import Image

from dvl_jax.core import storage
from dvl_jax.data.bad_rows import MALFORMED_CONVERSATION, MISSING_IMAGE, UNREADABLE_IMAGE, BadRow

ImageRef = Union[str, Image.Image]


@dataclasses.dataclass(frozen=True)
class Record:
  """One row; `conversations` is validated later, when it is tokenized."""

  id: str
  images: tuple[ImageRef, ...]
  conversations: Any


def read_rows(path: str) -> list[Any]:
  """The raw rows of a `.json` array or a `.jsonl` file; an unparsable JSONL line becomes `None`."""
  file = storage.as_path(path)
  if not file.is_file():
    raise FileNotFoundError(f"data file {path} does not exist")
  text = file.read_text(encoding="utf-8")
  if path.endswith(".jsonl"):
    return [_parse_line(line) for line in text.splitlines() if line.strip()]
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); name a file of one row per line *.jsonl") from None
  if not isinstance(rows, list):
    raise ValueError(f"{path} must hold a JSON array of rows (or be a .jsonl file)")
  return rows


def _parse_line(line: str) -> Any:
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


def to_record(row: Any, position: int) -> Record:
  """A raw row -> `Record`; its id defaults to its position in the file."""
  if not isinstance(row, dict):
    raise BadRow(MALFORMED_CONVERSATION, f"row {position} is not a JSON object")
  images = row.get("image")
  images = () if images is None else tuple(images) if isinstance(images, list) else (images,)
  if not all(isinstance(im, (str, Image.Image)) for im in images):
    raise BadRow(MALFORMED_CONVERSATION, f"row {position}: `image` must be a path or a list of paths")
  return Record(str(row.get("id", position)), images, row.get("conversations"))


def _open(ref: str, image_folder: str | None) -> tuple[str, Any]:
  """`(path, binary file)`; a remote image is read whole (one request) and decoded from memory."""
  path = storage.join(image_folder, ref)
  file = storage.as_path(path)
  if not file.is_file():
    raise BadRow(MISSING_IMAGE, f"{path} does not exist")
  return path, io.BytesIO(file.read_bytes()) if storage.is_remote(path) else open(path, "rb")


def image_size(ref: ImageRef, image_folder: str | None) -> tuple[int, int]:
  """`(width, height)` from the file header only (cheap enough for a pass over the whole data set)."""
  if isinstance(ref, Image.Image):
    return ref.size
  path, f = _open(ref, image_folder)
  try:
    with f, Image.open(f) as im:
      return im.size
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadRow(UNREADABLE_IMAGE, f"{path}: {e}") from None


def open_image(ref: ImageRef, image_folder: str | None) -> Image.Image:
  """The decoded RGB image (the repo's `Image.open(path).convert("RGB")`)."""
  if isinstance(ref, Image.Image):
    return ref.convert("RGB")
  path, f = _open(ref, image_folder)
  try:
    with f, Image.open(f) as im:
      return im.convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadRow(UNREADABLE_IMAGE, f"{path}: {e}") from None
