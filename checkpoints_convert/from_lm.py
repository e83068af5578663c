"""`convert_from_lm`: the start of DiffusionVL-Qwen's training stages from two checkpoints, streaming (spec §7.2).

A Qwen2 / Qwen2.5 LM (`--lm`) and a SigLIP checkpoint (`--vision`, full SigLIP or its vision model) become one
`diffusionvl_qwen` checkpoint: the LM's and the tower's tensors are streamed as `convert` streams them; the
tower's last layer, its pooling head and a full SigLIP's text half are not read (DiffusionVL deletes them);
the `mlp2x_gelu` projector (or stage 1's `mm_projector.bin`) and `image_newline` are drawn new as LLaVA does.
The config is the stage's: 1 square images, no newlines; 2 anyres_max_4 with newlines. Every missing or
mis-shaped tensor is reported at once.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from checkpoints_convert import layouts, orbax_stream, safetensors_reader
from checkpoints_convert.errors import ConversionError, NotACheckpointError
from checkpoints_convert.mm_projector import read_mm_projector
from checkpoints_convert.output_dir import atomic_output, copy_side_files
from checkpoints_convert.to_orbax import _reader, check_weights, float_dtype
from dvl_jax.checkpoints.loading import CONFIG_FILE, PARAMS_DIR
from dvl_jax.models import families, key_map
from dvl_jax.models.layer_layout import stored_params

FAMILY = "diffusionvl_qwen"


def _config(path: str, what: str) -> dict[str, Any]:
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise NotACheckpointError(f"{what} {path} is not a checkpoint: it has no {CONFIG_FILE}")
  with open(config_path) as f:
    return json.load(f)


def _source(path: str, layout: key_map.Layout, unused: tuple[str, ...]) -> layouts.Source:
  refs = [ref for file in safetensors_reader.weight_files(path)
          for ref in safetensors_reader.read_header(file).values() if not ref.name.startswith(unused)]
  one_layout = types.SimpleNamespace(LAYOUTS=(layout,), SIDE_FILES={}, SIDE_FILES_LAYOUT="")
  return layouts.from_refs(refs, path, one_layout)


def convert_from_lm(lm_dir: str | os.PathLike, vision_dir: str | os.PathLike, dst_dir: str | os.PathLike, *,
                    projector: str | os.PathLike | None = None, stage: int = 1, dtype: str | None = None,
                    seed: int = 0, progress: bool = True, overwrite: bool = False, **config_overrides: Any) -> str:
  """Writes `dst_dir`, a converted DiffusionVL-Qwen model that starts `stage` (the LM's tokenizer files copied).

  Stage 1 draws the projector; stage 2 takes stage 1's `projector` (an `mm_projector.bin`, DiffusionVL's
  `pretrain_mm_mlp_adapter`) when given. `seed` draws what is new; `config_overrides` set `ModelConfig` fields
  the two configs do not carry (e.g. `mask_token_id`, `image_token_id`). Returns `dst_dir`.
  """
  lm_dir, vision_dir, dst_dir = os.fspath(lm_dir), os.fspath(vision_dir), os.fspath(dst_dir)
  family = families.get(FAMILY)
  lm_hf, vision_hf = _config(lm_dir, "--lm"), _config(vision_dir, "--vision")
  with atomic_output(dst_dir, overwrite=overwrite, inputs=(lm_dir, vision_dir)) as tmp:
    try:
      cfg = family.hf_config.start_config(lm_hf, vision_hf, stage, **config_overrides)
    except (ValueError, KeyError, TypeError) as e:
      detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
      raise ConversionError(f"{lm_dir} + {vision_dir}: no DiffusionVL-Qwen config from these ({detail})") from None
    if dtype is not None:
      cfg = cfg.replace(param_dtype=float_dtype(dtype).name)
    km = family.key_map
    state = stored_params(cfg)
    params = orbax_stream.variables(state)
    new = family.model_type.new_connector(cfg, seed)
    if projector is not None:
      new.update(read_mm_projector(os.fspath(projector), {p: v.shape for p, v in params.items()}, cfg))
    tensors = key_map.hub_tensors({p: v.shape for p, v in params.items() if p not in new}, cfg)
    lm = _source(lm_dir, km.STAGE1_LM, ())
    tower = _source(vision_dir, km.STAGE1_VISION, km.STAGE1_UNUSED + (km.stage1_removed_layer(cfg.vision.depth),))
    source = layouts.Source(f"{lm.layout} + {tower.layout}", {**lm.tensors, **tower.tensors},
                            lm.duplicates + tower.duplicates + sorted(set(lm.tensors) & set(tower.tensors)))
    check_weights(f"{lm_dir} + {vision_dir}", source, tensors, cfg)
    with tqdm(total=len(tensors), desc="convert", unit="tensor", disable=not progress) as bar:

      def streamed(path: key_map.ParamPath, var: nnx.Variable) -> nnx.Variable:
        param_dtype = np.dtype(var.dtype)
        if path in new:
          blocks = [lambda x=new[path]: x.astype(param_dtype)]
        else:
          blocks = [_reader(source.tensors[t.name], t, param_dtype, bar) for t in tensors if t.param == path]
        return var.replace(orbax_stream.StreamedArray(tuple(var.shape), param_dtype, blocks))

      tree = jax.tree_util.tree_map_with_path(lambda p, v: streamed(orbax_stream.path_keys(p), v), state,
                                              is_leaf=lambda x: isinstance(x, nnx.Variable))
      copy_side_files(lm_dir, tmp, skip=(CONFIG_FILE,))
      cfg.save(os.path.join(tmp, CONFIG_FILE))
      orbax_stream.save(os.path.join(tmp, PARAMS_DIR), tree)
  return dst_dir
