"""`benchmarks/random_checkpoint.py`: a checkpoint that `dvl.load` and `dvl.Processor` read, whose image requests
run (its vision merger feeds the decoder: the scratch checkpoint it replaces could only serve text) and whose
scaled lm_head never picks EOS, so every request decodes its whole length; the same seed writes the same params."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import dvl_jax as dvl
from benchmarks import random_checkpoint

VOCAB = 1024
PIXELS = 56 * 56  # 4 image tokens


def write(path, *extra):
  return random_checkpoint.main(["--out", str(path), "--vocab", str(VOCAB), "--small", *extra])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return write(tmp_path_factory.mktemp("random") / "ckpt")


def params(ckpt):
  return jax.tree.leaves(nnx.state(dvl.load(ckpt), nnx.Param))


def test_text_and_image_requests_decode_their_whole_length(ckpt):
  model = dvl.load(ckpt, scan_layers=False)
  cfg = model.config
  assert cfg.text.vocab_size == VOCAB and cfg.vision.out_hidden_size == cfg.text.hidden_size
  processor = dvl.Processor.from_pretrained(ckpt, min_pixels=PIXELS, max_pixels=PIXELS)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8))
  inputs = processor([dvl.generation_prompt("what colour is the shape ?", 0),
                      dvl.generation_prompt("how many squares are there ?", 1)], [[], [image]])
  assert (np.asarray(inputs["input_ids"]) == cfg.image_token_id).sum() == 4
  out = dvl.generate(model, inputs, dvl.SamplingConfig(gen_length=16))
  assert (out.lengths == 16).all() and not (out.tokens == cfg.eos_token_id).any()


def test_the_same_seed_writes_the_same_params_another_seed_others(ckpt, tmp_path):
  same, other = params(write(tmp_path / "same")), params(write(tmp_path / "other", "--seed", "1"))
  for a, b, c in zip(params(ckpt), same, other):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in zip(same, other) if a.size > 1)


def test_an_existing_checkpoint_is_refused_and_a_bad_vocab_named(ckpt, capsys):
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    write(ckpt)
  with pytest.raises(SystemExit):
    random_checkpoint.main(["--out", "unused", "--vocab", "100"])
  assert "--vocab must be 'full' or a number of rows >= 512" in capsys.readouterr().err
