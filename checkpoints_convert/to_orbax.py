"""`convert`: Hugging Face / DiffusionVL safetensors -> Orbax checkpoint directory, streaming.

Every header is read and checked against the model first (all problems reported at once); then each
param is written while its tensors are read, one layer at a time, so the host never holds more than
the tensor being converted.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from checkpoints_convert import layouts, orbax_stream, safetensors_reader
from dvl_jax.models import key_map
from checkpoints_convert.errors import ConversionError, NotACheckpointError, WeightsMismatchError
from dvl_jax.models.key_map import HubTensor
from checkpoints_convert.output_dir import atomic_output, copy_side_files
from dvl_jax.core.config import ModelConfig
from dvl_jax.checkpoints.loading import CONFIG_FILE, PARAMS_DIR
from dvl_jax.models.layer_layout import stored_params

HF_CONFIG_COPY = "hf_config.json"
_COMPARE_BYTES = 64 << 20


def convert(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, dtype: str | None = None,
            progress: bool = True, overwrite: bool = False, **config_overrides: Any) -> str:
  """Converts a checkpoint of any layout of spec §8 into `dst_dir` (config.json, params/, side files).

  `dtype` sets the stored param dtype (default: the config's `param_dtype`, float32); the source
  may be float32, bfloat16 or float16. `config_overrides` set `ModelConfig` fields that a HF config
  does not carry (e.g. `mask_token_id`, `block_size`, `position_mode`). Returns `dst_dir`.
  """
  src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
  config_path = os.path.join(src_dir, CONFIG_FILE)
  if not os.path.isdir(src_dir):
    raise NotACheckpointError(f"{src_dir} is not a directory")
  if not os.path.isfile(config_path):
    raise NotACheckpointError(f"{src_dir} is not a checkpoint: it has no {CONFIG_FILE}")
  with atomic_output(dst_dir, overwrite=overwrite, inputs=(src_dir,)) as tmp:
    cfg = _read_config(config_path, config_overrides)
    if dtype is not None:
      cfg = cfg.replace(param_dtype=float_dtype(dtype).name)
    state = stored_params(cfg)
    params = orbax_stream.variables(state)
    source = layouts.open_source(src_dir, key_map.family_key_map(cfg))
    tensors = key_map.hub_tensors({p: v.shape for p, v in params.items()}, cfg)
    check_weights(f"{src_dir} ({source.layout} layout)", source, tensors, cfg)
    with tqdm(total=len(tensors), desc="convert", unit="tensor", disable=not progress) as bar:

      def streamed(path: key_map.ParamPath, var: nnx.Variable) -> nnx.Variable:
        param_dtype = np.dtype(var.dtype)
        blocks = [_reader(source.tensors[t.name], t, param_dtype, bar) for t in tensors if t.param == path]
        return var.replace(orbax_stream.StreamedArray(tuple(var.shape), param_dtype, blocks))

      tree = jax.tree_util.tree_map_with_path(lambda p, v: streamed(orbax_stream.path_keys(p), v), state,
                                              is_leaf=lambda x: isinstance(x, nnx.Variable))
      copy_side_files(src_dir, tmp, skip=(CONFIG_FILE,))
      shutil.copy2(config_path, os.path.join(tmp, HF_CONFIG_COPY))
      cfg.save(os.path.join(tmp, CONFIG_FILE))
      orbax_stream.save(os.path.join(tmp, PARAMS_DIR), tree)
  return dst_dir


def float_dtype(name: str) -> np.dtype:
  """A floating-point dtype from its name ("bfloat16", "float32", ...), or a one-line error."""
  try:
    dtype = np.dtype(jnp.dtype(name))
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ConversionError(f"dtype={name!r} is not a floating-point dtype (use float32, bfloat16 or float16)")
  return dtype


def _read_config(path: str, overrides: dict[str, Any]) -> ModelConfig:
  try:
    return ModelConfig.from_hf(path, **overrides)
  except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
    detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
    raise ConversionError(f"{path}: not a usable Qwen2.5-VL / DiffusionVL config ({detail})") from None


def cast(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
  """`x` as `dtype`; a finite value past a narrower dtype's range (float16's 65,504) is an error, not an inf."""
  with np.errstate(over="ignore"):  # reported below, by tensor name
    y = x.astype(dtype, copy=False)
  if jnp.finfo(dtype).max < jnp.finfo(x.dtype).max:
    overflow = ~np.isfinite(y) & np.isfinite(x)
    if overflow.any():
      largest = float(np.abs(x[overflow]).max())
      raise ConversionError(f"{name}: values up to {largest:g} overflow {np.dtype(dtype).name} (largest "
                            f"{float(jnp.finfo(dtype).max):g}); convert to bfloat16 or float32")
  return y


def _reader(ref: safetensors_reader.TensorRef, t: HubTensor, dtype: np.dtype, bar: tqdm):
  """Block reader: one source tensor -> its slice of the param (with a leading axis of 1 if stacked)."""

  def read() -> np.ndarray:
    x = cast(t.transform.to_param(safetensors_reader.read(ref)), dtype, ref.name)
    bar.update(1)
    return x if t.layer is None else x[None]

  return read


def check_weights(where: str, source: layouts.Source, tensors: list[HubTensor], cfg: ModelConfig) -> None:
  """Raises one `WeightsMismatchError` naming every missing, unexpected and mis-shaped tensor.

  A tied model ignores an `lm_head.weight` equal to the embedding (checked) instead of reporting it.
  """
  expected = {t.name: t for t in tensors}
  missing = [name for name in expected if name not in source.tensors]
  mismatched = []
  for name, t in expected.items():
    ref = source.tensors.get(name)
    if ref is not None and ref.shape != t.shape:
      mismatched.append(f"{ref.name}: {list(ref.shape)} in the checkpoint, {list(t.shape)} from config.json")
    elif ref is not None and not jnp.issubdtype(ref.dtype, jnp.floating):
      mismatched.append(f"{ref.name}: dtype {ref.dtype} is not a floating-point type")
  tied_head = source.tensors.get(key_map.LM_HEAD) if cfg.text.tie_word_embeddings else None
  if tied_head is not None and key_map.EMBED_TOKENS in source.tensors and not _same_tensor(
      tied_head, source.tensors[key_map.EMBED_TOKENS]):
    mismatched.append(f"{tied_head.name}: differs from the token embedding, but config.json ties them "
                      "(tie_word_embeddings=true)")
  unexpected = [ref.name for name, ref in source.tensors.items()
                if name not in expected and ref is not tied_head] + source.duplicates
  if missing or unexpected or mismatched:
    raise WeightsMismatchError(where, missing=missing, unexpected=unexpected, mismatched=mismatched)


def _same_tensor(a: safetensors_reader.TensorRef, b: safetensors_reader.TensorRef) -> bool:
  """Exact equality, compared in row blocks so that neither tensor is held whole."""
  if a.shape != b.shape:
    return False
  step = max(1, _COMPARE_BYTES // max(1, a.nbytes // a.shape[0]))
  return all(np.array_equal(safetensors_reader.read(a, slice(i, i + step)).astype(np.float32),
                            safetensors_reader.read(b, slice(i, i + step)).astype(np.float32))
             for i in range(0, a.shape[0], step))
