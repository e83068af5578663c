"""Optimizer of spec §7: AdamW (torch defaults), cosine schedule with linear warmup, global-norm
clipping, and a lower learning rate for the vision tower.

The vision tower's group follows the same schedule with a smaller peak, so its updates are the main
group's updates scaled by `vision_learning_rate / learning_rate` (decoupled weight decay included):
one Adam state mirroring the trainable params, no masked sub-states. The projector (PatchMerger) may
get a peak of its own the same way (LLaVA's `mm_projector_lr`; the spec's recipes leave it at the LM's).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dvl_jax.models.interface import ParamGroup, path_names

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Defaults are the DiffusionVL-QwenVL recipe (spec §7.1) and the run config's (its `optimizer`
  section is generated from this class); `vision_learning_rate=None` and `projector_learning_rate=None`
  mean the LM's `learning_rate`; `clip_norm` None or 0 turns clipping off."""

  learning_rate: float = 1e-5
  vision_learning_rate: float | None = 2e-6
  projector_learning_rate: float | None = None
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    groups = (self.vision_learning_rate, self.projector_learning_rate)
    if self.learning_rate <= 0 or any(lr is not None and lr < 0 for lr in groups):
      raise ValueError(f"learning rates must be positive (vision/projector >= 0), got {self.learning_rate} / "
                       f"{self.vision_learning_rate} / {self.projector_learning_rate}")
    if not 0 <= self.warmup_ratio < 1:
      raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")


def warmup_cosine(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """HF `get_cosine_schedule_with_warmup`: `ceil(ratio * total)` linear warmup steps from 0 (the first
  update uses lr 0, as in HF), then half a cosine down to 0 at `total_steps`."""
  warmup = math.ceil(warmup_ratio * total_steps)

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    progress = jnp.clip((count - warmup) / max(1, total_steps - warmup), 0.0, 1.0)
    return jnp.where(count < warmup, peak * count / max(1, warmup), peak * 0.5 * (1 + jnp.cos(jnp.pi * progress)))

  return schedule


def _scale_leaves(ratio: Callable[[Path], float]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by a constant chosen from its path."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * ratio(p) if ratio(p) != 1 else u, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, param_group: Callable[[tuple[str, ...]], ParamGroup]
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, learning-rate schedule of the main group). `param_group` is the model family's
  (`DiffusionLM.param_group`): the "vision" group (spec §7.1: the ViT proper) and the "projector" group
  may have their own peaks. Weight decay skips 1-D params (biases and norm scales), like HF's
  decay-parameter list."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1")
  schedule = warmup_cosine(cfg.learning_rate, total_steps, cfg.warmup_ratio)

  def ratio(path: Path) -> float:
    """The param's group peak over the LM's (a group without its own peak trains at the LM's)."""
    group = param_group(path_names(path))
    if group == "vision":
      peak = cfg.vision_learning_rate
    elif group == "projector":
      peak = cfg.projector_learning_rate
    else:
      peak = None
    return 1.0 if peak is None else peak / cfg.learning_rate

  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts += [optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
            _scale_leaves(ratio)]
  return optax.chain(*parts), schedule
