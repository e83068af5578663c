"""DiffusionVL-Qwen checkpoints: every layout converts to the same params (transformers' in-memory names,
`save_pretrained`'s llava-hf names, the released DiffusionVL LLaVA names), export round-trips bit for bit,
DiffusionVL's own config.json reads as the 7B preset, the key map covers the full 7B model one-to-one, and
the removed last SigLIP layer is the one DiffusionVL deletes."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import dvl_jax as dvl
from checkpoints_convert import layouts, orbax_stream
from checkpoints_convert.errors import ConversionError
from checkpoints_convert.safetensors_reader import TensorRef
from checkpoints_convert.to_orbax import check_weights
from dvl_jax.core.config import ModelConfig
from dvl_jax.data.anyres import anyres_layout
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.models import key_map
from dvl_jax.models.diffusionvl_qwen.presets import DIFFUSIONVL_QWEN_7B
from dvl_jax.models.families import abstract_model
from dvl_jax.testing.tiny import build_hf_model, converted_checkpoint, tiny_siglip_config
from tests.convert.tiny_layouts import _rename, write_sharded
from tests.models.test_diffusionvl_qwen import images, rows_to_crops

CFG = tiny_siglip_config()

# The released DiffusionVL names (LLaVA's `model.*`) from transformers' in-memory names.
RELEASED = [(r"^model\.vision_tower\.", "model.vision_tower.vision_tower."),
            (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
            (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
            (r"^model\.language_model\.", "model.")]


def diffusionvl_config(cfg: ModelConfig) -> dict:
  """A DiffusionVL-Qwen `config.json` as LLaVA training writes it: a Qwen2 config plus `mm_*` fields."""
  t = cfg.text
  return {"architectures": ["DiffusionVLQwenForCausalLM"], "model_type": "diffusionvl_qwen",
          "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
          "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
          "num_key_value_heads": t.num_kv_heads, "rope_theta": t.rope_theta, "rms_norm_eps": t.rms_norm_eps,
          "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
          "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
          "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152,
          "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad",
          "image_aspect_ratio": "anyres_max_4", "image_grid_pinpoints": "(1x1),...,(6x6)",
          "enable_bd3lm": True, "bd3lm_block_size": 8, "mm_use_im_start_end": False}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("dvlq_ckpt")
  hf, dst = converted_checkpoint(str(root), CFG, seed=5)
  return hf, dst, root


def params(ckpt_dir, **kwargs):
  _, state = nnx.split(dvl.load(ckpt_dir, **kwargs), nnx.Param)
  return {".".join(p): np.asarray(v[...]) for p, v in orbax_stream.variables(state).items()}


def test_released_config_reads_as_the_7b_preset():
  cfg = ModelConfig.from_hf(diffusionvl_config(DIFFUSIONVL_QWEN_7B))
  assert cfg == DIFFUSIONVL_QWEN_7B
  assert cfg.vision.depth == 26 and cfg.vision.grid_pinpoints[:3] == ((1, 1), (2, 1), (3, 1))
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # config.json of a converted model
  bad = {**diffusionvl_config(DIFFUSIONVL_QWEN_7B), "mm_projector_type": "linear"}
  with pytest.raises(ValueError, match="mm_projector_type='linear'"):
    ModelConfig.from_hf(bad)
  with pytest.raises(ValueError, match="vision_feature_layer=-2"):
    ModelConfig.from_hf({**DIFFUSIONVL_QWEN_7B.to_hf(), "vision_feature_layer": -2})


@pytest.mark.parametrize("layout", ["transformers", "diffusionvl"])
def test_every_layout_converts_to_the_same_params(converted, tmp_path, layout):
  hf, dst, _ = converted
  state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
  src = tmp_path / "src"
  os.makedirs(src)
  overrides = {}
  if layout == "diffusionvl":
    state = _rename(state, RELEASED)
    config = diffusionvl_config(CFG)
    overrides = dict(vision=CFG.vision, image_token_id=CFG.image_token_id, mask_token_id=CFG.mask_token_id,
                     pad_token_id=CFG.pad_token_id, block_size=CFG.block_size)
  else:
    config = CFG.to_hf()
  (src / "config.json").write_text(json.dumps(config))
  if layout == "diffusionvl":  # released as shards with an index
    write_sharded(str(src), state, 3)
  else:
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
  out = dvl.convert(str(src), str(tmp_path / "dvl"), progress=False, **overrides)
  assert dvl.load(out).config == CFG
  want, got = params(dst), params(out)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_export_round_trips_bit_for_bit(converted, tmp_path):
  hf, dst, _ = converted
  out = dvl.export(dst, str(tmp_path / "hf"), progress=False)
  back = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
  for (name, a), b in zip(hf.state_dict().items(), back.state_dict().values()):
    assert torch.equal(a, b), name
  again = dvl.convert(out, str(tmp_path / "dvl"), progress=False)
  want, got = params(dst), params(again)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert dvl.load(again).config == CFG


def test_last_siglip_layer_is_removed_as_diffusionvl_does(tmp_path):
  """transformers with one more layer and `vision_feature_layer=-2` = DiffusionVL's `del layers[-1:]`."""
  deeper = CFG.replace(vision=dataclasses.replace(CFG.vision, depth=CFG.vision.depth + 1))
  hf = build_hf_model(deeper, seed=6)
  hf.config.vision_feature_layer = -2
  rows, sizes, _ = pixel_rows(images(["tall", "small"]), CFG.vision)
  with torch.no_grad():
    want = torch.cat(hf.model.get_image_features(rows_to_crops(rows), torch.tensor(sizes),
                                                 vision_aspect_ratio="anyres_max_4")).numpy()
  hf.save_pretrained(str(tmp_path / "full"))
  with pytest.raises(ConversionError, match="vision_feature_layer=-2"):
    dvl.convert(str(tmp_path / "full"), str(tmp_path / "refused"), progress=False)
  del hf.model.vision_tower.vision_model.encoder.layers[-1:]
  hf.config.vision_config.num_hidden_layers, hf.config.vision_feature_layer = CFG.vision.depth, -1
  hf.save_pretrained(str(tmp_path / "cut"))
  model = dvl.load(dvl.convert(str(tmp_path / "cut"), str(tmp_path / "dvl"), progress=False))
  got = np.asarray(model.image_features(rows, anyres_layout(sizes.tolist(), CFG.vision)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["transformers", "diffusionvl"])  # save_pretrained's names: the tiny fixture
def test_key_map_covers_the_7b_model_one_to_one(layout):
  cfg = DIFFUSIONVL_QWEN_7B
  with torch.device("meta"):
    hf = transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(**cfg.to_hf()))
  shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  if layout == "diffusionvl":
    shapes = _rename(shapes, RELEASED)
  source = layouts.from_refs([TensorRef(n, "meta", np.dtype(np.float32), s, 0) for n, s in shapes.items()], "meta",
                             key_map.family_key_map(cfg))
  assert source.layout == layout
  _, state = nnx.split(abstract_model(cfg), nnx.Param)
  variables = orbax_stream.variables(state)
  tensors = key_map.hub_tensors({p: v.shape for p, v in variables.items()}, cfg)
  check_weights("meta", source, tensors, cfg)  # every tensor consumed, none missing or mis-shaped
  assert {t.name for t in tensors} == set(source.tensors) and len(tensors) == len(shapes)
  filled = {}
  for t in tensors:
    filled.setdefault(t.param, set()).add(t.layer)
  for path, var in variables.items():  # every param, and every layer slice of a stacked one, exactly once
    assert filled[path] == (set(range(var.shape[0])) if None not in filled[path] else {None}), path
  assert len(variables[("vision_tower", "layers", "fc1", "kernel")].shape) == 3
  assert variables[("vision_tower", "layers", "fc1", "kernel")].shape[0] == 26
