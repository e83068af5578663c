"""Tiny random Qwen2.5-VL checkpoints built in PyTorch: fixtures for tests, demos and benchmarks.

Nothing can be downloaded on CI machines, so every parity check starts from a model built here.
Weights are drawn with a visible spread (norm scales around 1, biases non-zero) so that a wrong
transpose, a missing bias or a swapped norm shows up as a large difference.
"""

from __future__ import annotations

from typing import Any

from dvl_jax.config import ModelConfig, tiny_config


def build_hf_model(cfg: ModelConfig | None = None, *, seed: int = 0, std: float = 0.3) -> Any:
  """A randomly initialised fp32 `Qwen2_5_VLForConditionalGeneration` matching `cfg` (needs torch)."""
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  cfg = tiny_config() if cfg is None else cfg
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf())).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      is_norm = name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name
      param.copy_(1.0 + 0.2 * torch.randn_like(param) if is_norm else std * torch.randn_like(param))
  return model


def save_hf_checkpoint(path: str, cfg: ModelConfig | None = None, *, seed: int = 0,
                       max_shard_size: str = "2GB", dtype: Any = None) -> Any:
  """Builds a tiny model, saves it with `save_pretrained` (safetensors) and returns the torch model."""
  model = build_hf_model(cfg, seed=seed)
  saved = model if dtype is None else model.to(dtype)
  saved.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
  return model
