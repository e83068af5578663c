"""Tiny random models and checkpoints: the one place tests, demos, notebooks and benchmarks build them.

Nothing can be downloaded on CI machines, so every test starts from a model built here. JAX models are
initialised once per (config, seed, kind) in a process and handed out as fresh copies (own buffers), so a
test suite pays each initialisation once and a test may change or donate its copy freely. The PyTorch
references (`build_hf_model`, `save_hf_checkpoint`; they need torch) draw weights with a visible spread (norm
scales around 1, non-zero biases, matrices at `1/sqrt(fan_in)` like a trained model) so that a wrong transpose,
a missing bias or a swapped norm shows up as a large difference, while fp32 rounding stays far below the
parity tolerances (larger weights blow activations up until transformers' own fp32 result is 1e-4 away from
fp64).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.core.config import ModelConfig, TextConfig, VisionConfig
from dvl_jax.models import layer_layout
from dvl_jax.models.families import abstract_model, build_model

__all__ = ["tiny_config", "tiny_text_config", "tiny_siglip_config", "tiny_model", "save_tiny_checkpoint",
           "build_hf_model", "save_hf_checkpoint", "converted_checkpoint"]


def tiny_config(**overrides: Any) -> ModelConfig:
  """A few-layer model with a tiny vocabulary for tests and demos (mask id inside the vocab)."""
  vision = VisionConfig(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                        fullatt_block_indexes=(1, 3))
  text = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, rope_theta=10_000.0, tie_word_embeddings=False, mrope_section=(2, 3, 3),
                    max_position_embeddings=4096)
  base = ModelConfig(vision=vision, text=text, image_token_id=250, video_token_id=251,
                     vision_start_token_id=248, vision_end_token_id=249, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0, mask_token_id=255)
  return base.replace(**overrides)


def tiny_siglip_config(**overrides: Any) -> ModelConfig:
  """`tiny_config`'s decoder as the `diffusionvl_qwen` family: a 2-layer SigLIP on 44-pixel crops (3x3 patches
  of 14, the last 2 pixels dropped as 384 / 14 drops 6), anyres_max_4 over crop grids up to 3x3, flat positions."""
  from dvl_jax.models.diffusionvl_qwen.vision_config import SiglipVisionConfig

  vision = SiglipVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                              image_size=44, grid_pinpoints=tuple((j, i) for i in range(1, 4) for j in range(1, 4)))
  # Fields this family does not use (video / vision-start ids, M-RoPE sections) keep ModelConfig's defaults, as
  # in a config converted from its checkpoints.
  base = ModelConfig()
  cfg = tiny_config(family="diffusionvl_qwen", vision=vision, video_token_id=base.video_token_id,
                    vision_start_token_id=base.vision_start_token_id, vision_end_token_id=base.vision_end_token_id)
  return cfg.replace(text=dataclasses.replace(cfg.text, mrope_section=base.text.mrope_section), **overrides)


def tiny_text_config(**overrides: Any) -> ModelConfig:
  """`tiny_config`'s decoder and token ids as the text-only `qwen2` family (no vision tower, 1-D positions)."""
  return tiny_config(family="qwen2", vision=None, **overrides)


@functools.cache
def _initial(cfg: ModelConfig, seed: int, spread: bool, logit_scale: float) -> tuple[Any, nnx.State]:
  if not cfg.scan_layers:  # the stacked model's values layer by layer: the same model in either layout
    _, stacked = _initial(cfg.replace(scan_layers=True), seed, spread, logit_scale)
    graphdef, like = nnx.split(abstract_model(cfg))
    return graphdef, layer_layout.per_layer(jax.tree.map(jnp.copy, stacked), like)
  model = build_model(cfg, nnx.Rngs(seed))
  if logit_scale != 1.0:
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * logit_scale
  graphdef, state = nnx.split(model)
  if not spread:
    return graphdef, state
  leaves, tree = jax.tree.flatten_with_path(state)
  rng = np.random.default_rng(seed)
  new = []
  for path, x in leaves:
    name = jax.tree_util.keystr(path)
    std = 0.2 if "scale" in name else 0.9 if "lm_head" in name else 0.3
    mean = np.float32(1.0 if "scale" in name else 0.0)
    new.append(jnp.asarray(mean + std * rng.standard_normal(x.shape, np.float32)))
  return graphdef, jax.tree.unflatten(tree, new)


def tiny_model(cfg: ModelConfig | None = None, *, seed: int = 0, spread: bool = False,
               logit_scale: float = 1.0) -> Any:
  """A random model of `cfg`'s family (default `tiny_config()`), a fresh copy of the one built per process.

  `spread=True` redraws every param with a visible spread and a sharp lm_head (norm scales ~ N(1, 0.2),
  lm_head ~ N(0, 0.9), the rest ~ N(0, 0.3)), so that the samplers' confidences cover (0, 1) and the
  dynamic / threshold strategies take different decisions. `logit_scale` multiplies an untied lm_head
  instead (40 spreads the default init's ~1/vocab confidences over (0, 1)).
  """
  graphdef, state = _initial(tiny_config() if cfg is None else cfg, seed, spread, logit_scale)
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # own buffers: a train step may donate them


def save_tiny_checkpoint(dst: str, cfg: ModelConfig | None = None, *, seed: int = 0, tokenizer: Any = None) -> str:
  """A random model saved as a converted (dvl) checkpoint, with `tokenizer`'s files if given."""
  from dvl_jax.checkpoints import saving

  saving.save(tiny_model(cfg, seed=seed), dst)
  if tokenizer is not None:
    tokenizer.save_pretrained(dst)
  return dst


def converted_checkpoint(root: str, cfg: ModelConfig | None = None, *, seed: int = 0) -> tuple[Any, str]:
  """(a random transformers model of `cfg`'s family saved under `root/hf`, its `dvl.convert` output dir).

  The transformers model is the reference of the parity tests; the converted directory is what `dvl.load`
  reads, so a test goes through the real conversion path.
  """
  from checkpoints_convert import convert

  hf_dir, dst = os.path.join(root, "hf"), os.path.join(root, "dvl")
  hf = save_hf_checkpoint(hf_dir, cfg, seed=seed)
  convert(hf_dir, dst, progress=False)
  return hf, dst


# transformers' (config class, model class) of each family: the reference its parity tests compare with.
HF_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "diffusionvl_qwen": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration")}


def build_hf_model(cfg: ModelConfig | None = None, *, seed: int = 0) -> Any:
  """A randomly initialised fp32 transformers model of `cfg`'s family (`HF_CLASSES`) matching `cfg` (needs torch)."""
  import torch
  import transformers

  cfg = tiny_config() if cfg is None else cfg
  config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[cfg.family])
  torch.manual_seed(seed)
  model = model_class(config_class(**cfg.to_hf())).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_norm = name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name
      if is_norm:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif param.ndim == 1:  # biases
        param.copy_(0.1 * torch.randn_like(param))
      elif "embed_tokens" in name:
        param.copy_(torch.randn_like(param))
      else:  # Linear [out, in] / Conv3d [out, c, t, h, w]
        param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
  return model


def save_hf_checkpoint(path: str, cfg: ModelConfig | None = None, *, seed: int = 0,
                       max_shard_size: str = "2GB", dtype: Any = None) -> Any:
  """Builds a tiny model, saves it with `save_pretrained` (safetensors) and returns the torch model."""
  model = build_hf_model(cfg, seed=seed)
  saved = model if dtype is None else model.to(dtype)
  saved.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
  return model
