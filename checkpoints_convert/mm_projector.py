"""Stage 1's `mm_projector.bin` (DiffusionVL / LLaVA `pretrain_mm_mlp_adapter`), read and written.

LLaVA saves the trained connector alone as a PyTorch pickle of `model.mm_projector.{0,2}.{weight,bias}`; its
stage 2 loads it into a fresh model. The names go through the family's released-layout renames and key map,
so a file reads into the projector params, and a converted checkpoint's projector writes back the same way.
"""

from __future__ import annotations

import os

import numpy as np

from checkpoints_convert import layouts, orbax_stream
from checkpoints_convert.errors import ConversionError, NotACheckpointError, WeightsMismatchError
from dvl_jax.checkpoints.loading import CONFIG_FILE, PARAMS_DIR
from dvl_jax.core.config import ModelConfig
from dvl_jax.models import key_map
from dvl_jax.models.layer_layout import stored_params

PROJECTOR = "projector"  # the first name of the connector's params


def _file_name(hub: str, layout: key_map.Layout) -> str:
  """A Hub name as the layout's files spell it (its first rename that produces it, undone)."""
  return next((old + hub[len(new):] for old, new in layout.renames if hub.startswith(new)), hub)


def _projector_tensors(shapes: dict[key_map.ParamPath, tuple[int, ...]], cfg: ModelConfig) -> list[key_map.HubTensor]:
  return key_map.hub_tensors({p: s for p, s in shapes.items() if p[0] == PROJECTOR}, cfg)


def read_mm_projector(path: str, shapes: dict[key_map.ParamPath, tuple[int, ...]],
                      cfg: ModelConfig) -> dict[key_map.ParamPath, np.ndarray]:
  """The projector params of an `mm_projector.bin`, by path (`shapes`: the model's param shapes)."""
  import torch  # a .bin is a PyTorch pickle; safetensors checkpoints never need torch

  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
    raise ConversionError(f"{path}: not a readable mm_projector.bin ({type(e).__name__}: {e})") from None
  released = key_map.family_key_map(cfg).LAYOUTS[0]  # the released names: `model.mm_projector.*`
  found = {layouts._rename(name, released): (name, x) for name, x in state.items() if "mm_projector." in name}
  wanted = {t.name: t for t in _projector_tensors(shapes, cfg)}
  mismatched = [f"{found[n][0]}: {list(found[n][1].shape)} in the file, {list(t.shape)} from the configs"
                for n, t in wanted.items() if n in found and tuple(found[n][1].shape) != t.shape]
  missing = sorted(_file_name(n, released) for n in set(wanted) - set(found))
  unexpected = sorted(found[n][0] for n in set(found) - set(wanted))
  if missing or unexpected or mismatched:
    raise WeightsMismatchError(path, missing=missing, unexpected=unexpected, mismatched=mismatched)
  return {t.param: t.transform.to_param(found[n][1].float().numpy()) for n, t in wanted.items()}


def export_mm_projector(src_dir: str | os.PathLike, dst_path: str | os.PathLike) -> str:
  """Writes the projector of a converted checkpoint (e.g. after stage 1) as DiffusionVL's `mm_projector.bin`."""
  import torch

  src_dir, dst_path = os.path.abspath(src_dir), os.fspath(dst_path)
  config_path, params_dir = os.path.join(src_dir, CONFIG_FILE), os.path.join(src_dir, PARAMS_DIR)
  if not (os.path.isfile(config_path) and os.path.isdir(params_dir)):
    raise NotACheckpointError(f"{src_dir} is not a converted checkpoint: it needs {CONFIG_FILE} and {PARAMS_DIR}/")
  cfg = ModelConfig.load(config_path)
  released = key_map.family_key_map(cfg).LAYOUTS[0]
  state = stored_params(cfg)
  tensors = _projector_tensors({p: v.shape for p, v in orbax_stream.variables(state).items()}, cfg)
  if not tensors:
    raise ConversionError(f"{src_dir}: a {cfg.family} model has no mlp2x_gelu projector to write")
  arrays = orbax_stream.open_arrays(params_dir, state)
  if arrays.missing or arrays.mismatched:
    raise WeightsMismatchError(src_dir, missing=arrays.missing, unexpected=[], mismatched=arrays.mismatched)
  out = {_file_name(t.name, released): torch.from_numpy(np.ascontiguousarray(
      t.transform.to_torch(arrays.read(t.param, None), t.shape))) for t in tensors}
  tmp = dst_path + ".tmp"
  torch.save(out, tmp)
  os.replace(tmp, dst_path)
  return dst_path
