"""Multi-process start-up: `jax.distributed.initialize()` exactly when the job has several processes."""

from __future__ import annotations

import os

import jax


def launched_on_several_processes() -> bool:
  """Cloud TPU pod slices (several worker hostnames), SLURM jobs with more than one task, or an explicit
  coordinator (`JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, launch/gpu)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize() -> None:
  """Connects the processes (JAX reads the coordinator from the TPU metadata, SLURM or the env vars)."""
  if launched_on_several_processes() and not jax.distributed.is_initialized():
    jax.distributed.initialize()
