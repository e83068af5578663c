"""RealWorldQA: the prompt, lmms-eval's number-word and choice-text filters, exact match, the loader."""

import os

import pytest

from dvl_jax.evaluation import realworldqa
from dvl_jax.evaluation.task import Sample
from tests.evaluation.fixtures import image_cell, write_parquet

CHOICE_QUESTION = ("Which way is the car going?\nA. Left\nB. Right\nC. Forward\n"
                   "Please answer directly with only the letter of the correct option and nothing else.")
OPEN_QUESTION = "How many cars are there? Please answer directly with a single word or number."


def sample(question, answer):
  return Sample("0", question, (), (answer,), realworldqa.choices(question))


def test_choices_and_prompt():
  assert realworldqa.choices(CHOICE_QUESTION) == ("Left", "Right", "Forward")
  assert realworldqa.choices(OPEN_QUESTION) == ()
  assert realworldqa.prompt(sample("  " + OPEN_QUESTION + "\n", "2")) == OPEN_QUESTION


@pytest.mark.parametrize("answer, right", [
    ("B", True), ("b", True),
    ("(B)", True),              # punctuation deleted: "B"
    ("Right", True),            # the choice text -> "B"
    ("Right, then left", True),  # the leftmost choice text: "Right"
    ("right", False),           # choice texts are matched with their case: stays "right"
    ("It is B", False),
])
def test_multiple_choice(answer, right):
  assert realworldqa.judge(sample(CHOICE_QUESTION, "B"), answer).score == float(right)


@pytest.mark.parametrize("answer, right", [
    ("2", True), ("Two", True), ("TWO", True),  # a whole-answer number word becomes its digits
    ("2 cars", False), ("two cars", False),
])
def test_open_answers(answer, right):
  assert realworldqa.judge(sample(OPEN_QUESTION, "2"), answer).score == float(right)


def test_score_cleans_first():
  assert realworldqa.TASK.score(sample(OPEN_QUESTION, "2"), "two.\nI counted them.") == ("2", 1.0)
  # "two ." cleans to "two " (strip, then the dot): the number-word filter sees "two " and keeps it, as lmms-eval
  # does (it strips after its filters), so the answer reads "two", not "2"
  assert realworldqa.TASK.score(sample(OPEN_QUESTION, "2"), "two .") == ("two", 0.0)


def test_loader(tmp_path):
  rows = [{"image": image_cell((0, 0, 0)), "question": CHOICE_QUESTION, "answer": "C"}]
  write_parquet(os.path.join(tmp_path, "data", "test-00000-of-00002.parquet"), rows, ["image"])
  (only,) = realworldqa.load(str(tmp_path))
  assert (only.answers, only.options) == (("C",), ("Left", "Right", "Forward"))
