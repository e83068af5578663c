"""Train steps: what each stage trains, the vision learning rate, accumulation, non-finite steps, and
sharded steps equal to the single-device step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import partition_spec, shard_model
from dvl_jax.models.interface import path_names
from dvl_jax.training.optimizer import OptimizerConfig
from dvl_jax.training.state import stage
from dvl_jax.training.step import TrainStep
from tests.training.helpers import flat_params, pipeline, run_steps, synthetic_rows, tiny_model

ROWS = synthetic_rows(32)
OPT = OptimizerConfig(learning_rate=1e-3, vision_learning_rate=2e-4, warmup_ratio=0.0, eps=1e-16)


def _batches(n, mesh=None, **changes):
  it = iter(pipeline(ROWS, mesh, **changes))
  return [next(it) for _ in range(n)]


def _run(name, batches, *, mesh=None, opt=OPT, model=None, loss_chunk_size=0):
  return run_steps(name, batches, model or tiny_model(), opt, mesh=mesh, loss_chunk_size=loss_chunk_size)


def test_stage1_trains_only_the_projector_and_keeps_no_optimizer_state_for_the_rest():
  before = flat_params(tiny_model())
  trainer, state, _ = _run("stage1", _batches(3))
  after = flat_params(trainer.model(state))
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  merger = {k for k in before if k.startswith("['visual']['merger']")}
  assert moved == merger and len(merger) == 5
  param_leaves = len(jax.tree.leaves(state.params))
  opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert param_leaves == 5 and len(opt_leaves) == 2 * param_leaves  # Adam mu and nu of the projector only


@pytest.mark.parametrize("projector_lr", [None, 5e-4], ids=["projector_at_lm_lr", "projector_at_own_lr"])
def test_stage2_moves_every_param_and_the_vision_tower_at_its_own_learning_rate(projector_lr):
  """Adam's first update is lr * g / (|g| + eps): |delta| = the group's learning rate wherever |g| >> eps
  (eps 1e-16 here: the key bias has a near-zero gradient, softmax being shift-invariant)."""
  model = tiny_model()
  before = flat_params(model)
  opt = dataclasses.replace(OPT, projector_learning_rate=projector_lr)
  trainer, state, metrics = _run("stage2", _batches(1), model=model, opt=opt)
  after = flat_params(trainer.model(state))
  assert metrics[0]["lr"] == pytest.approx(1e-3)
  for k in before:
    delta = np.abs(after[k] - before[k])
    assert delta.max() > 0, k
    if k.startswith("['visual']['merger']"):
      lr = projector_lr or 1e-3
    else:
      lr = 2e-4 if k.startswith("['visual']") else 1e-3
    np.testing.assert_allclose(np.median(delta[delta > 0]), lr, rtol=1e-3, err_msg=k)
    assert np.all(delta <= lr * (1 + 1e-6) + 2 * np.spacing(np.abs(before[k]))), k  # fp32 rounding of p + delta
  group = lambda *keys: model.param_group(path_names(tuple(map(jax.tree_util.DictKey, keys))))  # noqa: E731
  assert group("visual", "blocks") == "vision"
  assert group("visual", "merger") != "vision"
  assert group("visual", "merger") == "projector"
  assert group("visual", "blocks") != "projector"


def test_gradient_accumulation_equals_one_big_batch():
  """AR loss with the same number of labels in every row: mean over micro-batches = mean over the batch."""
  rows = [r for r in ROWS if len(r["conversations"][1]["value"].split()) == 1][:8]  # one-word answers
  assert len(rows) == 8
  whole = next(iter(pipeline(rows, block_aligned_eos=False)))  # EOS padding would vary the label counts
  split = next(iter(pipeline(rows, block_aligned_eos=False, micro_batches=2)))
  np.testing.assert_array_equal(np.asarray(split["input_ids"]).reshape(whole["input_ids"].shape),
                                np.asarray(whole["input_ids"]))
  (_, sa, ma), (_, sb, mb) = _run("ar", [whole]), _run("ar", [split])
  assert ma[0]["loss"] == pytest.approx(mb[0]["loss"], rel=1e-6)
  assert ma[0]["grad_norm"] == pytest.approx(mb[0]["grad_norm"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), sa.params, sb.params)


def test_a_non_finite_step_leaves_the_state_unchanged():
  batch = next(b for b in _batches(4) if "pixel_values" in b)
  poisoned = dict(batch, pixel_values=batch["pixel_values"].at[0, 0].set(jnp.nan))
  model = tiny_model()
  before = flat_params(model)
  trainer, state, metrics = _run("stage2", [poisoned], model=model)
  assert metrics[0]["finite"] == 0 and int(state.step) == 0
  after = flat_params(trainer.model(state))
  assert all(np.array_equal(before[k], after[k]) for k in before)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state.opt_state))


@functools.cache
def _single_device_stage2_steps():
  return _run("stage2", _batches(2))


@pytest.mark.parametrize("shape,chunk", [((1, 4, 2), 0), ((2, 4, 1), 16)],
                         ids=["fsdp_x_tensor", "data_x_fsdp_chunked_logits"])
def test_sharded_stage2_steps_equal_the_single_device_steps(shape, chunk):
  """The second case also computes the loss's logits 16 positions at a time."""
  mesh = make_mesh(shape)
  assert _batches(1)[0]["input_ids"].shape[-1] > 2 * 16
  _, single, m1 = _single_device_stage2_steps()
  trainer, sharded, m8 = _run("stage2", _batches(2, mesh), mesh=mesh, loss_chunk_size=chunk)
  for a, b in zip(m1, m8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), jax.device_get(single.params),
               jax.device_get(sharded.params))
  var = sharded.params["text"]["layers"]["mlp"]["down_proj"]["kernel"]
  kernel = var.get_value()
  want = partition_spec(var.get_metadata()["axes"], kernel.shape, mesh)
  assert kernel.sharding.spec == want and "fsdp" in want  # params stay on their logical-rule shardings
  mu = sharded.opt_state[1][0].mu["text"]["layers"]["mlp"]["down_proj"]["kernel"].get_value()
  assert mu.sharding == kernel.sharding  # Adam moments sharded like their params


def test_bf16_compute_keeps_fp32_master_weights_and_remat_changes_nothing():
  _, ref, m_ref = _single_device_stage2_steps()
  _, remat, m_remat = _run("stage2", _batches(2), model=tiny_model(remat_policy="full"))
  assert [float(m["loss"]) for m in m_remat] == pytest.approx([float(m["loss"]) for m in m_ref], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref.params, remat.params)
  _, bf16, m_bf16 = _run("stage2", _batches(1), model=tiny_model(compute_dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params) + jax.tree.leaves(bf16.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert m_bf16[0]["loss"] == pytest.approx(m_ref[0]["loss"], rel=3e-2) and m_bf16[0]["finite"] == 1


def test_sharded_step_keeps_each_row_on_its_batch_shard():
  """XLA's memory plan: with the rows over 8 FSDP devices, a device's temporaries (activations,
  logits) shrink with its share of the rows. Without the model's activation pins GSPMD gathered the
  whole batch onto every device (each device then computed every row)."""
  def temporaries(mesh):
    model = tiny_model() if mesh is None else shard_model(tiny_model(), mesh)
    trainer = TrainStep(model, stage("stage1"), OPT, total_steps=10, mesh=mesh)  # the cheapest to compile
    batch = _batches(1, mesh)[0]
    compiled = trainer.lower(trainer.abstract_state(model), batch, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  single, sharded = temporaries(None), temporaries(make_mesh((1, 8, 1)))
  assert sharded < single / 3, (sharded, single)
