"""AI2D: the prompt, lmms-eval's leading-letter filter and exact match (case and punctuation ignored), the loader."""

import os

import pytest

from dvl_jax.evaluation import ai2d
from dvl_jax.evaluation.task import Sample
from tests.evaluation.fixtures import image_cell, write_parquet

SAMPLE = Sample("0", "Which part takes in water?", (), ("B",), ("stem", "root", "leaf"))


def test_prompt():
  assert ai2d.prompt(SAMPLE) == ("Which part takes in water?\nA. stem\nB. root\nC. leaf\n"
                                 "Answer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("answer, right", [
    ("B", True),
    ("b", True),                 # case ignored
    ("B. root", True),           # a leading "X." is the letter
    ("(B)", True), ("B)", True),  # punctuation ignored: both read "b"
    ("A. B", False),             # the leading letter is A
    ("The answer is B", False),  # compared whole: "the answer is b" != "b"
    ("root", False),             # option texts are not matched
    ("", False),
])
def test_scoring(answer, right):
  assert ai2d.judge(SAMPLE, answer).score == float(right)


def test_score_applies_the_clean_up_first():
  assert ai2d.TASK.score(SAMPLE, "B.\nThe root absorbs water.") == ("B", 1.0)  # "B." -> "B"


def test_loader_maps_the_answer_index_to_a_letter(tmp_path):
  rows = [{"question": "Q1?", "options": ["x", "y", "z", "w"], "answer": "3", "image": image_cell((0, 0, 0))},
          {"question": "Q2?", "options": ["p", "q"], "answer": "0", "image": image_cell((0, 0, 0))}]
  write_parquet(os.path.join(tmp_path, "data", "test-00000-of-00002.parquet"), rows[:1], ["image"])
  write_parquet(os.path.join(tmp_path, "data", "test-00001-of-00002.parquet"), rows[1:], ["image"])
  samples = list(ai2d.load(str(tmp_path)))
  assert [(s.id, s.answers, s.options) for s in samples] == [("0", ("D",), ("x", "y", "z", "w")), ("1", ("A",), ("p", "q"))]
  assert ai2d.TASK.score(samples[0], "D") == ("D", 1.0)
