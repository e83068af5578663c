"""The options of a training run as one `ml_collections.ConfigDict` (files in `configs/` start from here),
and `--config.key=value` overrides with the type of the default."""

from __future__ import annotations

import importlib.util
from typing import Sequence

import ml_collections
from ml_collections import config_dict

from dvl_jax.data.processor import MAX_PIXELS, MIN_PIXELS


def default_config() -> ml_collections.ConfigDict:
  """Stage 2 of DiffusionVL-QwenVL (spec §7.1): BD3-LM, everything trainable, global batch 256."""
  c = ml_collections.ConfigDict()
  c.stage = "stage2"                 # stage1 (AR, projector only) | stage2 (BD3-LM, all) | ar (AR, all)
  c.init_checkpoint = ""             # a `dvl convert` output (or a previous run's workdir/model); required
  c.mesh = "1,-1,1"                  # data,fsdp,tensor device counts; -1 = the remaining devices
  c.seed = 0
  c.total_steps = 0                  # 0 = `epochs` passes over the data
  c.epochs = 1
  c.compute_dtype = "bfloat16"       # activations; params and optimizer state stay float32
  c.remat_policy = "full"            # none | full | dots_saveable | nothing_saveable
  c.attention_backend = "auto"       # auto | xla | splash | pallas_gpu | cudnn
  c.loss_chunk_size = 1024           # vocabulary logits this many positions at a time (same loss); 0 = all
  c.log_every = 10
  c.checkpoint_every = 800
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.tensorboard = True
  c.save_model = True                # write workdir/model (loadable by dvl.load / dvl export) at the end

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-5
  c.optimizer.vision_learning_rate = config_dict.placeholder(float)  # None = learning_rate
  c.optimizer.vision_learning_rate = 2e-6
  c.optimizer.projector_learning_rate = config_dict.placeholder(float)  # None = learning_rate
  c.optimizer.warmup_ratio = 0.03
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.json = ""                   # LLaVA-format .json / .jsonl
  c.data.image_folder = ""           # image paths in the JSON are relative to it ("" = the JSON's folder)
  c.data.batch_size = 256            # global, all processes
  c.data.micro_batches = 8           # gradient accumulation: batch_size / micro_batches rows per forward
  c.data.max_length = 8192
  c.data.num_buckets = 4
  c.data.length_multiple = 64
  c.data.square_pad = True
  c.data.block_aligned_eos = True
  c.data.min_pixels = MIN_PIXELS
  c.data.max_pixels = MAX_PIXELS
  c.data.num_threads = 16
  c.data.prefetch = 4
  c.data.worker_count = 0
  return c


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of the Python file `path`, then `key.sub=value` overrides."""
  spec = importlib.util.spec_from_file_location("dvl_run_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    apply_override(config, item)
  return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """`a.b=value`, converted to the type of the current value (bool: true/false/1/0)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise ValueError(f"override {item!r} must look like key=value")
  *parents, name = key.split(".")
  node = config
  for part in parents:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or name not in node:
    raise KeyError(f"unknown config key {key!r}")
  current = node[name]
  kind = type(current) if current is not None else node.get_type(name)
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      value = text.lower() in ("true", "1")
    else:
      value = kind(text)
  except ValueError:
    raise ValueError(f"config key {key!r} needs a {kind.__name__}, got {text!r}") from None
  node[name] = value
