"""The host loop of a training run: data -> jitted train step -> metrics, checkpoints, final model.

    dvl train --config configs/stage2.py --workdir runs/x --config.init_checkpoint=ckpt --config.data.json=...

Every process runs this same loop (multi-host: `jax.distributed` is initialised first). Checkpoints
(train state + data iterator) go to `workdir/checkpoints`; `resume=True` continues from the newest
complete one with the same batches; metrics go to the console, `workdir/metrics.jsonl` and TensorBoard.
A non-finite loss or gradient norm stops the run (the step's update is skipped, nothing is saved
after it), leaving the last good checkpoint as the resume point.
"""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dvl_jax.checkpoints import saving
from dvl_jax.checkpoints.train_checkpoints import TrainCheckpoints
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.data.processor import Processor
from dvl_jax.checkpoints.loading import load
from dvl_jax.parallel import distributed
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.training.metrics_writer import MetricsWriter, local_metrics_dir
from dvl_jax.training.optimizer import OptimizerConfig
from dvl_jax.training.run_config import check_keys, from_section
from dvl_jax.training.state import stage
from dvl_jax.training.step import TrainStep

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """A step produced a non-finite loss or gradient norm."""


def mesh_shape(text: str, num_devices: int) -> tuple[int, int, int]:
  """"data,fsdp,tensor" with at most one -1 (the remaining devices) -> a mesh shape."""
  try:
    shape = [int(x) for x in text.split(",")]
  except ValueError:
    shape = []
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {text!r} must be three positive sizes data,fsdp,tensor (one may be -1)")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f"mesh {text!r} does not divide the {num_devices} devices")
  shape = [num_devices // known if s == -1 else s for s in shape]
  if math.prod(shape) > num_devices:
    raise ValueError(f"mesh {text!r} needs {math.prod(shape)} devices but {num_devices} are available")
  return tuple(shape)


def run_mesh(text: str) -> Mesh:
  """The run's mesh; a single process may use its first devices only, several processes use them all."""
  shape = mesh_shape(text, jax.device_count())
  if math.prod(shape) < jax.device_count() and jax.process_count() > 1:
    raise ValueError(f"mesh {text!r} leaves devices idle; with several processes it must use all "
                     f"{jax.device_count()}")
  return make_mesh(shape, jax.devices()[:math.prod(shape)])


def train(config: ml_collections.ConfigDict, workdir: str, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict[str, float]:
  """Runs (or resumes) a training run; returns the last logged metrics.

  `config` has the keys of `run_config.default_config()`; one it lacks (a typo) fails before anything runs.

  `stop_after` ends this invocation after that many steps (with a checkpoint), e.g. to fit a time
  slot; `resume=True` continues it later.
  """
  check_keys(config)
  distributed.initialize()
  if not config.init_checkpoint:
    raise ValueError("config.init_checkpoint is empty: point it at a `dvl convert` output")
  if not config.data.json:
    raise ValueError("config.data.json is empty: point it at a LLaVA-format .json/.jsonl file")
  mesh = run_mesh(config.mesh)
  model = load(config.init_checkpoint, mesh, dtype="float32", compute_dtype=config.compute_dtype,
               remat_policy=config.remat_policy, attention_backend=config.attention_backend)
  processor = Processor.from_pretrained(config.init_checkpoint, min_pixels=config.data.min_pixels,
                                        max_pixels=config.data.max_pixels)
  # The train step scans a micro-batch axis: no micro-batches is one.
  data_config = from_section(DataConfig, config.data, seed=config.seed,
                             micro_batches=config.data.micro_batches or 1)
  pipeline = DataPipeline.from_json(config.data.json, processor, data_config, mesh,
                                    image_folder=config.data.image_folder or os.path.dirname(config.data.json))
  total = config.total_steps or config.epochs * pipeline.plan.batches_per_epoch
  trainer = TrainStep(model, stage(config.stage), from_section(OptimizerConfig, config.optimizer), total, mesh,
                      loss_chunk_size=config.loss_chunk_size)
  checkpoints = TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                 async_save=config.async_checkpointing)
  data = iter(pipeline)
  start = checkpoints.latest_step()
  if start is not None and not resume:
    raise FileExistsError(f"{workdir} has checkpoints up to step {start}; pass --resume to continue it "
                          "or choose a new --workdir")
  if start is None and resume:
    raise FileNotFoundError(f"--resume: no complete checkpoint in {workdir}/checkpoints")
  if start is None:
    start, state = 0, trainer.init(model)
  else:
    state, data_state = checkpoints.restore(start, trainer.abstract_state(model))
    data.set_state(data_state)
    log.info("resumed from step %d", start)
  del model  # its arrays now belong to the (donated) train state
  end = total if stop_after is None else min(total, start + stop_after)

  writer = MetricsWriter(local_metrics_dir(workdir), tensorboard=config.tensorboard)
  log.info("metrics: %s/metrics.jsonl and tensorboard/", local_metrics_dir(workdir))
  rng = jax.random.key(config.seed)
  bar = tqdm(total=total, initial=start, desc=config.stage, disable=not progress or jax.process_index() != 0)
  window, last, tic = [], {}, time.perf_counter()
  try:
    for step in range(start, end):
      state, metrics = trainer(state, next(data), rng)
      window.append(metrics)
      done = step + 1
      boundary = done % config.checkpoint_every == 0 or done == end
      if done % config.log_every == 0 or boundary:
        last = _summarise(window, tic, done, checkpoints.latest_step(), workdir)
        last.update(data.metrics())
        writer.write(done, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
        window, tic = [], time.perf_counter()
      if boundary:
        checkpoints.save(done, state, data.get_state())
      bar.update(1)
    checkpoints.wait()
    if config.save_model and end == total:
      bounds = None if processor.image_processor is None else processor.images.size_bounds(processor.image_processor)
      path = saving.save(trainer.model(state), os.path.join(workdir, "model"),
                         side_files_from=config.init_checkpoint, pixel_bounds=bounds)
      log.info("wrote the trained model to %s", path)
  finally:
    bar.close()
    writer.close()
    checkpoints.close()
    data.close()
  return last


def _summarise(window: list[dict[str, jax.Array]], started: float, step: int, good_step: int | None,
               workdir: str) -> dict[str, float]:
  """Means over the logged steps plus throughput since `started` (a `perf_counter` time); raises
  `TrainingDiverged` on a skipped step."""
  host = jax.device_get(window)
  # Timed once the window's steps are done: dispatch runs ahead of the device, so a clock read before the fetch
  # measured mostly dispatch (step times ~5x too short on a loaded CPU).
  seconds = time.perf_counter() - started
  if not all(m["finite"] for m in host):
    bad = step - len(host) + next(i for i, m in enumerate(host) if not m["finite"]) + 1
    where = f"step {good_step} in {workdir}/checkpoints" if good_step is not None else "none yet"
    raise TrainingDiverged(f"step {bad}: the loss or gradient norm is NaN/Inf (its update was skipped); "
                           f"last good checkpoint: {where}; lower the learning rate or check the data, then --resume")
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k not in ("finite", "tokens", "images", "slots")}
  tokens, slots = sum(float(m["tokens"]) for m in host), sum(float(m["slots"]) for m in host)
  out.update(tokens_per_s=tokens / seconds, images_per_s=sum(float(m["images"]) for m in host) / seconds,
             padding_fraction=1 - tokens / max(1.0, slots), step_time_s=seconds / len(host))
  return out
