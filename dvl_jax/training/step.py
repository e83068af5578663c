"""The pure train step of both stages, jitted with explicit shardings and a donated state.

    trainer = TrainStep(model, stage("stage2"), OptimizerConfig(), total_steps=1000, mesh=mesh)
    state = trainer.init(model)
    state, metrics = trainer(state, batch, rng)   # batch leaves: [A, B/A, ...] micro-batches

Batches carry a leading micro-batch axis (`DataConfig(micro_batches=A)`): gradients are summed over a
`lax.scan` of the A micro-batches, averaged, clipped, and applied once (HF gradient accumulation).
Training uses flat positions (spec §3.2: DiffusionVL never builds M-RoPE positions). A step whose loss
or gradient norm is not finite leaves the state unchanged and reports `finite = 0`, so the host loop
can stop with the last good state.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dvl_jax.diffusion.loss import ar_loss, bd3_loss
from dvl_jax.parallel.rules import RULES
from dvl_jax.training.optimizer import OptimizerConfig, make_optimizer
from dvl_jax.training.state import Stage, TrainState, split_model

Batch = dict[str, Any]
ROW_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values")


def batch_shardings(batch: Batch, mesh: Mesh) -> Batch:
  """Rows (and pixel chunks) over the batch mesh axes after the micro-batch axis; layouts replicated."""
  rows = NamedSharding(mesh, PartitionSpec(None, RULES["batch"]))
  replicated = NamedSharding(mesh, PartitionSpec())
  return {k: jax.tree.map(lambda _: rows if k in ROW_KEYS else replicated, v) for k, v in batch.items()}


def _by_param_path(params: nnx.State, tree: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer-state tree: a leaf whose path ends with a param's path (and has its
  shape) takes that param's sharding; everything else (step counts) is replicated."""
  by_path = {tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    for k in range(len(path)):
      param = by_path.get(tuple(path[k:]))
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


class TrainStep:
  """Owns the graphdef, the optimizer and the shardings of one run; calling it runs the jitted step."""

  def __init__(self, model: nnx.Module, stage: Stage, optimizer: OptimizerConfig, total_steps: int,
               mesh: Mesh | None = None, *, loss_chunk_size: int = 0):
    self.stage, self.mesh, self.model_config = stage, mesh, model.config
    self.loss_chunk_size = loss_chunk_size
    self.graphdef, params, frozen = split_model(model, stage)
    if not jax.tree.leaves(params):
      raise ValueError(f"stage {stage} leaves no parameter to train")
    self.tx, self.schedule = make_optimizer(optimizer, total_steps, model.param_group)
    self._compiled: dict[Any, Any] = {}

  def init(self, model: nnx.Module) -> TrainState:
    """A fresh state from the model's current params (already placed on the mesh, if any)."""
    _, params, frozen = split_model(model, self.stage)
    shardings = None if self.mesh is None else _by_param_path(params, jax.eval_shape(self.tx.init, params), self.mesh)
    opt_state = jax.jit(self.tx.init, out_shardings=shardings)(params)
    step = jnp.zeros((), jnp.int32)
    if self.mesh is not None:
      step = jax.device_put(step, NamedSharding(self.mesh, PartitionSpec()))
    return TrainState(step, params, frozen, opt_state)

  def abstract_state(self, model: nnx.Module) -> TrainState:
    """`ShapeDtypeStruct`s with shardings: the restore target of a checkpoint of this run."""
    _, params, frozen = split_model(model, self.stage)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, frozen, jax.eval_shape(self.tx.init, params))
    shardings = self.state_shardings(model)
    if shardings is None:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

  def state_shardings(self, model: nnx.Module) -> TrainState | None:
    if self.mesh is None:
      return None
    _, params, frozen = split_model(model, self.stage)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    placed = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    return TrainState(replicated, placed(params), placed(frozen),
                      _by_param_path(params, jax.eval_shape(self.tx.init, params), self.mesh))

  def model(self, state: TrainState) -> nnx.Module:
    return nnx.merge(self.graphdef, state.params, state.frozen)

  def __call__(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.tree.structure(batch)
    if key not in self._compiled:
      self._compiled[key] = self._jit(state, batch)
    with self._mesh_context():
      return self._compiled[key](state, batch, rng)

  def lower(self, state: TrainState, batch: Batch, rng: jax.Array) -> jax.stages.Lowered:
    """The step lowered for these (possibly abstract `ShapeDtypeStruct`) inputs, e.g. to read XLA's
    memory plan with `.compile().memory_analysis()` before any array exists."""
    with self._mesh_context():
      return self._jit(state, batch).lower(state, batch, rng)

  def _mesh_context(self):
    """The model pins its activations' shardings (`rules.constrain`) against this mesh."""
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _jit(self, state: TrainState, batch: Batch):
    if self.mesh is None:
      return jax.jit(self._step, donate_argnums=0)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return jax.jit(self._step, in_shardings=(shardings, batch_shardings(batch, self.mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  def _loss(self, params: nnx.State, frozen: nnx.State, micro: Batch, rng: jax.Array):
    model = nnx.merge(self.graphdef, params, frozen)
    if self.stage.objective == "bd3":
      return bd3_loss(model, micro, rng, loss_chunk_size=self.loss_chunk_size)
    loss, _ = ar_loss(model, micro, loss_chunk_size=self.loss_chunk_size)
    return loss, {"loss": loss}

  def _step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """Pure: (state, micro-batches `[A, ...]`, key) -> (next state, metrics averaged over micro-batches)."""
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def accumulate(grads, xs):
      index, micro = xs
      (_, metrics), g = grad_fn(state.params, state.frozen, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    grads, metrics = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), batch))
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    metrics = {k: v.mean() for k, v in metrics.items()}
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(state.step + finite.astype(jnp.int32), keep(params, state.params), state.frozen,
                           keep(opt_state, state.opt_state))
    ids = batch["input_ids"]
    is_image = ids == self.model_config.image_token_id
    images = is_image[..., :1].sum() + (is_image[..., 1:] & ~is_image[..., :-1]).sum()  # runs of image tokens
    metrics.update(grad_norm=grad_norm, lr=self.schedule(state.step), finite=finite.astype(jnp.float32),
                   tokens=batch["attention_mask"].sum().astype(jnp.float32), slots=jnp.float32(ids.size),
                   images=images.astype(jnp.float32))
    return new_state, metrics
