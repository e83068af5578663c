"""Output directories that appear complete or not at all, and the non-weight files that travel along."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence

from checkpoints_convert.errors import DestinationExistsError, OutputIsInputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


@contextlib.contextmanager
def atomic_output(dst: str, *, overwrite: bool, inputs: Sequence[str] = ()) -> Iterator[str]:
  """Yields a temporary directory next to `dst`; it becomes `dst` only when the block succeeds. `dst` may not be
  one of the `inputs` directories or hold one: replacing it would delete what is being read."""
  dst = os.path.abspath(dst)
  _check_not_input(dst, inputs)
  _check_free(dst, overwrite)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  prefix = f".{os.path.basename(dst)}.tmp-"
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    yield tmp
    _check_free(dst, overwrite)  # it may have appeared meanwhile
    if os.path.lexists(dst):
      trash = tempfile.mkdtemp(prefix=prefix, dir=parent)
      old = os.path.join(trash, "old")
      os.rename(dst, old)
      try:
        os.rename(tmp, dst)
      except BaseException:
        os.rename(old, dst)  # keep the previous output rather than none
        raise
      finally:
        shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_side_files(src_dir: str, dst_dir: str, skip: tuple[str, ...] = ()) -> list[str]:
  """Copies every plain non-weight file (tokenizer, processor, chat template, ...) of `src_dir`."""
  copied = []
  for name in sorted(os.listdir(src_dir)):
    path = os.path.join(src_dir, name)
    if name in skip or name.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path):
      continue
    shutil.copy2(path, os.path.join(dst_dir, name))
    copied.append(name)
  return copied


def _check_not_input(dst: str, inputs: Sequence[str]) -> None:
  real = os.path.realpath(dst)  # a link to an input is that input
  for src in map(os.fspath, inputs):
    source = os.path.realpath(src)
    if real == source or source.startswith(real.rstrip(os.sep) + os.sep):
      where = "is" if real == source else "holds"
      raise OutputIsInputError(f"the output {dst} {where} the input {src}: replacing it would delete what is being "
                               "read; write the output to another directory")


def _check_free(dst: str, overwrite: bool) -> None:
  if os.path.lexists(dst) and not overwrite:
    raise DestinationExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
