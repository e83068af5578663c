"""MMStar: the prompt, MMStar's letter match, the l2-category macro average, the loader (`mmstar.parquet`)."""

import os

import pytest

from dvl_jax.evaluation import mmstar
from dvl_jax.evaluation.task import Sample
from tests.evaluation.fixtures import image_cell, write_parquet


def sample(answer="B", category="math", l2="geometry"):
  question = "Which shape is larger?\nOptions: A: circle, B: square, C: triangle, D: none"
  return Sample("1", question, (), (answer,), metadata={"category": category, "l2_category": l2})


def test_prompt():
  assert mmstar.prompt(sample()) == ("Which shape is larger?\nOptions: A: circle, B: square, C: triangle, D: none\n"
                                     "Answer with the option's letter from the given choices directly")


@pytest.mark.parametrize("answer, reference, right", [
    ("B", "B", True), ("b) square", "B", True), ("(b)", "B", True), ("Option B", "B", True),
    ("The answer is B", "B", True),
    ("Answer: B", "B", False),   # first character "a"
    ("I think B", "B", False),
    ("", "B", False),
    ("a cat", "A", True),        # only the first character is read: "a" is A
    ("Answer: B", "A", True),    # likewise
])
def test_letter_match(answer, reference, right):
  assert mmstar.judge(sample(reference), answer).score == float(right)


def test_average_is_the_mean_over_l2_categories():
  samples = [sample(category="coarse perception", l2="image scene and topic")] * 2 + \
            [sample(category="coarse perception", l2="image emotion")] + [sample(category="math", l2="geometry")] * 4
  scores = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
  # l2 accuracies: scene 1/2, emotion 1/1, geometry 2/4 -> average (0.5 + 1 + 0.5) / 3 = 2/3 (plain accuracy: 4/7)
  # coarse perception: (0.5 + 1) / 2 = 0.75; math: 0.5
  assert mmstar.aggregate(samples, scores) == pytest.approx({"average": 2 / 3, "coarse perception": 0.75,
                                                             "math": 0.5})


def test_loader_reads_the_single_file_as_the_val_split(tmp_path):
  rows = [{"index": 0, "question": "Q? Options: A: x, B: y", "answer": "A", "category": "math", "l2_category": "geometry",
           "image": image_cell((5, 5, 5)), "meta_info": {"source": "MathVista"}}]
  write_parquet(os.path.join(tmp_path, "mmstar.parquet"), rows, ["image"])
  (only,) = mmstar.load(str(tmp_path))
  assert (only.id, only.answers, only.metadata) == ("0", ("A",), {"category": "math", "l2_category": "geometry"})
