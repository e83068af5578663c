"""Tiny random models and checkpoints: the one place tests, demos, notebooks and benchmarks build them.

Nothing can be downloaded on CI machines, so every test starts from a model built here. JAX models are
initialised once per (config, seed, kind) in a process and handed out as fresh copies, so a test suite
pays each initialisation once and a test may change its copy freely. PyTorch/transformers references
come from `tiny_checkpoint` (needs torch).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.core.config import ModelConfig, tiny_config
from dvl_jax.models.families import build_model

__all__ = ["tiny_config", "tiny_text_config", "tiny_model", "save_tiny_checkpoint", "converted_checkpoint"]


def tiny_text_config(**overrides: Any) -> ModelConfig:
  """`tiny_config`'s decoder and token ids as the text-only `qwen2` family (no vision tower, 1-D positions)."""
  return tiny_config(family="qwen2", vision=None, **overrides)


@functools.cache
def _initial(cfg: ModelConfig, seed: int, spread: bool) -> tuple[Any, nnx.State]:
  graphdef, state = nnx.split(build_model(cfg, nnx.Rngs(seed)))
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


def tiny_model(cfg: ModelConfig | None = None, *, seed: int = 0, spread: bool = False) -> Any:
  """A random model of `cfg`'s family (default `tiny_config()`), a fresh copy of the one built per process.

  `spread=True` redraws every param with a visible spread and a sharp lm_head (norm scales ~ N(1, 0.2),
  lm_head ~ N(0, 0.9), the rest ~ N(0, 0.3)), so that the samplers' confidences cover (0, 1) and the
  dynamic / threshold strategies take different decisions.
  """
  graphdef, state = _initial(tiny_config() if cfg is None else cfg, seed, spread)
  return nnx.merge(graphdef, state, copy=True)


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
  from dvl_jax.testing.tiny_checkpoint import save_hf_checkpoint

  hf_dir, dst = os.path.join(root, "hf"), os.path.join(root, "dvl")
  hf = save_hf_checkpoint(hf_dir, cfg, seed=seed)
  convert(hf_dir, dst, progress=False)
  return hf, dst
