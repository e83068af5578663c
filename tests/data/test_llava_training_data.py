"""DiffusionVL-Qwen's training data through the family's image hook (`data.llava_images`): crops predicted from the
image headers, no square padding, static bucketed batches, and per-shard layouts that splice into every row exactly
the features its images get on their own (stage 1's square crops and stage 2's anyres, an image cut by truncation)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dvl_jax.data.anyres import anyres_layout, crops_per_image, image_token_counts
from dvl_jax.data.llava_json import to_record
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.data.samples import SampleEncoder
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.testing.tiny import tiny_model
from tests.data.helpers import LLAVA_SIZES as SIZES, llava_rows, make_llava_processor, qa_row, write_llava_dataset

CONFIG = DataConfig(batch_size=8, max_length=128, length_multiple=8, num_buckets=2, num_threads=0)
# The tower runs over other crops in other batch shapes, so its sums run in another order: the features agree up to
# fp32 rounding at their scale (~40), the tower's own parity tolerance (1e-5, tests/models/test_vision.py) scaled.
# 1e-6 of the scale was tighter than that and failed once in CI (6.7e-5 apart at a scale of 60).
FP32_AT_SCALE = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava_rows")
  write_llava_dataset(str(root), 0)
  return root


@nnx.jit
def _features(model, pixel_values, layout):
  return model.image_features(pixel_values, layout)


def _own_features(model, processor, folder):
  """Image `i.png`'s tokens as the model computes them for the images alone (crops and layout by hand), by name."""
  vision = processor.config.vision
  images = [Image.open(folder / f"{i}.png").convert("RGB") for i in range(len(SIZES))]
  rows, sizes, crops = pixel_rows(images, vision)
  features = np.asarray(_features(model, jnp.asarray(rows), anyres_layout(sizes.tolist(), vision, crops.tolist())))
  ends = np.cumsum(image_token_counts(sizes.tolist(), vision, crops.tolist()))
  return {f"{i}.png": f for i, f in enumerate(np.split(features, ends[:-1]))}


@pytest.mark.parametrize("stage", [1, 2])
def test_image_shapes_from_headers_match_the_processor_without_square_padding(stage, folder):
  processor = make_llava_processor(stage)
  vision = processor.config.vision
  encoder = SampleEncoder(processor, max_length=512, image_folder=str(folder))
  assert not encoder.square_pad  # DiffusionVL-Qwen resizes (stage 1) or crops (stage 2), it never pads to a square
  crops = []
  for i, (w, h) in enumerate(SIZES):
    record = to_record(qa_row(str(i), "What is this ?", "A", f"{i}.png"), i)
    sample = encoder.encode(record)
    assert encoder.shape(record) == sample.shape
    assert sample.shape.grids == ((h, w),)
    crops.append(crops_per_image((h, w), vision))
    assert sample.pixel_values.shape == (crops[-1] * vision.tokens_per_crop, vision.patch_dim)
    tokens = (sample.input_ids == processor.config.image_token_id).sum()
    assert tokens == image_token_counts([(h, w)], vision)[0] == sample.shape.used_tokens[0]
  # stage 1: one square crop of 9 patches, no newline; stage 2: the global view + the aspect's best-fit grid
  assert set(crops) == {1} if stage == 1 else len(set(crops)) > 2


@pytest.mark.parametrize("stage", [1, 2])
def test_batches_splice_each_rows_own_image_features(stage, folder):
  """Over 4 batch shards, each a chunk of crops of its own rows."""
  processor = make_llava_processor(stage)
  model = tiny_model(processor.config, spread=True)
  own = _own_features(model, processor, folder)
  pipeline = DataPipeline(llava_rows(32), processor, CONFIG, make_mesh((1, 4, 1), jax.devices()[:4]),
                          image_folder=str(folder))
  shapes = set()
  it = iter(pipeline)
  for planned in pipeline.plan.epoch(0):
    batch = next(it)
    shapes.add(str(jax.tree.map(lambda x: x.shape, batch)))
    if "pixel_values" not in batch:
      continue
    assert batch["pixel_values"].shape[0] == pipeline.num_shards * planned.patches
    features = _features(model, batch["pixel_values"], batch["vision"])
    ids = np.asarray(batch["input_ids"])
    slot = 0
    for row, i in zip(ids, planned.rows):
      record = pipeline.index.records[i]
      n = int((row == processor.config.image_token_id).sum())
      want = np.concatenate([own[ref] for ref in record.images] or [np.zeros((0, features.shape[-1]))])[:n]
      np.testing.assert_allclose(np.asarray(features[slot:slot + n]), want,
                                 atol=FP32_AT_SCALE * np.abs(want).max(initial=1))
      slot += n
    assert not np.asarray(features[slot:]).any()  # the static layout's padding splices nothing
  assert len(shapes) == len(pipeline.padding_report()["shapes"])  # one shape per (bucket, pixel budget)


def test_truncation_cuts_an_image_and_the_layout_keeps_its_first_tokens(folder):
  processor = make_llava_processor(2)
  model = tiny_model(processor.config, spread=True)
  rows = [qa_row(f"r{i}", "What is this ?", "A ball", "5.png") for i in range(4)]
  config = dataclasses.replace(CONFIG, batch_size=4, max_length=24, shuffle=False)
  pipeline = DataPipeline(rows, processor, config, make_mesh((1, 2, 1), jax.devices()[:2]), image_folder=str(folder))
  total = int(image_token_counts([SIZES[5][::-1]], processor.config.vision)[0])
  used = pipeline.index.shapes[0].used_tokens[0]
  assert 0 < used < total  # the image is cut
  batch = next(iter(pipeline))
  features = np.asarray(_features(model, batch["pixel_values"], batch["vision"]))
  own = _own_features(model, processor, folder)["5.png"]
  for r in range(4):
    np.testing.assert_allclose(features[r * used:(r + 1) * used], own[:used], atol=FP32_AT_SCALE * np.abs(own).max())
