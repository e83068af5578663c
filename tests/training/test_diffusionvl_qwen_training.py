"""Training the DiffusionVL-Qwen family (spec §7.2) through the same train step as the first family, on LLaVA rows
with images of many aspect ratios: stage 1 (AR) trains the projector alone, stage 2 (BD3-LM) everything with the
SigLIP tower at its own learning rate, sharded steps on 8 devices equal the single-device steps."""

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest

from dvl_jax.data.llava_json import read_rows
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.testing.tiny import tiny_model
from dvl_jax.training.optimizer import OptimizerConfig
from tests.data.helpers import make_llava_processor, write_llava_dataset
from tests.training.helpers import flat_params, run_steps

PROC1, PROC2 = make_llava_processor(1), make_llava_processor(2)
CONFIG = DataConfig(batch_size=8, max_length=128, length_multiple=8, num_threads=0, micro_batches=1)
# Adam's eps at the recipe's 1e-8 (the first family's step tests use ~0): SigLIP's key bias has a zero gradient up
# to rounding (softmax is invariant to a constant added to a query's scores), and rounding differs between device
# layouts, so at eps ~0 that bias's update g / sqrt(v) is +-lr on noise, an ill-conditioned comparison of sharded
# and single-device steps. At 1e-8, noise of ~1e-12 moves it by ~1e-4 lr; other updates are lr * g / (|g| + eps).
OPT = OptimizerConfig(learning_rate=1e-3, vision_learning_rate=2e-4, warmup_ratio=0.0, eps=1e-8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_llava_dataset(str(tmp_path_factory.mktemp("llava_train")), 32)


def _batches(processor, data, n, mesh=None, **changes):
  mesh = mesh or make_mesh((1, 1, 1), jax.devices()[:1])
  pipeline = DataPipeline(read_rows(data), processor, dataclasses.replace(CONFIG, **changes), mesh,
                          image_folder=os.path.dirname(data))
  it = iter(pipeline)
  batches = [next(it) for _ in range(n)]
  assert all("pixel_values" in b for b in batches)  # the text-only rows do not fill a batch of their own
  return batches


def test_stage1_trains_the_projector_alone_and_keeps_no_optimizer_state_for_the_rest(data):
  model = tiny_model(PROC1.config)
  before = flat_params(model)
  trainer, state, metrics = run_steps("stage1", _batches(PROC1, data, 2, block_aligned_eos=False), model, OPT)
  after = flat_params(trainer.model(state))
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  projector = {k for k in before if k.startswith("['projector']")}
  assert moved == projector and len(projector) == 4  # two Linear layers; all else bit-identical
  moments = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if np.ndim(x)]
  assert len(moments) == 2 * len(projector) and all("['projector']" in p for p in moments)  # Adam's mu and nu
  assert all(m["finite"] == 1 for m in metrics) and metrics[1]["loss"] < metrics[0]["loss"]


def test_stage2_moves_every_param_and_the_tower_at_its_own_learning_rate(data):
  """Adam's first update is lr * g / (|g| + eps) = the group's lr wherever |g| >> eps (1e-16 here: the tower's key
  projection has gradients of ~1e-7). Two exceptions: SigLIP's key bias (gradient zero up to rounding, see OPT)
  moves by zero or the lr, and the tower's `post_layernorm`, in the checkpoint but not in the forward (DiffusionVL's
  features skip it), stays put."""
  model = tiny_model(PROC2.config)
  before = flat_params(model)
  trainer, state, metrics = run_steps("stage2", _batches(PROC2, data, 1), model, dataclasses.replace(OPT, eps=1e-16))
  after = flat_params(trainer.model(state))
  assert metrics[0]["lr"] == pytest.approx(1e-3) and metrics[0]["finite"] == 1
  for k in before:
    lr = 2e-4 if k.startswith("['vision_tower']") else 1e-3
    delta = np.abs(after[k] - before[k])
    assert np.all(delta <= lr * (1 + 1e-6) + 2 * np.spacing(np.abs(before[k]))), k  # fp32 rounding of p + delta
    if "['k_proj']['bias']" in k:
      continue
    if "['post_layernorm']" in k:
      assert not delta.any(), k
      continue
    assert delta.max() > 0, k
    np.testing.assert_allclose(np.median(delta[delta > 0]), lr, rtol=1e-3, err_msg=k)


@functools.cache
def _single_device_stage2(data):
  return run_steps("stage2", _batches(PROC2, data, 2), tiny_model(PROC2.config), OPT)


@pytest.mark.slow
def test_sharded_stage2_steps_equal_the_single_device_steps(data):
  """On all three mesh axes (4 batch shards, each with the crops of its rows; tensor-parallel heads), the loss's
  logits 16 positions at a time."""
  mesh = make_mesh((2, 2, 2))
  _, single, m1 = _single_device_stage2(data)
  batches = _batches(PROC2, data, 2, mesh)
  assert batches[0]["pixel_values"].sharding.spec[1] == ("data", "fsdp")  # crops of each shard on its devices
  _, sharded, m8 = run_steps("stage2", batches, tiny_model(PROC2.config), OPT, mesh=mesh, loss_chunk_size=16)
  for a, b in zip(m1, m8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), jax.device_get(single.params),
               jax.device_get(sharded.params))
