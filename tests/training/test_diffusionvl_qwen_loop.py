"""`dvl train` for the DiffusionVL-Qwen family on a LLaVA data set with images of many aspect ratios: an exact
resume of a stage-2 run, and both stages on the command line with the spec's stage files (stage 1: square crops,
AR loss, the projector alone; stage 2: anyres crops, BD3-LM, everything)."""

import os

import numpy as np
import pytest
from flax import nnx

from dvl_jax import cli
from dvl_jax.checkpoints.loading import load
from dvl_jax.testing.tiny import save_tiny_checkpoint
from dvl_jax.training.loop import train
from tests.data.helpers import make_llava_processor, write_llava_dataset
from tests.training.test_loop import REPO, _assert_same_run, _config, _losses


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Random tiny stage-1 (square) and stage-2 (anyres) checkpoints with their tokenizer, and 32 LLaVA rows."""
  root = tmp_path_factory.mktemp("llava_loop")
  os.makedirs(root / "data")
  data = write_llava_dataset(str(root / "data"), 32)
  ckpts = {}
  for stage in (1, 2):
    proc = make_llava_processor(stage)
    ckpts[stage] = save_tiny_checkpoint(str(root / f"stage{stage}"), proc.config, tokenizer=proc.tokenizer)
  return root, ckpts, data


def _params(path):
  return {"/".join(map(str, p)): np.asarray(x[...]) for p, x in nnx.to_flat_state(nnx.state(load(path), nnx.Param))}


def test_stop_and_resume_of_stage_2_equals_the_uninterrupted_run(setup):
  root, ckpts, data = setup
  # Two steps: each batch's crop count is its own shape, so every further step is another compile.
  config = lambda: _config(ckpts[2], data, total_steps=2, data__min_pixels=None, data__max_pixels=None)  # noqa: E731
  train(config(), str(root / "whole"), progress=False)
  train(config(), str(root / "resumed"), stop_after=1, progress=False)
  train(config(), str(root / "resumed"), resume=True, progress=False)
  _assert_same_run(str(root / "whole"), str(root / "resumed"))


def _cli(stage, ckpt, data, workdir, *extra):
  argv = ["train", "--config", os.path.join(REPO, "configs", f"stage{stage}.py"), "--workdir", workdir, "--no-progress",
          f"--config.init_checkpoint={ckpt}", f"--config.data.json={data}", "--config.total_steps=6",
          "--config.log_every=2", "--config.checkpoint_every=6", "--config.mesh=1,1,1",
          "--config.compute_dtype=float32",
          "--config.remat_policy=none", "--config.data.batch_size=8", "--config.data.length_multiple=8",
          "--config.data.num_threads=2", *extra]
  assert cli.main(argv) == 0
  return list(_losses(workdir).values())


@pytest.mark.slow
def test_dvl_train_runs_both_stages_with_the_spec_stage_files(setup):
  root, ckpts, data = setup
  losses = _cli(1, ckpts[1], data, str(root / "cli1"))
  assert len(losses) == 3 and losses[-1] < losses[0], losses  # lr 1e-3 on the projector alone
  before, after = _params(ckpts[1]), _params(str(root / "cli1" / "model"))
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert moved == {k for k in before if k.startswith("projector/")} and moved
  losses = _cli(2, ckpts[2], data, str(root / "cli2"), "--config.data.micro_batches=2",
                "--config.optimizer.learning_rate=1e-3", "--config.optimizer.vision_learning_rate=2e-4")
  assert len(losses) == 3 and all(np.isfinite(losses)), losses
  trained = load(str(root / "cli2" / "model"))
  assert trained.config == load(ckpts[2]).config and trained.config.vision.image_aspect_ratio == "anyres_max_4"
  before, after = _params(ckpts[2]), _params(str(root / "cli2" / "model"))
  assert {k for k in before if np.array_equal(before[k], after[k])} <= {k for k in before if "post_layernorm" in k}
