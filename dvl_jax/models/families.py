"""The model families, by name: what `dvl.load`, `dvl convert` and `dvl export` use to pick one.

A family is one folder under `dvl_jax/models/` with its modules (implementing `interface.DiffusionLM`), its
Hugging Face config reader / writer (`hf_config`: `from_hf(dict, **overrides)`, `to_hf(cfg)`) and its
checkpoint key map (`key_map`: `RULES`, `LAYOUTS`, `SIDE_FILES`, see `dvl_jax.models.key_map`), plus, for a family
that takes images, its host-side image hook (`images`, `dvl_jax.data.image_inputs`). The config's
`family` field names it; a checkpoint's `config.json` `model_type` picks it when converting. Entries are
import paths, so listing a family imports nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from flax import nnx

from dvl_jax.core.config import ModelConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class Family:
  name: str  # ModelConfig.family
  package: str  # holds model.py (the class `model_class`), hf_config.py and key_map.py
  model_class: str
  hf_model_types: tuple[str, ...]  # config.json `model_type` values this family reads
  description: str
  vision_config: str = ""  # a class in the family's `vision_config` module; "" = core.config.VisionConfig
  images: str = ""  # import path of its host-side image hook (`dvl_jax.data.image_inputs`); "" = no images
  # a sampled token's confidence at temperature > 0 (spec §7.5; `SamplingConfig.confidence`): "sampled" = its
  # probability under the temperature / top-k / top-p distribution, "softmax" = under the unmodified softmax
  confidence: str = "sampled"
  # the schedule of an answer inside the prompt's one block (spec §7.5; `SamplingConfig.ablation_schedule`):
  # `num_transfer` over "block_size" or over "gen_length" tokens
  ablation_schedule: str = "block_size"

  def module(self, name: str) -> ModuleType:
    return importlib.import_module(f"{self.package}.{name}")

  @property
  def model_type(self) -> type:
    return getattr(self.module("model"), self.model_class)

  @property
  def vision_config_type(self) -> type:
    """The dataclass of `ModelConfig.vision` for this family (what `ModelConfig.from_dict` rebuilds)."""
    return getattr(self.module("vision_config"), self.vision_config) if self.vision_config else VisionConfig

  @property
  def host_images(self) -> ModuleType:
    """The hook that turns images into this family's model inputs and layouts (`dvl_jax.data.image_inputs`)."""
    if not self.images:
      raise ValueError(f"the {self.name} family takes no images ({self.description})")
    return importlib.import_module(self.images)

  @property
  def hf_config(self) -> ModuleType:
    return self.module("hf_config")

  @property
  def key_map(self) -> ModuleType:
    return self.module("key_map")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2_5_vl", "dvl_jax.models.qwen25vl", "Qwen25VL",
           ("qwen2_5_vl", "diffusionvl_qwenvl", "llada_qwen"),
           "Qwen2.5-VL / DiffusionVL-QwenVL: Qwen ViT + PatchMerger + Qwen2.5 decoder",
           images="dvl_jax.data.qwen_images"),
    Family("qwen2", "dvl_jax.models.qwen2", "Qwen2LM", ("qwen2",),
           "Qwen2 / Qwen2.5 text-only LM (a block-diffusion LM; no vision tower)"),
    Family("diffusionvl_qwen", "dvl_jax.models.diffusionvl_qwen", "DiffusionVLQwen",
           ("diffusionvl_qwen", "llava_qwen", "llava_onevision"),
           "DiffusionVL-Qwen / LLaVA-OneVision: SigLIP + mlp2x_gelu + anyres packing + Qwen2.5 decoder",
           vision_config="SiglipVisionConfig", images="dvl_jax.data.llava_images", confidence="softmax",
           ablation_schedule="gen_length"),
)}


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}")
  return FAMILIES[name]


def for_hf_model_type(model_type: str) -> Family:
  """The family that reads a Hugging Face `config.json` of this `model_type`."""
  for family in FAMILIES.values():
    if model_type in family.hf_model_types:
      return family
  known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
  raise ValueError(f"config.json has model_type={model_type!r}; expected one of {known}")


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> Any:
  """A freshly initialised model of `cfg.family` (an `interface.DiffusionLM`)."""
  return get(cfg.family).model_type(cfg, rngs=rngs)


def abstract_model(cfg: ModelConfig) -> Any:
  """The model with `ShapeDtypeStruct` params (no memory): the source of shapes, dtypes and axes."""
  return nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
