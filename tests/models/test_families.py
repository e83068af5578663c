"""The model-family seam: a second, deliberately different family runs through the same code.

The `qwen2` family is a text-only Qwen2 LM (transformers' `Qwen2ForCausalLM`): no vision tower, 1-D
positions, its own config.json and key map. Converted from a transformers checkpoint and loaded with
`dvl.load`, it goes through `bd3_loss`, `ar_loss`, both samplers and a sharded train step, none of which
know which family they run. References: transformers for the logits, the AR loss and greedy AR decoding;
for block diffusion and the BD3 loss (checked against independent oracles for the Qwen2.5-VL family), a
Qwen2.5-VL model holding the same decoder weights, on text-only inputs.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import dvl_jax as dvl
from dvl_jax.diffusion.loss import ar_loss, bd3_loss
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.parallel.rules import shard_model
from dvl_jax.testing.tiny import converted_checkpoint, tiny_model, tiny_text_config
from dvl_jax.training.optimizer import OptimizerConfig
from dvl_jax.training.state import stage
from dvl_jax.training.step import TrainStep
from tests.data.helpers import make_processor, qa_row
from tests.training.helpers import pipeline

TEXT = tiny_text_config()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("qwen2")
  hf, converted = converted_checkpoint(str(root), TEXT, seed=3)
  return hf, dvl.load(converted), root


def _same_decoder_vlm(text_model):
  """A Qwen2.5-VL model whose decoder and lm_head are the text model's (its vision tower unused)."""
  vlm = tiny_model()
  nnx.update(vlm, nnx.state(text_model))
  return vlm


def _ids(seed, shape):
  return np.random.default_rng(seed).integers(3, 200, shape)


def test_load_picks_the_family_from_the_checkpoint_config(converted):
  _, model, root = converted
  assert json.loads((root / "dvl" / "config.json").read_text())["family"] == "qwen2"
  cfg = model.config
  assert type(model).__name__ == "Qwen2LM" and cfg.family == "qwen2" and cfg.vision is None
  assert cfg.text == dataclasses.replace(TEXT.text, mrope_section=cfg.text.mrope_section)  # 1-D RoPE: unused
  for name in ("mask_token_id", "eos_token_id", "pad_token_id", "block_size", "position_mode"):
    assert getattr(cfg, name) == getattr(TEXT, name), name
  assert set(nnx.state(model)) == {"text", "lm_head"}  # no vision tower at all
  with pytest.raises(ValueError, match="no vision tower"):
    model.image_features(jnp.zeros((4, 1176)), None)
  with pytest.raises(ValueError, match="1-D positions"):
    model(jnp.asarray(_ids(0, (1, 8))), positions="mrope")


def test_logits_match_transformers_on_a_padded_batch(converted):
  hf, model, _ = converted
  ids = _ids(1, (2, 13))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions="flat"))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4)


def test_export_round_trips_into_transformers(converted, tmp_path):
  hf, _, root = converted
  dvl.export(str(root / "dvl"), str(tmp_path / "out"), progress=False)
  back = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  ids = torch.tensor(_ids(2, (1, 9)))
  with torch.no_grad():
    np.testing.assert_array_equal(back(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy())


def _text_batch(seed):
  ids = _ids(seed, (3, 21))
  labels = np.where(np.arange(21) >= 6, ids, -100)
  amask = np.ones_like(ids)
  amask[2, 15:] = 0
  ids[2, 15:] = TEXT.pad_token_id
  labels[2, 15:] = -100
  return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.asarray(amask)}


def test_ar_loss_matches_transformers(converted):
  hf, model, _ = converted
  batch = _text_batch(3)
  with torch.no_grad():
    as_torch = {k: torch.tensor(np.asarray(v, np.int64)) for k, v in batch.items()}
    expected = hf(**as_torch).loss.item()
  loss, _ = ar_loss(model, batch)
  assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected)


def test_bd3_loss_equals_the_vl_family_with_the_same_decoder(converted):
  _, model, _ = converted
  batch = _text_batch(4)
  rng = np.random.default_rng(4)
  t = jnp.asarray(np.repeat(rng.uniform(0.01, 1.0, (3, 3)), 8, axis=1)[:, :21], jnp.float32)
  noise = (t, jnp.asarray(rng.uniform(size=(3, 21)) <= np.asarray(t)))
  loss, metrics = bd3_loss(model, batch, jax.random.key(0), noise=noise)
  want, want_metrics = bd3_loss(_same_decoder_vlm(model), batch, jax.random.key(0), noise=noise)
  assert float(loss) > 0 and float(metrics["masked_fraction"]) > 0
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["masked_fraction"]), float(want_metrics["masked_fraction"]))


@pytest.mark.parametrize("strategy,mode", [("low_confidence_static", "reference"),
                                           ("low_confidence_dynamic", "fused"), ("threshold", "fused")])
def test_block_diffusion_equals_the_vl_family_with_the_same_decoder(converted, strategy, mode):
  _, model, _ = converted
  prompts = Prompts.from_lists([list(_ids(5, 11)), list(_ids(6, 4))], pad_id=TEXT.pad_token_id)
  config = SamplingConfig(gen_length=20, remasking_strategy=strategy, confidence_threshold=0.3, mode=mode)
  out = dvl.generate(model, prompts, config)
  want = dvl.generate(_same_decoder_vlm(model), prompts, config)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(out.nfe), np.asarray(want.nfe))
  assert len(set(np.asarray(out.tokens).ravel().tolist())) > 3  # a real answer, not one repeated id


def test_ar_decoding_matches_transformers_greedy_generate(converted):
  hf, model, _ = converted
  rows = [list(_ids(7, 10)), list(_ids(8, 5))]
  out = dvl.generate(model, Prompts.from_lists(rows, pad_id=TEXT.pad_token_id),
                     SamplingConfig(gen_length=12, algorithm="autoregressive"))
  for row, tokens in zip(rows, np.asarray(out.tokens)):
    with torch.no_grad():
      want = hf.generate(torch.tensor([row]), max_new_tokens=12, do_sample=False, eos_token_id=TEXT.eos_token_id,
                         pad_token_id=TEXT.pad_token_id)[0, len(row):].numpy()
    np.testing.assert_array_equal(tokens[:len(want)], want)


def test_sharded_train_step_equals_the_single_device_step():
  proc = make_processor()
  words = ["red ball", "blue square", "it rolls", "a big red ball", "tell me more"]
  rows = [qa_row(f"t{i}", f"What is this ? {words[i % 5]}", words[(i + 2) % 5]) for i in range(16)]
  cfg = proc.config.replace(family="qwen2", vision=None)
  opt = OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, eps=1e-16)

  def run(mesh):
    model = tiny_model(cfg)
    model = model if mesh is None else shard_model(model, mesh)
    trainer = TrainStep(model, stage("stage2"), opt, total_steps=4, mesh=mesh)
    state = trainer.init(model)
    batch = next(iter(pipeline(rows, mesh)))
    assert "pixel_values" not in batch
    state, metrics = trainer(state, batch, jax.random.key(0))
    return jax.device_get(state.params), jax.device_get(metrics)

  single, m1 = run(None)
  sharded, m8 = run(make_mesh((2, 2, 2)))
  assert m1["finite"] == 1 and m1["loss"] > 0
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), single, sharded)
  with pytest.raises(ValueError, match="no parameter to train"):  # stage 1 trains the projector: there is none
    TrainStep(tiny_model(cfg), stage("stage1"), opt, total_steps=4)
