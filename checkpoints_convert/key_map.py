"""Hub Qwen2.5-VL tensor names <-> params of `Qwen25VL`, as data: one table used in both directions.

`{i}` in a Hub name is the layer index: those tensors fill one slice of a stacked param (leading
`layers` axis). Kernels are stored `[in, out]`, i.e. PyTorch's `weight.T`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence

import numpy as np

from dvl_jax.config import ModelConfig

ParamPath = tuple[str, ...]
LM_HEAD = "lm_head.weight"
EMBED_TOKENS = "model.embed_tokens.weight"


class Transform(enum.Enum):
  """How a PyTorch tensor becomes a param (and back)."""

  IDENTITY = "identity"
  TRANSPOSE = "transpose"  # Linear weight [out, in] -> kernel [in, out]
  CONV3D_FLATTEN = "conv3d_flatten"  # Conv3d weight [out, C, t, p, p] -> kernel [C*t*p*p, out]

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
    return (param_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


@dataclasses.dataclass(frozen=True)
class Rule:
  hub: str  # Hub name; "{i}" marks the layer index of a stacked param
  param: str  # dotted param path in the nnx state
  transform: Transform

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hub


def _linear(hub: str, param: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{hub}.weight", f"{param}.kernel", Transform.TRANSPOSE)]
  return rules + [Rule(f"{hub}.bias", f"{param}.bias", Transform.IDENTITY)] if bias else rules


def _norm(hub: str, param: str) -> list[Rule]:
  return [Rule(f"{hub}.weight", f"{param}.scale", Transform.IDENTITY)]


_MLP = ("gate_proj", "up_proj", "down_proj")

RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", Transform.CONV3D_FLATTEN),
    *_norm("visual.blocks.{i}.norm1", "visual.blocks.norm1"),
    *_norm("visual.blocks.{i}.norm2", "visual.blocks.norm2"),
    *_linear("visual.blocks.{i}.attn.qkv", "visual.blocks.attn.qkv"),
    *_linear("visual.blocks.{i}.attn.proj", "visual.blocks.attn.proj"),
    *[r for p in _MLP for r in _linear(f"visual.blocks.{{i}}.mlp.{p}", f"visual.blocks.mlp.{p}")],
    *_norm("visual.merger.ln_q", "visual.merger.ln_q"),
    *_linear("visual.merger.mlp.0", "visual.merger.mlp_in"),
    *_linear("visual.merger.mlp.2", "visual.merger.mlp_out"),
    Rule(EMBED_TOKENS, "text.embed_tokens.embedding", Transform.IDENTITY),
    *_norm("model.layers.{i}.input_layernorm", "text.layers.input_layernorm"),
    *_norm("model.layers.{i}.post_attention_layernorm", "text.layers.post_attention_layernorm"),
    *[r for p in ("q_proj", "k_proj", "v_proj")
      for r in _linear(f"model.layers.{{i}}.self_attn.{p}", f"text.layers.self_attn.{p}")],
    *_linear("model.layers.{i}.self_attn.o_proj", "text.layers.self_attn.o_proj", bias=False),
    *[r for p in _MLP for r in _linear(f"model.layers.{{i}}.mlp.{p}", f"text.layers.mlp.{p}", bias=False)],
    *_norm("model.norm", "text.norm"),
    *_linear("lm_head", "lm_head", bias=False),  # absent from the model when embeddings are tied
)


@dataclasses.dataclass(frozen=True)
class HubTensor:
  """One Hub tensor: the param it fills, the layer slice (None: the whole param) and its shape."""

  name: str
  param: ParamPath
  layer: int | None
  transform: Transform
  shape: tuple[int, ...]  # PyTorch shape


def hub_tensors(param_shapes: dict[ParamPath, tuple[int, ...]], cfg: ModelConfig) -> list[HubTensor]:
  """Every Hub tensor of the model whose params have these shapes, in table order."""
  by_param = {tuple(r.param.split(".")): r for r in RULES}
  unmapped = sorted(".".join(p) for p in param_shapes if p not in by_param)
  if unmapped:
    raise KeyError(f"checkpoints_convert.key_map.RULES has no rule for the params {unmapped}")
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
