"""The key map covers the real 3B / 7B models one-to-one, checked on names and shapes only (no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from checkpoints_convert import layouts, orbax_stream
from dvl_jax.models import key_map
from checkpoints_convert.safetensors_reader import TensorRef
from checkpoints_convert.to_orbax import check_weights
from dvl_jax.core.config import QWEN25_VL_3B, QWEN25_VL_7B
from dvl_jax.models.families import abstract_model


@pytest.mark.parametrize("cfg", [QWEN25_VL_3B, QWEN25_VL_7B], ids=["3b", "7b"])
def test_every_hf_tensor_fills_exactly_one_param_slice(cfg):
  with torch.device("meta"):
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf()))
  hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}  # in-memory layout
  if cfg.text.tie_word_embeddings:  # listed by the module, not saved (3B Hub files have no lm_head)
    assert hf_shapes.pop("lm_head.weight") == hf_shapes["model.language_model.embed_tokens.weight"]

  source = layouts.from_refs(
      [TensorRef(name, "meta", np.dtype(np.float32), shape, 0) for name, shape in hf_shapes.items()], "meta",
      key_map.family_key_map(cfg))
  assert source.layout == "transformers"
  _, state = nnx.split(abstract_model(cfg), nnx.Param)
  params = orbax_stream.variables(state)
  tensors = key_map.hub_tensors({p: v.shape for p, v in params.items()}, cfg)
  check_weights("meta", source, tensors, cfg)  # no missing, unexpected or mis-shaped names

  by_hub = {t.name: t for t in tensors}
  assert set(by_hub) == set(source.tensors) and len(by_hub) == len(tensors)
  assert (("lm_head", "kernel") in params) != cfg.text.tie_word_embeddings
  filled = {}
  for t in tensors:
    assert source.tensors[t.name].shape == t.shape, t.name
    filled.setdefault(t.param, set()).add(t.layer)
  for path, var in params.items():  # every param and every layer slice of it, exactly once
    want = set(range(var.shape[0])) if None not in filled[path] else {None}
    assert filled[path] == want, path
  assert sum(int(np.prod(v.shape)) for v in params.values()) == sum(
      int(np.prod(source.tensors[t.name].shape)) for t in tensors)
