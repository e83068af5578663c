"""`dvl demo --quick`: the whole AR -> block-diffusion path runs through the real commands and hands
each stage's output to the next unchanged.

The demo runs in a subprocess without conftest's 8 fake devices, as on a user's one-device CPU: on the
fake devices it would shard the tiny model 8 ways over 2 cores and take 2.5x as long.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dvl_jax.demos import train_demo
from dvl_jax.core.config import ModelConfig
from dvl_jax.checkpoints.loading import load
from tests.user_process import user_env


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_hands_results_on_exactly(tmp_path):
  workdir = str(tmp_path / "demo")
  command = "import sys; from dvl_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
  run = subprocess.run([sys.executable, "-c", command, "demo", "--quick", "--workdir", workdir],
                       env=user_env(fast_compile=False), capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  table = run.stdout
  assert all(name in table for name in train_demo.DECODERS)

  def params(path):
    return jax.tree.leaves(nnx.state(load(path), nnx.Param))

  # dvl export -> dvl convert gives back the AR-trained weights bit for bit
  for a, b in zip(params(os.path.join(workdir, "ar", "model")), params(os.path.join(workdir, "source")), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for stage in ("ar", "diffusion"):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
      losses = [json.loads(line)["loss"] for line in f]
    assert losses[-1] < losses[0], (stage, losses)
  cfg = ModelConfig.load(os.path.join(workdir, "diffusion", "model", "config.json"))
  assert cfg.position_mode == "flat" and cfg.block_size == 8
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(workdir, "ar_hf")))
