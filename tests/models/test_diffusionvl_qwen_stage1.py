"""The stage-1 start of DiffusionVL-Qwen (spec §7.2) from a Qwen2 LM and a full SigLIP checkpoint: the LM and the
tower (minus its last layer, head and text half) come through unchanged, the projector and `image_newline` are
new, images are square and flat, and stage 1 trains the projector alone."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

import dvl_jax as dvl
from checkpoints_convert.errors import ConversionError, NotACheckpointError, WeightsMismatchError
from checkpoints_convert.from_lm import convert_from_lm
from checkpoints_convert.mm_projector import export_mm_projector
from dvl_jax.data.anyres import anyres_layout
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.models.diffusionvl_qwen.vision_config import GRID_1_TO_6
from dvl_jax.testing.tiny import save_hf_checkpoint, tiny_siglip_config, tiny_text_config
from dvl_jax.training.optimizer import OptimizerConfig
from dvl_jax.training.state import stage
from dvl_jax.training.step import TrainStep
from tests.models.test_diffusionvl_qwen import images, rows_to_crops

CFG = tiny_siglip_config()
V = CFG.vision
IDS = dict(mask_token_id=CFG.mask_token_id, image_token_id=CFG.image_token_id)


def _siglip(path, depth):
  torch.manual_seed(0)
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2),
      vision_config=dict(hidden_size=V.hidden_size, intermediate_size=V.intermediate_size, num_hidden_layers=depth,
                         num_attention_heads=V.num_heads, image_size=V.image_size, patch_size=V.patch_size))
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))  # away from the init's zeros and ones
  model.save_pretrained(str(path))
  return model


@pytest.fixture(scope="module")
def start(tmp_path_factory):
  root = tmp_path_factory.mktemp("stage1")
  lm = save_hf_checkpoint(str(root / "lm"), tiny_text_config(), seed=1)
  siglip = _siglip(root / "siglip", V.depth + 1)
  dst = convert_from_lm(root / "lm", root / "siglip", root / "dvl", seed=4, progress=False, **IDS)
  return lm, siglip, dvl.load(dst), root


def test_the_start_is_stage_1s_model(start):
  _, _, model, _ = start
  cfg = model.config
  assert cfg.family == "diffusionvl_qwen" and cfg.text == CFG.text and cfg.position_mode == "flat"
  assert (cfg.vision.depth, cfg.vision.image_aspect_ratio, cfg.vision.patch_merge_type) == (V.depth, "square", "flat")
  new = type(model).new_connector(cfg, 4)
  got = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path, x in new.items():
    np.testing.assert_array_equal(got[path], x, err_msg=str(path))
  bound = 1 / np.sqrt(V.hidden_size)  # nn.Linear's default draw
  assert 0.5 * bound < np.abs(got[("projector", "linear_1", "kernel")]).max() <= bound
  assert not np.array_equal(new[("image_newline",)], type(model).new_connector(cfg, 5)[("image_newline",)])


@nnx.jit
def _outputs(model, ids, rows, layout):
  """Logits of `ids`, the tower's output, the packed and the unpacked features of `rows` (one compile)."""
  return model(ids), model.vision_tower(rows), model.image_features(rows, layout), model.crop_features(rows)


def test_lm_and_tower_come_through_unchanged(start):
  lm, siglip, model, _ = start
  ids = np.random.default_rng(0).integers(3, 200, (1, 9))
  rows, sizes, crops = pixel_rows(images(["wide", "tall"]), model.config.vision)
  assert crops.tolist() == [1, 1]
  logits, tower, flat, unpacked = (np.asarray(x) for x in _outputs(
      model, jnp.asarray(ids), jnp.asarray(rows), anyres_layout(sizes.tolist(), model.config.vision)))
  with torch.no_grad():
    np.testing.assert_allclose(logits, lm(input_ids=torch.tensor(ids)).logits.numpy(), atol=1e-4, rtol=0)
    # the full tower's second-to-last hidden state: its last layer is gone
    hidden = siglip.vision_model(rows_to_crops(rows), output_hidden_states=True).hidden_states[-2].numpy()
  scale = np.abs(hidden).max()  # ~10 with these weights: compare at fp32's relative precision
  np.testing.assert_allclose(tower, hidden, atol=1e-5 * scale, rtol=0)
  np.testing.assert_array_equal(flat, unpacked)  # square + flat: no newline, no packing


def test_bad_sources_fail_with_one_complete_error(start, tmp_path):
  _, _, _, root = start
  with pytest.raises(ConversionError, match="expected a Qwen2 / Qwen2.5 LM"):
    convert_from_lm(root / "siglip", root / "siglip", tmp_path / "a", progress=False, **IDS)
  broken = tmp_path / "broken"
  shutil.copytree(root / "siglip", broken)
  tensors = load_file(str(broken / "model.safetensors"))
  gone = ["vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.post_layernorm.bias"]
  save_file({k: v for k, v in tensors.items() if k not in gone}, str(broken / "model.safetensors"),
            metadata={"format": "pt"})
  with pytest.raises(WeightsMismatchError) as err:
    convert_from_lm(root / "lm", broken, tmp_path / "b", progress=False, **IDS)
  assert all(f"model.vision_tower.{name}" in str(err.value) for name in gone)  # every problem, one error
  assert not (tmp_path / "b").exists()


def test_stage_1_trains_the_projector_alone(start):
  _, _, model, _ = start
  trainer = TrainStep(model, stage("stage1"), OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0), total_steps=2)
  state = trainer.init(model)
  trained = {tuple(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
  assert trained and all(p[0] == "projector" for p in trained)
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
  assert sorted(moments) == sorted(2 * [x.shape for x in jax.tree.leaves(state.params)])  # Adam's mu and nu only
  assert sum(x.size for x in jax.tree.leaves(state.frozen)) > 10 * sum(x.size for x in jax.tree.leaves(state.params))


def test_stage_2_starts_from_stage_1s_mm_projector_bin(start, tmp_path):
  """DiffusionVL's stage 2: the LM, the tower, `pretrain_mm_mlp_adapter` and a new `image_newline`; anyres."""
  _, siglip, _, root = start
  torch.manual_seed(1)
  mlp = torch.nn.Sequential(torch.nn.Linear(V.hidden_size, CFG.text.hidden_size), torch.nn.GELU(),
                            torch.nn.Linear(CFG.text.hidden_size, CFG.text.hidden_size))
  torch.save({f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mm_projector.bin")
  dst = convert_from_lm(root / "lm", root / "siglip", tmp_path / "dvl", projector=tmp_path / "mm_projector.bin",
                        stage=2, seed=4, progress=False, **IDS)
  model = dvl.load(dst)
  assert model.config == CFG.replace(vision=dataclasses.replace(V, grid_pinpoints=GRID_1_TO_6))  # anyres_max_4
  rows, _, _ = pixel_rows(images(["small"]), V)
  with torch.no_grad():
    want = mlp(siglip.vision_model(rows_to_crops(rows), output_hidden_states=True).hidden_states[-2]).numpy()
  got = np.asarray(model.crop_features(jnp.asarray(rows))).reshape(want.shape)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
  np.testing.assert_array_equal(np.asarray(model.image_newline[...]),
                                type(model).new_connector(model.config, 4)[("image_newline",)])
  torch.save({"model.mm_projector.0.weight": mlp[0].weight}, tmp_path / "partial.bin")
  with pytest.raises(WeightsMismatchError, match="mm_projector"):
    convert_from_lm(root / "lm", root / "siglip", tmp_path / "x", projector=tmp_path / "partial.bin", stage=2,
                    progress=False, **IDS)


def test_mm_projector_bin_round_trips(start, tmp_path):
  """Stage 1's projector written as DiffusionVL's mm_projector.bin reads back into a stage-2 start unchanged."""
  _, _, model, root = start
  path = export_mm_projector(root / "dvl", tmp_path / "mm_projector.bin")
  state = torch.load(path, weights_only=True)
  assert sorted(state) == [f"model.mm_projector.{i}.{k}" for i in (0, 2) for k in ("bias", "weight")]
  got = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model.projector, nnx.Param))}
  np.testing.assert_array_equal(state["model.mm_projector.2.weight"].numpy(), got[("linear_2", "kernel")].T)
  stage2 = dvl.load(convert_from_lm(root / "lm", root / "siglip", tmp_path / "s2", projector=path, stage=2, seed=9,
                                    progress=False, **IDS))
  for p, v in nnx.to_flat_state(nnx.state(stage2.projector, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(v[...]), got[p], err_msg=str(p))
  with pytest.raises(NotACheckpointError, match="not a converted checkpoint"):
    export_mm_projector(root / "lm", tmp_path / "none.bin")


def test_param_groups_follow_diffusionvl_stage_2(start):
  """`vision_tower` at its own lr (every name with "vision_tower"), the projector, `image_newline` with the LM."""
  _, _, model, _ = start
  groups = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    groups.setdefault(model.param_group(tuple(str(p) for p in path)), set()).add(str(path[0]))
  assert groups == {"vision": {"vision_tower"}, "projector": {"projector"},
                    "language": {"image_newline", "text", "lm_head"}}
