"""One row -> arrays: block-aligned EOS (§4.5), truncation, square padding (§2.1), text-only rows (§4.6)."""

import numpy as np
import pytest
from PIL import Image

from dvl_jax.data.labels import IGNORE
from dvl_jax.data.llava_json import to_record
from dvl_jax.data.samples import SampleEncoder, expand_to_square
from tests.data.helpers import make_processor, noise_image, qa_row

ANSWERS = ["A", "A big", "A big red", "A big red ball", "A big red ball .", "It rolls . It rolls . It rolls ."]


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_block_aligned_eos_lengths(block_size):
  proc = make_processor(block_size=block_size)
  encoder, plain = (SampleEncoder(proc, max_length=256, block_aligned_eos=flag) for flag in (True, False))
  eos = proc.config.eos_token_id
  for answer in ANSWERS:
    record = to_record(qa_row("r", "What is this ?", answer), 0)
    n = len(plain.encode(record).input_ids)
    sample = encoder.encode(record)
    k = (block_size - n % block_size) % block_size
    assert len(sample.input_ids) == n + k and len(sample.input_ids) % block_size == 0
    assert sample.shape.eos_tokens == k
    np.testing.assert_array_equal(sample.input_ids[n:], [eos] * k)
    np.testing.assert_array_equal(sample.labels[n:], [eos] * k)  # supervised (and attended by the batcher)


def test_truncation_happens_before_eos_padding_and_may_cut_an_image():
  proc = make_processor()
  row = {"id": "t", "image": [noise_image(84, 84, 1), noise_image(84, 84, 2)], "conversations": [
      {"from": "human", "value": "<image>\nWhat is this ?"}, {"from": "gpt", "value": "A ball"},
      {"from": "human", "value": "<image>\nTell me more"}, {"from": "gpt", "value": "It rolls"}]}
  record = to_record(row, 0)
  full = SampleEncoder(proc, max_length=256, block_aligned_eos=False).encode(record)
  second = np.flatnonzero(full.input_ids == proc.config.image_token_id)[9]  # first token of image 2
  max_length = (second + 4) // 8 * 8 + 8  # cuts image 2 after a few of its 9 tokens
  sample = SampleEncoder(proc, max_length=max_length).encode(record)
  assert len(sample.input_ids) == max_length
  np.testing.assert_array_equal(sample.input_ids, full.input_ids[:max_length])  # 0 EOS: already aligned
  np.testing.assert_array_equal(sample.shape.used_tokens, [9, max_length - second])
  assert sample.shape == SampleEncoder(proc, max_length=max_length).shape(record)  # predicted from headers


def test_square_padding_colour_and_placement():
  wide = Image.new("RGB", (40, 20), (255, 0, 0))
  out = np.asarray(expand_to_square(wide, (122, 116, 104)))
  assert out.shape == (40, 40, 3)
  assert (out[10:30] == (255, 0, 0)).all()
  assert (out[:10] == (122, 116, 104)).all() and (out[30:] == (122, 116, 104)).all()
  tall = np.asarray(expand_to_square(Image.new("RGB", (21, 40), (0, 255, 0)), (122, 116, 104)))
  assert (tall[:, 9:30] == (0, 255, 0)).all() and (tall[:, :9] == (122, 116, 104)).all()
  assert (tall[:, 30:] == (122, 116, 104)).all()

  proc = make_processor()
  encoder = SampleEncoder(proc, max_length=256)
  assert encoder.background == (122, 116, 104)  # int(255 * CLIP mean), spec §2.1
  image = noise_image(100, 60)
  sample = encoder.encode(to_record(qa_row("s", "What is this ?", "A", image), 0))
  expected, grids = proc.preprocess_images([expand_to_square(image, (122, 116, 104))])
  np.testing.assert_array_equal(sample.pixel_values, expected)
  np.testing.assert_array_equal(sample.shape.grids, grids)
  unpadded = SampleEncoder(proc, max_length=256, square_pad=False).encode(to_record(qa_row("s", "q", "A", image), 0))
  np.testing.assert_array_equal(unpadded.shape.grids, proc.preprocess_images([image])[1])


@pytest.mark.parametrize("square_pad", [True, False])
def test_grids_predicted_from_headers_match_the_image_processor(square_pad, tmp_path):
  proc = make_processor()
  encoder = SampleEncoder(proc, max_length=512, square_pad=square_pad, image_folder=str(tmp_path))
  for i, (w, h) in enumerate([(56, 56), (30, 200), (300, 90), (113, 57), (20, 20)]):
    noise_image(w, h, i).save(tmp_path / f"{i}.png")
    record = to_record(qa_row(str(i), "What is this ?", "A", f"{i}.png"), i)
    sample = encoder.encode(record)
    assert encoder.shape(record) == sample.shape
    assert sample.pixel_values.shape == (sample.shape.patches, proc.config.vision.patch_dim)


def test_text_only_rows_have_no_image_tokens_and_no_pixels():
  proc = make_processor()
  sample = SampleEncoder(proc, max_length=256).encode(to_record(qa_row("t", "What is this ?", "A ball"), 0))
  assert not (sample.input_ids == proc.config.image_token_id).any()
  assert sample.pixel_values.shape == (0, proc.config.vision.patch_dim) and sample.shape.patches == 0
  assert (sample.labels != IGNORE).sum() > 0
