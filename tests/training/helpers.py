"""Helpers of the training tests: a tiny random model and synthetic-VQA batches from the real pipeline."""

import dataclasses

import jax

from dvl_jax.data import synthetic
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.testing import tiny
from dvl_jax.parallel.mesh import make_mesh
from tests.data.helpers import make_processor

PROC = make_processor()
CONFIG = DataConfig(batch_size=8, max_length=128, length_multiple=8, square_pad=False, num_threads=0,
                    micro_batches=1)


def tiny_model(seed: int = 0, **config_overrides):
  """The processor's tiny Qwen2.5-VL (its vocabulary), built once per process by `dvl_jax.testing.tiny`."""
  return tiny.tiny_model(dataclasses.replace(PROC.config, **config_overrides), seed=seed)


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
  return [synthetic.llava_row(ex, f"s{seed}-{i}") for i, ex in enumerate(synthetic.examples(n, seed=seed))]


def pipeline(rows: list[dict], mesh=None, **changes) -> DataPipeline:
  """The pipeline on `mesh` (default: one device); the same rows and seed give the same batches on any mesh."""
  mesh = mesh or make_mesh((1, 1, 1), jax.devices()[:1])
  return DataPipeline(rows, PROC, dataclasses.replace(CONFIG, **changes), mesh)
