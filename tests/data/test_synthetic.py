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


def test_answers_are_read_back_from_the_pixels():
  """Each answer equals what the image shows: the colour, the shape (from how much of its bounding box it
  fills), the occupied cells and their number, and the descriptions made of those (the opt-in "cells" kind
  too)."""
  examples = synthetic.examples(200, seed=0)
  assert set(collections.Counter(e.kind for e in examples)) == set(synthetic.QUESTION_KINDS)
  for e in examples + synthetic.examples(40, seed=0, kinds=("cells",)):
    pixels = np.asarray(e.image)
    cells = [pixels[28 * row:28 * (row + 1), 28 * col:28 * (col + 1)] for row in range(2) for col in range(2)]
    for cell, grey in zip(cells, synthetic.CELL_GREYS):  # every cell shows its own grey
      assert (cell == grey).all(-1).sum() > 20
    colored = {name: [int((c == rgb).all(-1).sum()) for c in cells] for name, rgb in synthetic.COLORS.items()}
    (color, per_cell), = [(k, v) for k, v in colored.items() if sum(v)]  # one colour per scene
    occupied = [i for i, count in enumerate(per_cell) if count > 20]
    ys, xs = np.nonzero((cells[occupied[0]] == synthetic.COLORS[color]).all(-1))
    fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # of the bounding box: 1, pi / 4, 1 / 2
    shape = min(zip((1.0, np.pi / 4, 0.5), ("square", "circle", "triangle")), key=lambda f: abs(f[0] - fill))[1]
    count = synthetic.NUMBERS[len(occupied)]
    truth = {"color": color, "count": count, "shape": shape,
             "position": synthetic.POSITIONS[occupied[0]] if len(occupied) == 1 else None,
             "describe": f"{count} {color} {shape}" + ("s" if len(occupied) > 1 else ""),
             "cells": " , ".join(f"the {place} {color} {shape}" if i in occupied else f"the {place} zero shapes"
                                 for i, place in enumerate(synthetic.POSITIONS))}
    assert e.answer == truth[e.kind], (e.question, e.answer, truth)


def test_written_data_set_loads_through_the_pipeline(tmp_path):
  path = synthetic.write_dataset(str(tmp_path), 40, seed=1)
  pipeline = DataPipeline.from_json(path, make_processor(), DataConfig(batch_size=8, max_length=128, num_threads=0),
                                    make_mesh(), image_folder=str(tmp_path))
  assert pipeline.bad_rows.total == 0 and len(pipeline.index) == 40
  batch = next(iter(pipeline))
  assert batch["pixel_values"].shape == (8 * 16, 1176)  # 56x56 -> 4x4 patches per image, one image per shard
  assert not any(t == "[UNK]" for t in make_processor().tokenizer.convert_ids_to_tokens(
      np.asarray(batch["input_ids"]).ravel().tolist()))  # the corpus covers every generated word
