"""The host loop: exact resume (also after a kill during a checkpoint write), refusing to clobber a run,
metrics files, stopping on a non-finite step, the loss going down, and `dvl train` on the command line."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from dvl_jax import cli
from dvl_jax.data import synthetic
from dvl_jax.data.processor import pixel_bounds
from dvl_jax.checkpoints.loading import load
from dvl_jax.training.loop import TrainingDiverged, mesh_shape, train
from dvl_jax.training.run_config import default_config
from dvl_jax.demos.train_demo import init_checkpoint
from tests.training.helpers import PROC

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A random tiny checkpoint with its tokenizer, and 64 synthetic rows on disk."""
  root = tmp_path_factory.mktemp("loop")
  ckpt = init_checkpoint(str(root / "init"), PROC.config, PROC.tokenizer)
  data = synthetic.write_dataset(str(root / "data"), 64, seed=0)
  return root, ckpt, data


def _config(ckpt, data, **changes):
  c = default_config()
  c.init_checkpoint, c.total_steps, c.mesh = ckpt, 6, "1,2,1"
  c.compute_dtype, c.remat_policy, c.attention_backend = "float32", "none", "xla"
  c.log_every, c.checkpoint_every, c.keep_checkpoints = 1, 2, 2
  c.optimizer.learning_rate, c.optimizer.warmup_ratio = 1e-3, 0.2
  c.data.json, c.data.batch_size, c.data.micro_batches = data, 8, 2
  c.data.max_length, c.data.length_multiple, c.data.num_threads = 128, 8, 2
  c.data.min_pixels = c.data.max_pixels = 56 * 56
  for key, value in changes.items():
    node = c
    *parents, name = key.split("__")
    for p in parents:
      node = node[p]
    node[name] = value
  return c


def _params(workdir):
  model = load(os.path.join(workdir, "model"))
  from flax import nnx
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def uninterrupted(setup):
  root, ckpt, data = setup
  train(_config(ckpt, data), str(root / "whole"), progress=False)
  return str(root / "whole")


def _assert_same_run(a, b):
  for x, y in zip(_params(a), _params(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  assert _losses(a) == pytest.approx(_losses(b), rel=1e-6)  # same batches in the same order


def test_stop_and_resume_equals_the_uninterrupted_run(setup, uninterrupted):
  root, ckpt, data = setup
  workdir = str(root / "resumed")
  train(_config(ckpt, data), workdir, stop_after=2, progress=False)
  assert not os.path.exists(os.path.join(workdir, "model"))
  with pytest.raises(FileExistsError, match="--resume"):
    train(_config(ckpt, data), workdir, progress=False)
  train(_config(ckpt, data), workdir, resume=True, progress=False)
  _assert_same_run(uninterrupted, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  for key in ("loss", "mean_t", "masked_fraction", "lr", "grad_norm", "tokens_per_s", "images_per_s",
              "padding_fraction", "data/bad_rows/missing_image"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # keep-last-2


def test_the_trained_model_sizes_images_as_its_training_did(setup, uninterrupted):
  """The run trained at 56x56 pixels, not at the init checkpoint's bounds: its saved model says so."""
  _, ckpt, _ = setup
  assert pixel_bounds(ckpt) != (56 * 56, 56 * 56)
  assert pixel_bounds(os.path.join(uninterrupted, "model")) == (56 * 56, 56 * 56)


def _killed_run(ckpt, data, workdir):
  """Runs in a subprocess: trains, and SIGKILLs itself right after the step-4 checkpoint write starts."""
  from dvl_jax.checkpoints import train_checkpoints as checkpoint

  save = checkpoint.TrainCheckpoints.save

  def save_then_die(self, step, state, data_state):
    save(self, step, state, data_state)
    if step == 4:
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.TrainCheckpoints.save = save_then_die
  train(_config(ckpt, data), workdir, progress=False)


def test_a_run_killed_during_a_checkpoint_write_resumes_from_the_previous_one(setup, uninterrupted):
  root, ckpt, data = setup
  workdir = str(root / "killed")
  code = (f"import sys; sys.path.insert(0, {REPO!r}); from tests.training.test_loop import _killed_run; "
          f"_killed_run({ckpt!r}, {data!r}, {workdir!r})")
  env = {**os.environ, "USE_TORCH": "0"}  # conftest's XLA_FLAGS: 8 devices, as in this process
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  entries = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "2" in entries and "4" not in entries, entries  # step 4 never completed
  train(_config(ckpt, data), workdir, resume=True, progress=False)
  _assert_same_run(uninterrupted, workdir)


def test_a_non_finite_step_stops_the_run_and_names_the_last_good_checkpoint(setup):
  root, ckpt, data = setup
  workdir = str(root / "diverged")
  # micro_batches=None (the default) steps on whole batches as one micro-batch
  config = _config(ckpt, data, optimizer__learning_rate=1e30, optimizer__warmup_ratio=0.0, checkpoint_every=1,
                   data__micro_batches=None)
  with pytest.raises(TrainingDiverged, match=r"step 2: .*NaN/Inf.*last good checkpoint: step 1"):
    train(config, workdir, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]


def test_dvl_train_cli_lowers_the_loss_on_synthetic_data(setup, capsys):
  root, ckpt, data = setup
  workdir = str(root / "cli")
  argv = ["train", "--config", os.path.join(REPO, "configs", "stage1.py"), "--workdir", workdir, "--no-progress",
          f"--config.init_checkpoint={ckpt}", f"--config.data.json={data}", "--config.stage=ar",
          "--config.total_steps=24", "--config.log_every=4", "--config.checkpoint_every=24", "--config.mesh=1,1,1",
          "--config.compute_dtype=float32", "--config.remat_policy=none", "--config.optimizer.learning_rate=3e-3",
          "--config.data.batch_size=8", f"--config.data.min_pixels={56 * 56}", f"--config.data.max_pixels={56 * 56}",
          "--config.data.length_multiple=8", "--config.data.num_threads=2"]
  assert cli.main(argv) == 0
  losses = list(_losses(workdir).values())
  assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
  assert cli.main(["train", "--config", os.path.join(REPO, "configs", "stage1.py"), "--workdir", workdir,
                   "--config.data.batch_size=many"]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "dvl train: error: config key 'data.batch_size' needs a int, got 'many'")


def test_mesh_shapes():
  assert mesh_shape("1,-1,2", 8) == (1, 4, 2) and mesh_shape("2,4,1", 8) == (2, 4, 1)
  assert mesh_shape("1,2,1", 8) == (1, 2, 1)  # one process may leave devices idle
  for bad in ("1,3,1", "4,4,1", "0,8,1", "1,-1,-1", "8", "a,b,c"):
    with pytest.raises(ValueError, match="mesh"):
      mesh_shape(bad, 8)
