"""The train state: trainable params (fp32 master), frozen params, optimizer state, step.

Frozen params live apart from the trainable ones, so the optimizer state (and the gradients) only
cover what trains: stage 1 keeps Adam moments for the projector alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
from flax import nnx

from dvl_jax.models.interface import path_names

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a run optimises: `objective` "ar" (next-token CE) or "bd3" (BD3-LM, spec §5), and which
  params train: "projector" (the family's `param_group` "projector", Qwen2.5-VL's PatchMerger) or "all"."""

  objective: str
  trainable: str

  def __post_init__(self):
    if self.objective not in ("ar", "bd3"):
      raise ValueError(f"objective={self.objective!r} must be 'ar' or 'bd3'")
    if self.trainable not in ("projector", "all"):
      raise ValueError(f"trainable={self.trainable!r} must be 'projector' or 'all'")

  def is_trainable(self, path: Path, param_group: Callable[[tuple[str, ...]], str]) -> bool:
    return self.trainable == "all" or param_group(path_names(path)) == "projector"


# Spec §7: stage 1 = connector alignment (AR, projector only); stage 2 = diffusion finetuning (BD3, all).
# "ar" trains everything with next-token CE (the demo's AR source model, the LLaVA baseline of §7.3).
STAGES = {"stage1": Stage("ar", "projector"), "stage2": Stage("bd3", "all"), "ar": Stage("ar", "all")}


def stage(name: str) -> Stage:
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
  return STAGES[name]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  frozen: nnx.State
  opt_state: Any


def split_model(model: nnx.Module, stage: Stage) -> tuple[Any, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else)."""
  trainable = lambda path, _: stage.is_trainable(tuple(path), model.param_group)  # noqa: E731
  return nnx.split(model, nnx.All(nnx.Param, trainable), ...)
