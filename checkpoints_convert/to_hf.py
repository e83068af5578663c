"""`export`: a converted (Orbax) checkpoint -> Hugging Face Qwen2.5-VL Hub-layout safetensors, streaming.

Each Hub tensor is read from its param's TensorStore array (one layer slice of a stacked param at a
time) and appended to the output file, so the host holds one tensor at a time.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tqdm.auto import tqdm

from checkpoints_convert import orbax_stream
from dvl_jax.models import key_map
from checkpoints_convert.errors import ConversionError, NotACheckpointError, WeightsMismatchError
from checkpoints_convert.output_dir import atomic_output, copy_side_files
from checkpoints_convert.safetensors_writer import PlannedTensor, write_checkpoint
from checkpoints_convert.to_orbax import HF_CONFIG_COPY, cast, float_dtype
from dvl_jax.core.config import ModelConfig
from dvl_jax.checkpoints.loading import CONFIG_FILE, PARAMS_DIR
from dvl_jax.models.layer_layout import stored_params

DEFAULT_MAX_SHARD_BYTES = 2 << 30


def export(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, dtype: str | None = None,
           progress: bool = True, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
  """Writes `dst_dir` that `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads.

  `dtype` casts the weights (default: the stored dtype); tokenizer and processor files are copied;
  `lm_head.weight` is written only for untied embeddings. Returns `dst_dir`.
  """
  src_dir, dst_dir = os.path.abspath(src_dir), os.fspath(dst_dir)  # Orbax refuses relative paths
  config_path, params_dir = os.path.join(src_dir, CONFIG_FILE), os.path.join(src_dir, PARAMS_DIR)
  if not (os.path.isfile(config_path) and os.path.isdir(params_dir)):
    raise NotACheckpointError(f"{src_dir} is not a converted checkpoint: it needs {CONFIG_FILE} and "
                              f"{PARAMS_DIR}/ (dvl.convert output)")
  with atomic_output(dst_dir, overwrite=overwrite, inputs=(src_dir,)) as tmp:
    try:
      cfg = ModelConfig.load(config_path)
    except (ValueError, TypeError) as e:
      raise ConversionError(f"{config_path}: not a dvl_jax ModelConfig ({e})") from None
    out_dtype = float_dtype(dtype or cfg.param_dtype)
    state = stored_params(cfg)
    arrays = orbax_stream.open_arrays(params_dir, state)
    if arrays.missing or arrays.unexpected or arrays.mismatched:
      raise WeightsMismatchError(src_dir, missing=arrays.missing, unexpected=arrays.unexpected,
                                 mismatched=arrays.mismatched)
    shapes = {p: v.shape for p, v in orbax_stream.variables(state).items()}
    tensors = key_map.hub_tensors(shapes, cfg)
    with tqdm(total=len(tensors), desc="export", unit="tensor", disable=not progress) as bar:

      def planned(t: key_map.HubTensor) -> PlannedTensor:
        def produce() -> np.ndarray:
          x = cast(t.transform.to_torch(arrays.read(t.param, t.layer), t.shape), out_dtype, t.name)
          bar.update(1)
          return x

        return PlannedTensor(t.name, out_dtype, t.shape, produce)

      write_checkpoint(tmp, [planned(t) for t in tensors], max_shard_bytes)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(cfg.replace(param_dtype=out_dtype.name).to_hf(), f, indent=2)
    copy_side_files(src_dir, tmp, skip=(CONFIG_FILE, HF_CONFIG_COPY))
  return dst_dir
