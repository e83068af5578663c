"""The generator's opt-in long answers ("cells"): 16 or more tokens with the demo's tokenizer, every word in its
vocabulary, and drawing them leaves the default splits and the corpus as they were."""

import re

import numpy as np

from dvl_jax.data import synthetic
from dvl_jax.data.word_tokenizer import word_tokenizer
from dvl_jax.demos.train_demo import VOCAB_SIZE, demo_model_config


def test_cells_answers_are_long_and_in_the_demo_vocabulary():
  tokenizer = word_tokenizer(synthetic.corpus(), demo_model_config(VOCAB_SIZE))
  cells = synthetic.examples(30, seed=1, kinds=("cells",))
  lengths = {len(e.items): len(tokenizer(e.answer)["input_ids"]) for e in cells}
  assert lengths == {1: 17, 2: 18, 3: 19}  # 4 cells x (2 position words + "zero shapes" | "one COLOR SHAPE")
  for e in cells:
    ids = tokenizer(e.question + " " + e.answer)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(tokenizer(e.answer)["input_ids"]) == e.answer


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
