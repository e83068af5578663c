"""Tiny random transformers checkpoints (Qwen2.5-VL, Qwen2 LM) built in PyTorch: fixtures for tests, demos and benchmarks.

Nothing can be downloaded on CI machines, so every parity check starts from a model built here.
Weights are drawn with a visible spread (norm scales around 1, non-zero biases, matrices at
`1/sqrt(fan_in)` like a trained model) so that a wrong transpose, a missing bias or a swapped norm
shows up as a large difference, while fp32 rounding stays far below the parity tolerances (larger
weights blow activations up until transformers' own fp32 result is 1e-4 away from fp64).
"""

from __future__ import annotations

from typing import Any

from dvl_jax.core.config import ModelConfig, tiny_config


# transformers' (config class, model class) of each family: the reference its parity tests compare with.
HF_CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


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
