"""`dvl demo --quick`: the whole AR -> block-diffusion path runs through the real commands and hands
each stage's output to the next unchanged, trains on the long "cells" answers too, and ends with the
evaluator's tables, one per split.

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

from dvl_jax.data.synthetic import QUESTIONS
from dvl_jax.demos import train_demo
from dvl_jax.evaluation.runner import RESULTS_FILE
from dvl_jax.evaluation.settings import DECODERS
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
  # the evaluator's table of each split, every decoder in each: AR of the source model, block diffusion of the
  # finetuned one
  rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")]
  assert rows == ["decoder", *DECODERS] * len(train_demo.SPLITS), run.stdout
  assert "block diffusion vs AR: short answers: " in run.stdout and "; cells answers: " in run.stdout
  for split, kinds in train_demo.SPLITS.items():
    with open(os.path.join(workdir, "eval", split, RESULTS_FILE)) as f:
      results = json.load(f)
    assert results["samples"] == train_demo.QUICK.eval_examples
    assert list(results["decoders"]) == list(DECODERS)
    for decoder, row in results["decoders"].items():
      assert {k.removeprefix("acc/") for k in row["metrics"]} - {"exact_match"} <= set(kinds), (split, row)
      assert row["config"]["algorithm"] == ("autoregressive" if decoder == "ar" else "block_diffusion")
      if decoder in ("ar", "static"):  # one token per forward at most (static: 8 steps per 8-token block)
        assert row["speed"]["tokens_per_forward"] <= 1.0, (split, decoder, row["speed"])
  with open(os.path.join(workdir, "data", "data.json")) as f:  # both stages train on it
    questions = {row["conversations"][0]["value"].split("\n")[-1] for row in json.load(f)}
  assert questions == set(QUESTIONS.values())

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
