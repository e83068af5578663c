"""Metrics sinks of a run: a JSONL file (one object per logged step) and TensorBoard event files.

Only process 0 writes; every process may call `write`. Both are appended to as the run goes, which
object stores cannot do: for a `gs://` workdir they go to a local directory (`local_metrics_dir`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax

from dvl_jax.core import storage


def local_metrics_dir(workdir: str) -> str:
  """`workdir` itself when local, else `<tmp>/dvl_metrics/<last path component>`."""
  if not storage.is_remote(workdir):
    return workdir
  return os.path.join(tempfile.gettempdir(), "dvl_metrics", workdir.rstrip("/").rsplit("/", 1)[-1])


class MetricsWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
