"""The vocabulary of checkpoint key maps: Hub tensor names <-> params, as data, one table both ways.

Each family's `key_map.py` (next to its modules) holds `RULES` (a tuple of `Rule`), `LAYOUTS` (prefix
renames that reduce every supported checkpoint layout to its Hub names) and `SIDE_FILES` (weights kept in
files of their own, DiffusionVL's training layout). `{i}` in a Hub name is the layer index: those tensors
fill one slice of a stacked param (leading `layers` axis). Kernels are stored `[in, out]` (`weight.T`).
"""

from __future__ import annotations

import dataclasses
import enum
from types import ModuleType
from typing import Sequence

import numpy as np

from dvl_jax.core.config import ModelConfig
from dvl_jax.models import families

ParamPath = tuple[str, ...]
LM_HEAD = "lm_head.weight"  # dropped from a tied model's checkpoint (checked equal to the embedding)
EMBED_TOKENS = "model.embed_tokens.weight"


class Transform(enum.Enum):
  """How a PyTorch tensor becomes a param (and back)."""

  IDENTITY = "identity"
  TRANSPOSE = "transpose"  # Linear weight [out, in] -> kernel [in, out]
  CONV3D_FLATTEN = "conv3d_flatten"  # Conv3d weight [out, C, t, p, p] -> kernel [C*t*p*p, out]
  CONV2D_FLATTEN = "conv2d_flatten"  # Conv2d weight [out, C, p, p] -> kernel [C*p*p, out]

  def to_param(self, x: np.ndarray) -> np.ndarray:
    if self is Transform.IDENTITY:
      return x
    return (x if self is Transform.TRANSPOSE else x.reshape(x.shape[0], -1)).T

  def to_torch(self, x: np.ndarray, torch_shape: Sequence[int]) -> np.ndarray:
    return x if self is Transform.IDENTITY else x.T.reshape(torch_shape)

  def torch_shape(self, param_shape: Sequence[int], cfg: ModelConfig) -> tuple[int, ...]:
    if self is Transform.IDENTITY:
      return tuple(param_shape)
    if self is Transform.TRANSPOSE:
      return tuple(reversed(param_shape))
    v = cfg.vision
    if self is Transform.CONV2D_FLATTEN:
      return (param_shape[1], v.in_channels, v.patch_size, v.patch_size)
    return (param_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


@dataclasses.dataclass(frozen=True)
class Rule:
  hub: str  # Hub name; "{i}" marks the layer index of a stacked param
  param: str  # dotted param path in the nnx state
  transform: Transform

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hub


def linear(hub: str, param: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{hub}.weight", f"{param}.kernel", Transform.TRANSPOSE)]
  return rules + [Rule(f"{hub}.bias", f"{param}.bias", Transform.IDENTITY)] if bias else rules


def norm(hub: str, param: str) -> list[Rule]:
  return [Rule(f"{hub}.weight", f"{param}.scale", Transform.IDENTITY)]


@dataclasses.dataclass(frozen=True)
class HubTensor:
  """One Hub tensor: the param it fills, the layer slice (None: the whole param) and its shape."""

  name: str
  param: ParamPath
  layer: int | None
  transform: Transform
  shape: tuple[int, ...]  # PyTorch shape


@dataclasses.dataclass(frozen=True)
class Layout:
  """A checkpoint layout (spec §8): recognised by marker prefixes, reduced to Hub names by prefix renames."""

  name: str
  renames: tuple[tuple[str, str], ...]  # (prefix in the files, Hub prefix); first match wins
  markers: tuple[str, ...]  # a name with one of these prefixes identifies the layout


def family_key_map(cfg: ModelConfig) -> ModuleType:
  """The key map module of `cfg.family`."""
  return families.get(cfg.family).key_map


def hub_tensors(param_shapes: dict[ParamPath, tuple[int, ...]], cfg: ModelConfig) -> list[HubTensor]:
  """Every Hub tensor of the model whose params have these shapes, in the family's table order."""
  rules = family_key_map(cfg).RULES
  by_param = {tuple(r.param.split(".")): r for r in rules}
  unmapped = sorted(".".join(p) for p in param_shapes if p not in by_param)
  if unmapped:
    raise KeyError(f"the {cfg.family} key map has no rule for the params {unmapped}")
  out = []
  for path, rule in by_param.items():
    if path not in param_shapes:
      continue
    shape = param_shapes[path]
    if rule.stacked:
      torch_shape = rule.transform.torch_shape(shape[1:], cfg)
      out += [HubTensor(rule.hub.format(i=i), path, i, rule.transform, torch_shape) for i in range(shape[0])]
    else:
      out.append(HubTensor(rule.hub, path, None, rule.transform, rule.transform.torch_shape(shape, cfg)))
  return out
