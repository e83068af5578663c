"""DiffusionVL-Qwen's training data through the family's image hook (`data.llava_images`): crops predicted from the
image headers, no square padding, static bucketed batches, and per-shard layouts that splice into every row exactly
the features its images get on their own (stage 1's square crops and stage 2's anyres, an image cut by truncation)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvl_jax.data.anyres import anyres_layout, crops_per_image, image_token_counts
from dvl_jax.data.llava_json import to_record
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.data.samples import SampleEncoder
from dvl_jax.parallel.mesh import make_mesh
from dvl_jax.testing.tiny import tiny_model
from tests.data.helpers import make_llava_processor, noise_image, qa_row

SIZES = [(44, 44), (120, 40), (30, 100), (90, 90), (60, 130), (130, 70), (20, 20), (100, 60)]  # (width, height)
CONFIG = DataConfig(batch_size=8, max_length=128, length_multiple=8, num_buckets=2, num_threads=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava_rows")
  for i, (w, h) in enumerate(SIZES):
    noise_image(w, h, seed=i).save(root / f"{i}.png")
  return root


def _rows(n):
  """Image rows of every size (some with two images) and text-only rows."""
  rows = []
  for i in range(n):
    if i % 5 == 4:
      rows.append(qa_row(f"t{i}", "Tell me more about it .", "It rolls ."))
      continue
    row = qa_row(f"r{i}", "What is this ?", "A big red ball ." if i % 2 else "A ball", f"{i % len(SIZES)}.png")
    if i % 3 == 2:
      row["image"] = [row["image"], f"{(i + 3) % len(SIZES)}.png"]
      row["conversations"][0]["value"] += " <image>"
    rows.append(row)
  return rows


def _own_features(model, processor, images):
  """Each image's tokens as the model computes them for that image alone (crops and layout by hand)."""
  out = []
  for image in images:
    rows, sizes, crops = pixel_rows([image], processor.config.vision)
    out.append(np.asarray(model.image_features(jnp.asarray(rows), anyres_layout(sizes.tolist(), processor.config.vision,
                                                                                 crops.tolist()))))
  return out


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


@pytest.mark.parametrize("stage,shape", [(1, (1, 4, 1)), (2, (1, 4, 1)), (2, (1, 1, 1))],
                         ids=["stage1_4_shards", "stage2_4_shards", "stage2_one_shard"])
def test_batches_splice_each_rows_own_image_features(stage, shape, folder):
  processor = make_llava_processor(stage)
  model = tiny_model(processor.config, spread=True)
  pipeline = DataPipeline(_rows(32), processor, CONFIG, make_mesh(shape, jax.devices()[:int(np.prod(shape))]),
                          image_folder=str(folder))
  shapes = set()
  it = iter(pipeline)
  for planned in pipeline.plan.epoch(0):
    batch = next(it)
    shapes.add(str(jax.tree.map(lambda x: x.shape, batch)))
    if "pixel_values" not in batch:
      continue
    assert batch["pixel_values"].shape[0] == pipeline.num_shards * planned.patches
    features = nnx.jit(lambda m, px, lay: m.image_features(px, lay))(model, batch["pixel_values"], batch["vision"])
    ids = np.asarray(batch["input_ids"])
    slot = 0
    for row, i in zip(ids, planned.rows):
      record = pipeline.index.records[i]
      own = _own_features(model, processor, [_open(r, folder) for r in record.images])
      n = int((row == processor.config.image_token_id).sum())
      want = np.concatenate(own)[:n] if own else np.zeros((0, features.shape[-1]))
      # the tower ran over other crops in other shapes: equal up to fp32 rounding at the features' scale (~40)
      np.testing.assert_allclose(np.asarray(features[slot:slot + n]), want, atol=1e-6 * np.abs(want).max(initial=1))
      slot += n
    assert not np.asarray(features[slot:]).any()  # the static layout's padding splices nothing
  assert len(shapes) == len(pipeline.padding_report()["shapes"])  # one shape per (bucket, pixel budget)


def _open(ref, folder):
  from PIL import Image
  return Image.open(folder / ref).convert("RGB")


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
  features = np.asarray(model.image_features(batch["pixel_values"], batch["vision"]))
  (own,) = _own_features(model, processor, [_open("5.png", folder)])
  for r in range(4):
    np.testing.assert_allclose(features[r * used:(r + 1) * used], own[:used], atol=1e-6 * np.abs(own).max())
