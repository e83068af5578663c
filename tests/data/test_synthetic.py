"""Synthetic shapes VQA: deterministic from the seed, answers true to the image, loads through the pipeline."""

import collections

import numpy as np

from dvl_jax.data import synthetic
from dvl_jax.data.pipeline import DataConfig, DataPipeline
from dvl_jax.parallel.mesh import make_mesh
from tests.data.helpers import make_processor


def _same(a, b):
  return (a.question, a.answer, a.items) == (b.question, b.answer, b.items) and \
      np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_examples_are_a_function_of_seed_and_index():
  first = synthetic.examples(12, seed=5)
  assert all(_same(a, b) for a, b in zip(first, synthetic.examples(12, seed=5)))
  assert _same(first[7], synthetic.example(5, 7))
  other = synthetic.examples(12, seed=6)
  assert sum(_same(a, b) for a, b in zip(first, other)) < 3


def test_answers_are_true_to_the_scene_and_visible_in_the_image():
  examples = synthetic.examples(200, seed=0)
  assert set(collections.Counter(e.kind for e in examples)) == set(synthetic.QUESTION_KINDS)
  for e in examples:
    pixels = np.asarray(e.image)
    for item in e.items:  # each item's colour is drawn in its own cell
      row, col = divmod(item.cell, 2)
      cell = pixels[28 * row:28 * (row + 1), 28 * col:28 * (col + 1)]
      assert (cell == synthetic.COLORS[item.color]).all(-1).sum() > 20
    if e.kind == "color":
      assert e.answer == next(it.color for it in e.items if f" {it.shape}?" in e.question)
    elif e.kind == "shape":
      assert e.answer == next(it.shape for it in e.items if f" {it.color} " in e.question)
    elif e.kind == "position":
      assert e.answer == synthetic.POSITIONS[next(it.cell for it in e.items if f"{it.color} {it.shape}?" in e.question)]
    elif e.question == "How many shapes are there?":
      assert e.answer == synthetic.NUMBERS[len(e.items)]


def test_written_data_set_loads_through_the_pipeline(tmp_path):
  path = synthetic.write_dataset(str(tmp_path), 40, seed=1)
  pipeline = DataPipeline.from_json(path, make_processor(), DataConfig(batch_size=8, max_length=128, num_threads=0),
                                    make_mesh(), image_folder=str(tmp_path))
  assert pipeline.bad_rows.total == 0 and len(pipeline.index) == 40
  batch = next(iter(pipeline))
  assert batch["pixel_values"].shape == (8 * 16, 1176)  # 56x56 -> 4x4 patches per image, one image per shard
  assert not any(t == "[UNK]" for t in make_processor().tokenizer.convert_ids_to_tokens(
      np.asarray(batch["input_ids"]).ravel().tolist()))  # the corpus covers every generated word
