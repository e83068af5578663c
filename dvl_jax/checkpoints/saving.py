"""A model in memory (e.g. a training result) -> the converted-checkpoint layout `dvl.load`, `dvl.export`
and `Processor.from_pretrained` read: `params/` (Orbax), `config.json`, tokenizer side files.

`params/` is written first (Orbax commits it atomically, from every process for its own shards) and
`config.json` last, so a directory without `config.json` is recognisably incomplete.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dvl_jax.core import storage
from dvl_jax.checkpoints.loading import CONFIG_FILE, PARAMS_DIR
from dvl_jax.data.processor import SOURCE_CONFIG
from dvl_jax.models import layer_layout

SIDE_FILE_SKIP = (CONFIG_FILE,)


def save(model: nnx.Module, dst_dir: str, *, side_files_from: str | None = None,
         pixel_bounds: tuple[int, int] | None = None) -> str:
  """Writes `model`'s params and config (plus the files of `side_files_from` but its config, e.g. the
  tokenizer of the checkpoint training started from). Refuses an existing `dst_dir`; may be `gs://`.

  `pixel_bounds` `(min_pixels, max_pixels)`: the image sizes the model was trained at, recorded where
  DiffusionVL's training records them (the top level of the source config, `hf_config.json`), so the
  saved model's `Processor` sizes images as its training did (`data.processor.pixel_bounds`)."""
  dst = storage.as_path(dst_dir)
  if (dst / CONFIG_FILE).exists() or (dst / PARAMS_DIR).exists():
    raise FileExistsError(f"{dst} already holds a checkpoint; choose a new directory")
  params = layer_layout.stacked(nnx.state(model, nnx.Param), model.config)  # the stored layout
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(dst / PARAMS_DIR, params)
  if jax.process_index() == 0:
    if side_files_from:
      storage.copy_files(storage.plain_files(side_files_from, skip=SIDE_FILE_SKIP), dst)
    if pixel_bounds is not None:
      _record_pixel_bounds(dst / SOURCE_CONFIG, *pixel_bounds)
    (dst / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
  return str(dst)


def _record_pixel_bounds(path: epath.Path, min_pixels: int, max_pixels: int) -> None:
  """Sets the top-level `min_pixels` / `max_pixels` of the source config at `path` (made if missing)."""
  source = json.loads(path.read_text()) if path.exists() else {}
  source.update(min_pixels=int(min_pixels), max_pixels=int(max_pixels))
  path.write_text(json.dumps(source, indent=2))
