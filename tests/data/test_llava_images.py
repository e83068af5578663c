"""`dvl.Processor` of a DiffusionVL-Qwen checkpoint (the family's image hook, `data.llava_images`): its inputs go
to `dvl.generate` as they are and give what the inputs built by hand (as the model tests build them) give."""

import numpy as np
import pytest

import dvl_jax as dvl
from dvl_jax.checkpoints import saving
from dvl_jax.data import llava_images
from dvl_jax.data.anyres import anyres_layout, image_token_counts
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.data.word_tokenizer import word_tokenizer
from dvl_jax.testing.tiny import tiny_model, tiny_siglip_config
from tests.data.helpers import CORPUS, noise_image

CFG = tiny_siglip_config()
SAMPLING = dvl.SamplingConfig(gen_length=16)
QUESTIONS = ["What is this ?", "Tell me more about it ."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  model = tiny_model(CFG, spread=True)
  ckpt = saving.save(model, str(tmp_path_factory.mktemp("llava_images") / "ckpt"))
  word_tokenizer(CORPUS, CFG).save_pretrained(ckpt)
  return model, ckpt


def by_hand(processor, prompts, image):
  """Ids from the tokenizer's chunks around `<image>` with `image_token_counts` image tokens; crops and layout as
  the model tests make them."""
  rows, sizes, _ = pixel_rows([image], CFG.vision)
  count = int(image_token_counts(sizes.tolist(), CFG.vision)[0])
  ids = []
  for prompt in prompts:
    before, *after = prompt.split("<image>")
    row = processor.tokenizer(before, add_special_tokens=False)["input_ids"]
    if after:
      row += [CFG.image_token_id] * count + processor.tokenizer(after[0], add_special_tokens=False)["input_ids"]
    ids.append(row)
  input_ids = np.zeros((len(ids), max(map(len, ids))), np.int64)
  for i, row in enumerate(ids):
    input_ids[i, :len(row)] = row
  return {"input_ids": input_ids, "lengths": np.array([len(r) for r in ids]), "pixel_values": rows,
          "vision": anyres_layout(sizes.tolist(), CFG.vision)}


def test_processor_inputs_generate_as_the_hand_built_ones(checkpoint):
  model, ckpt = checkpoint
  processor = dvl.Processor.from_pretrained(ckpt)
  image = noise_image(120, 50, seed=3)  # (50, 120): a 2x3 crop grid, unpadded rows, newlines
  prompts = [dvl.generation_prompt(QUESTIONS[0], 1), dvl.generation_prompt(QUESTIONS[1], 0)]
  inputs = processor(prompts, [[image], []])
  want = by_hand(processor, prompts, image)
  np.testing.assert_array_equal(inputs["input_ids"][:, :want["input_ids"].shape[1]], want["input_ids"])
  np.testing.assert_array_equal(inputs["attention_mask"].sum(-1), want["lengths"])
  np.testing.assert_array_equal(inputs["pixel_values"], want["pixel_values"])
  np.testing.assert_array_equal(inputs["image_grid_thw"], [[50, 120]])  # the image's (height, width)
  got, ref = dvl.generate(model, inputs, SAMPLING), dvl.generate(model, want, SAMPLING)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.nfe, ref.nfe)
  assert len(set(got.tokens[0].tolist())) > 3  # a real answer, not one repeated id


def test_pixel_bounds_are_refused(checkpoint):
  with pytest.raises(ValueError, match="min_pixels / max_pixels bound Qwen2.5-VL's image resize"):
    dvl.Processor.from_pretrained(checkpoint[1], max_pixels=512 * 512)


@pytest.mark.parametrize("width, height", [(120, 3), (120, 1), (3, 120)])
def test_images_a_few_pixels_thin_make_the_crops_their_size_asks(width, height):
  """As for Qwen's images (tests/data/test_processor.py): transformers, told nothing, took a 120x3 image for a
  channels-first 3x120 one. The first crop is the whole image resized to a crop (bicubic), scaled to [-1, 1]."""
  from PIL import Image

  from dvl_jax.data.llava_pixels import crops_to_patch_rows

  image = noise_image(width, height, seed=4)
  rows, sizes, crops = pixel_rows([image], CFG.vision)
  assert sizes.tolist() == [[height, width]]
  tokens, n_rows = llava_images.counts(sizes, CFG.vision)  # what `Prompts.bucketed` checks inputs against
  assert tokens.tolist() == image_token_counts(sizes.tolist(), CFG.vision, crops.tolist()).tolist()
  assert n_rows == len(rows)
  size = CFG.vision.image_size
  whole = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255 * 2 - 1  # [size, size, 3]
  want = crops_to_patch_rows(whole.transpose(2, 0, 1)[None], CFG.vision.patch_size)
  np.testing.assert_allclose(rows[:len(want)], want, atol=1e-5)
