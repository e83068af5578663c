"""The generator's opt-in long answers ("cells"): fixed width, so that every word's position is known before
decoding (23 tokens with the demo's tokenizer, with the EOS three whole blocks, each cell's words at the same
offsets in every answer), every word in the demo's vocabulary, and drawing them leaves the default splits and the
corpus as they were."""

import re

import numpy as np

from dvl_jax.data import synthetic
from dvl_jax.data.word_tokenizer import word_tokenizer
from dvl_jax.demos.train_demo import VOCAB_SIZE, demo_model_config


def test_cells_answers_have_a_fixed_width_and_fixed_offsets():
  tokenizer = word_tokenizer(synthetic.corpus(), demo_model_config(VOCAB_SIZE))
  cells = synthetic.examples(40, seed=1, kinds=("cells",))
  assert {len(e.items) for e in cells} == {1, 2, 3}  # every scene size, all with the same width
  width = synthetic.CELL_WORDS * len(synthetic.POSITIONS) - 1  # no comma after the last cell
  assert width + 1 == 3 * 8  # with its EOS, three whole blocks of 8
  for e in cells:
    ids = tokenizer(e.answer)["input_ids"]
    assert len(ids) == width and tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == e.answer
    words, held = e.answer.split() + [","], {item.cell: item for item in e.items}
    for cell, place in enumerate(synthetic.POSITIONS):
      at = synthetic.CELL_WORDS * cell
      what = [held[cell].color, held[cell].shape] if cell in held else ["zero", "shapes"]
      assert words[at:at + synthetic.CELL_WORDS] == ["the", *place.split(), *what, ","], (cell, e.answer)


def test_cells_are_opt_in_and_add_no_word():
  assert synthetic.QUESTION_KINDS == ("color", "shape", "position", "count", "describe")
  def words(texts):
    return {w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)}

  question = synthetic.QUESTIONS["cells"]
  answers = [e.answer for e in synthetic.examples(30, seed=2, kinds=("cells",))]
  assert words([question, *answers]) <= words(t for t in synthetic.corpus() if t != question)
  drawn = [synthetic.example(9, i) for i in range(50)]
  assert "cells" not in {e.kind for e in drawn}
  for e, again in zip(drawn, (synthetic.example(9, i, kinds=synthetic.QUESTION_KINDS) for i in range(50))):
    assert (e.question, e.answer, e.items) == (again.question, again.answer, again.items)
    assert np.array_equal(np.asarray(e.image), np.asarray(again.image))
  assert "cells" in {synthetic.example(9, i, kinds=synthetic.ALL_KINDS).kind for i in range(50)}
