"""The options of a training run as one `ml_collections.ConfigDict` (files in `configs/` start from here),
and `--config.key=value` overrides with the type of the default.

Each setting has its default in one place: the `data` and `optimizer` sections are generated from the
dataclasses they fill (`DataConfig`, `OptimizerConfig`), which own those defaults, and `from_section`
turns a section back into its dataclass; the run's own settings have theirs in `default_config`. The
spec's recipes are set on top in `configs/stage1.py` and `configs/stage2.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from typing import Any, Iterable, Sequence, TypeVar

import ml_collections
from ml_collections import config_dict

from dvl_jax.data.pipeline import DataConfig
from dvl_jax.training.optimizer import OptimizerConfig

T = TypeVar("T")


def default_config() -> ml_collections.ConfigDict:
  """Every setting at its default; also the schema: a key it lacks is a typo (`check_keys`)."""
  c = ml_collections.ConfigDict()
  c.stage = "stage2"                 # stage1 (AR, projector only) | stage2 (BD3-LM, all) | ar (AR, all)
  c.init_checkpoint = ""             # a `dvl convert` output (or a previous run's workdir/model); required
  c.mesh = "1,-1,1"                  # data,fsdp,tensor device counts; -1 = the remaining devices
  c.seed = 0                         # model noise and the data order
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
  c.optimizer = dataclass_section(OptimizerConfig)
  c.data = dataclass_section(DataConfig, skip=("seed",))  # the run's `seed` orders the data
  c.data.json = ""                   # LLaVA-format .json / .jsonl
  c.data.image_folder = ""           # image paths in the JSON are relative to it ("" = the JSON's folder)
  # Qwen2.5-VL's image size bounds (the Processor's); None: the checkpoint's, else DiffusionVL's defaults
  # (data.processor.MIN_PIXELS / MAX_PIXELS). Families with fixed-size crops (DiffusionVL-Qwen) take none.
  c.data.min_pixels = config_dict.placeholder(int)
  c.data.max_pixels = config_dict.placeholder(int)
  return c


def dataclass_section(cls: type, *, skip: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The fields of dataclass `cls` at their defaults. A field that may be None is a placeholder of its
  type, so it can be set to None and back and an override still knows how to parse it."""
  hints = typing.get_type_hints(cls)
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    kinds = typing.get_args(hints[field.name])
    if type(None) in kinds:
      (kind,) = (k for k in kinds if k is not type(None))
      section[field.name] = config_dict.placeholder(typing.get_origin(kind) or kind)
    section[field.name] = field.default
  return section


def from_section(cls: type[T], section: ml_collections.ConfigDict, **fixed: Any) -> T:
  """`cls` from the section's keys that are its fields (others, like `data.json`, are not its
  business), with `fixed` on top."""
  names = {field.name for field in dataclasses.fields(cls)}
  return cls(**{**{k: v for k, v in section.items() if k in names}, **fixed})


def check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None,
               path: tuple[str, ...] = ()) -> None:
  """Raises a one-line error for the first key of `config` that `default_config()` lacks (a config file
  may add keys to a ConfigDict silently; nothing would read them)."""
  schema = default_config() if schema is None else schema
  for key, value in config.items():
    if key not in schema:
      raise _unknown_key((*path, key), len(path), schema.keys())
    if isinstance(value, ml_collections.ConfigDict):
      check_keys(value, schema[key], (*path, key))


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
  """`a.b=value`, converted to the type of the current value (bool: true/false/1/0; tuple: comma-separated
  ints; `none` where the field may be None)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise ValueError(f"override {item!r} must look like key=value")
  *parents, name = parts = key.split(".")
  node = config
  for depth, part in enumerate(parents):
    if not isinstance(node.get(part), ml_collections.ConfigDict):
      raise _unknown_key(parts, depth, node.keys())
    node = node[part]
  if name not in node:
    raise _unknown_key(parts, len(parents), node.keys())
  current = node[name]
  kind = type(current) if current is not None else node.get_type(name)
  nullable = isinstance(dict(node.items(preserve_field_references=True))[name], config_dict.FieldReference)
  try:
    if nullable and text.lower() == "none":
      value = None
    elif kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      value = text.lower() in ("true", "1")
    elif kind is tuple:
      value = tuple(int(x) for x in text.split(","))
    else:
      value = kind(text)
  except ValueError:
    form = " of comma-separated ints" if kind is tuple else ""
    raise ValueError(f"config key {key!r} needs a {kind.__name__}{form}, got {text!r}") from None
  node[name] = value


def _unknown_key(path: Sequence[str], depth: int, known: Iterable[str]) -> ValueError:
  """Names the key whose part `path[depth]` is not among `known` and the fix: the closest known part,
  or the list of them."""
  parents, name = path[:depth], path[depth]
  close = difflib.get_close_matches(name, [k for k in known if k != name], n=1)
  fix = (f"did you mean {'.'.join([*parents, close[0], *path[depth + 1:]])!r}?" if close
         else f"known keys{' of ' + '.'.join(parents) if parents else ''}: {', '.join(sorted(known))}")
  return ValueError(f"unknown config key {'.'.join(path)!r} ({fix})")
