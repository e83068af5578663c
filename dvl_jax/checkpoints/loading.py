"""Loading converted checkpoints (`dvl.convert` output): the model is built abstractly, then every param
is restored straight onto its target sharding, so no host ever holds the whole model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from dvl_jax.core import storage
from dvl_jax.core.config import ModelConfig
from dvl_jax.models import layer_layout
from dvl_jax.models.families import abstract_model
from dvl_jax.parallel import rules

CONFIG_FILE = "config.json"  # ModelConfig.save
PARAMS_DIR = "params"  # Orbax checkpoint of the nnx.Param state


def restore_params(ckpt_dir: str, abstract_state: nnx.State, shardings: Any = None) -> nnx.State:
  """Restores the params of a converted checkpoint.

  `shardings` mirrors `abstract_state` (e.g. `rules.logical_shardings`); without it (or for None
  leaves) arrays go to the default device. Dtypes follow `abstract_state` (Orbax casts while reading).
  """
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if shardings is None:
    shardings = rules.logical_shardings(abstract_state, None)  # all None: the default device

  def target(var: nnx.Variable, sharding: Any) -> nnx.Variable:
    return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding or default))

  targets = jax.tree.map(target, abstract_state, shardings, is_leaf=_is_var)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(storage.as_path(ckpt_dir) / PARAMS_DIR, targets)


def load(ckpt_dir: str, mesh: Mesh | None = None, *, dtype: Any = None, **config_overrides: Any) -> Any:
  """The model of a converted checkpoint, params sharded over `mesh` by the logical-axis rules.

  The family (`dvl_jax.models.families`) comes from the checkpoint's config; the result implements
  `dvl_jax.models.interface.DiffusionLM` and is called as design §3's model call.

  `dtype` overrides the stored param dtype (e.g. "bfloat16" on accelerators); `config_overrides` set
  run-time fields of the model config (`compute_dtype`, `remat_policy`, `attention_backend`, ...).
  `scan_layers=False` slices the stored layer stacks into per-layer params (one stack at a time, freed as it
  goes): the samplers' loops then read each layer's weights in place (the `dvl generate` / `serve` / `eval`
  default), at the price of unrolled compiles.
  `ckpt_dir` may be a `gs://` URL.
  """
  if mesh is not None and not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, e.g. dvl.make_mesh((1, 2, 4)) over ('data', 'fsdp', "
                    f"'tensor'); got {type(mesh).__name__}")
  root = storage.as_path(ckpt_dir)
  if not ((root / CONFIG_FILE).is_file() and (root / PARAMS_DIR).is_dir()):
    raise FileNotFoundError(f"{ckpt_dir} is not a converted checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/); "
                            "convert Hugging Face / DiffusionVL weights first with dvl.convert")
  cfg = ModelConfig.load(str(root / CONFIG_FILE))
  stored_dtype = cfg.param_dtype
  if dtype is not None:
    config_overrides["param_dtype"] = jnp.dtype(dtype).name
  cfg = cfg.replace(**config_overrides) if config_overrides else cfg
  graphdef, state = nnx.split(abstract_model(cfg), nnx.Param)
  shardings = rules.logical_shardings(state, mesh)
  if cfg.scan_layers:
    params = restore_params(ckpt_dir, state, shardings)
  else:  # the stored stacks, sliced into the model's per-layer params
    stored = layer_layout.stored_params(cfg)
    params = layer_layout.per_layer(restore_params(ckpt_dir, stored, rules.logical_shardings(stored, mesh)),
                                    state, shardings)
  if jnp.finfo(cfg.param_dtype).max < jnp.finfo(stored_dtype).max:  # Orbax casts while reading: float16 may overflow
    _check_finite(params, ckpt_dir, cfg.param_dtype)
  return nnx.merge(graphdef, params)


def _check_finite(params: nnx.State, ckpt_dir: str, dtype: str) -> None:
  for path, value in nnx.to_flat_state(params):
    if not bool(jnp.isfinite(value.get_value()).all()):
      raise ValueError(f"{ckpt_dir}: {'.'.join(map(str, path))} overflows {dtype} (its values pass its range); load "
                       "it in bfloat16 or float32")


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)
