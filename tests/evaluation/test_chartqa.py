"""ChartQA: the prompt, relaxed accuracy (5% for numbers, "%" read as a fraction, exact text otherwise), splits."""

import os

import pytest

from dvl_jax.evaluation import chartqa
from dvl_jax.evaluation.task import Sample
from tests.evaluation.fixtures import image_cell, write_parquet


def sample(answer, split="human_test"):
  return Sample("0", "What is the share of Spain?", (), (answer,), metadata={"type": split})


def test_prompt():
  assert chartqa.prompt(sample("1")) == "What is the share of Spain?\nAnswer the question with a single word."


@pytest.mark.parametrize("answer, reference, right", [
    ("12", "12", True),
    ("11.5", "12", True),        # |11.5 - 12| / 12 = 0.042 <= 0.05
    ("12.6", "12", True),        # 0.6 / 12 = 0.05: the bound is included
    ("12.7", "12", False),       # 0.7 / 12 = 0.058
    ("-5", "-5.2", True),        # 0.2 / 5.2 = 0.038
    ("45%", "0.45", True),       # "45%" is 0.45
    ("45", "45%", False),        # 45 against 0.45
    ("5%", "5", False),          # 0.05 against 5
    ("12 million", "12", False),  # units are not stripped: compared as text
    ("$12", "12", False),
    ("1,200", "1200", False),    # nor thousands separators
    ("0", "0", True),            # a zero reference is compared as text ...
    ("0.0", "0", False),         # ... so "0.0" is not "0"
    ("Yes", "yes", True),        # text ignores case
    ("Spain", "France", False),
])
def test_relaxed_accuracy(answer, reference, right):
  assert chartqa.judge(sample(reference), answer).score == float(right)


def test_score_cleans_first():
  assert chartqa.TASK.score(sample("14"), "14.\nThe bar for Spain") == ("14", 1.0)
  assert chartqa.TASK.score(sample("14"), "14 .") == ("14", 1.0)  # "14 " after the clean-up, stripped before scoring


def test_aggregate_splits_human_and_augmented():
  samples = [sample("1"), sample("1"), sample("1", "augmented_test")]
  metrics = chartqa.aggregate(samples, [1.0, 0.0, 1.0])  # human 1/2, augmented 1/1, overall 2/3
  assert metrics == pytest.approx({"relaxed_overall": 2 / 3, "relaxed_human_split": 0.5,
                                   "relaxed_augmented_split": 1.0})


def test_loader(tmp_path):
  rows = [{"type": "augmented_test", "question": "Max?", "answer": "41", "image": image_cell((3, 3, 3))}]
  write_parquet(os.path.join(tmp_path, "data", "test-00000-of-00001.parquet"), rows, ["image"])
  (only,) = chartqa.load(str(tmp_path))
  assert (only.id, only.question, only.answers, only.metadata) == ("0", "Max?", ("41",), {"type": "augmented_test"})
