"""Helpers of the training tests: a tiny random model and synthetic-VQA batches from the real pipeline."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from dvl_jax.data import synthetic
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.testing import tiny
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import shard_model
from dvl_jax.training.state import stage
from dvl_jax.training.step import TrainStep
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


def flat_params(model) -> dict[str, np.ndarray]:
  """Every array of the model's state by path, on the host."""
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def run_steps(name, batches, model, opt, *, mesh=None, loss_chunk_size=0):
  """(trainer, state, host metrics per step) after one `TrainStep` of stage `name` per batch (model sharded on
  `mesh` if given; the same key every step: the step folds in its count)."""
  if mesh is not None:
    model = shard_model(model, mesh)
  trainer = TrainStep(model, stage(name), opt, total_steps=10, mesh=mesh, loss_chunk_size=loss_chunk_size)
  state, metrics = trainer.init(model), []
  for batch in batches:
    state, m = trainer(state, batch, jax.random.key(0))
    metrics.append(jax.device_get(m))
  return trainer, state, metrics
