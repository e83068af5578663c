"""A model in memory (e.g. a training result) -> the converted-checkpoint layout `dvl.load`, `dvl.export`
and `Processor.from_pretrained` read: `params/` (Orbax), `config.json`, tokenizer side files.

`params/` is written first (Orbax commits it atomically, from every process for its own shards) and
`config.json` last, so a directory without `config.json` is recognisably incomplete.
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dvl_jax.loading import CONFIG_FILE, PARAMS_DIR

SIDE_FILE_SKIP = (CONFIG_FILE,)


def save(model: nnx.Module, dst_dir: str, *, side_files_from: str | None = None) -> str:
  """Writes `model`'s params and config (plus the non-weight files of `side_files_from`, e.g. the
  tokenizer of the checkpoint training started from). Refuses an existing `dst_dir`."""
  dst_dir = os.path.abspath(dst_dir)
  if os.path.exists(os.path.join(dst_dir, CONFIG_FILE)) or os.path.exists(os.path.join(dst_dir, PARAMS_DIR)):
    raise FileExistsError(f"{dst_dir} already holds a checkpoint; choose a new directory")
  params = nnx.state(model, nnx.Param)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(dst_dir, PARAMS_DIR), params)
  if jax.process_index() == 0:
    if side_files_from:
      for name in sorted(os.listdir(side_files_from)):
        path = os.path.join(side_files_from, name)
        if os.path.isfile(path) and name not in SIDE_FILE_SKIP:
          shutil.copy2(path, os.path.join(dst_dir, name))
    model.config.save(os.path.join(dst_dir, CONFIG_FILE))
  return dst_dir
