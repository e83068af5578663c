"""Paths that may name a bucket (`gs://...`, `s3://...`) as well as a local file.

Training data, images and checkpoints are read through `etils.epath`, so a run on a TPU pod can
point straight at GCS. Params are read by Orbax/tensorstore, which speak `gs://` themselves; the
small side files of a checkpoint (config, tokenizer) are copied to a local cache once, because the
`transformers` tokenizer loader only reads local directories.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from etils import epath


def is_remote(path: str) -> bool:
  return "://" in path


def as_path(path: str) -> epath.Path:
  """An epath for `path`; local paths are made absolute (Orbax requires it)."""
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def join(folder: str | None, ref: str) -> str:
  """`ref` relative to `folder`, unless `ref` is absolute or a URL."""
  if folder is None or os.path.isabs(ref) or is_remote(ref):
    return ref
  return f"{folder.rstrip('/')}/{ref}" if is_remote(folder) else os.path.join(folder, ref)


def plain_files(directory: str, skip: tuple[str, ...] = ()) -> list[epath.Path]:
  """The files (not sub-directories) of `directory` but `skip`, by name: a checkpoint's side files."""
  return sorted((p for p in as_path(directory).iterdir() if p.is_file() and p.name not in skip), key=lambda p: p.name)


def copy_files(files: list[epath.Path], dst: epath.Path) -> None:
  for src in files:
    (dst / src.name).write_bytes(src.read_bytes())


def local_side_files(ckpt_dir: str) -> str:
  """A local directory with the files (not sub-directories) of `ckpt_dir`.

  Local checkpoints are returned as they are. A remote one is copied under `$DVL_CACHE` (default
  `~/.cache/dvl_jax`) into a directory keyed by its URL and file listing, so a re-written checkpoint
  is fetched again; the copy is written to a temporary name and renamed into place.
  """
  if not is_remote(ckpt_dir):
    return ckpt_dir
  files = plain_files(ckpt_dir)
  listing = "\n".join(f"{p.name} {p.stat().length}" for p in files)
  key = hashlib.sha256(f"{ckpt_dir.rstrip('/')}\n{listing}".encode()).hexdigest()[:24]
  root = os.path.join(os.environ.get("DVL_CACHE", os.path.expanduser("~/.cache/dvl_jax")), "side_files")
  dst = os.path.join(root, key)
  if os.path.isdir(dst):
    return dst
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
  try:
    copy_files(files, epath.Path(tmp))
    os.rename(tmp, dst)
  except OSError:
    if not os.path.isdir(dst):  # not another process winning the rename: a real failure
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dst
