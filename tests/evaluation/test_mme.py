"""MME: lmms-eval's yes/no parsing, the prompt, perception / cognition scores (acc + acc+) and the loader."""

import os

import pytest

from dvl_jax.evaluation import mme
from dvl_jax.evaluation.task import Sample
from tests.evaluation.fixtures import colour, image_cell, write_parquet


def sample(category="existence", image_id="existence/1.png", answer="Yes", index=1):
  return Sample(f"{image_id}#{index}", "Is there a dog in the image? Please answer yes or no.", (), (answer,),
                metadata={"category": category, "image_id": image_id})


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("Yes.", "yes"), ("no", "no"), ("NO.", "no"),
    ("no, it is not", "no"),        # "no" in the first four characters "no, "
    ("Yes, there is a dog", "yes"),
    ("y", "yes"), ("N", "no"), ("x", "other"),  # one-letter answers
    ("Not sure", "no"),             # "not " holds "no": lmms-eval reads it as no
    ("I think yes", "other"),       # "i th" holds neither
    ("", "other"),
])
def test_yes_no_parsing(answer, parsed):
  assert mme.yes_no(answer) == parsed


def test_prompt_swaps_the_yes_no_instruction_for_the_post_prompt():
  assert mme.prompt(sample()) == "Is there a dog in the image?\nAnswer the question using a single word or phrase."


def test_score_cleans_then_parses():
  assert mme.TASK.score(sample(answer="No"), "No.\nThere is a cat.") == ("no", 1.0)
  assert mme.TASK.score(sample(answer="Yes"), "Maybe") == ("other", 0.0)


def test_perception_and_cognition_scores():
  samples = [sample("existence", "e/1.png", index=1), sample("existence", "e/1.png", index=2),
             sample("existence", "e/2.png", index=1), sample("existence", "e/2.png", index=2),
             sample("count", "c/1.png", index=1), sample("count", "c/1.png", index=2),
             sample("code_reasoning", "r/1.png", index=1), sample("code_reasoning", "r/1.png", index=2)]
  scores = [1, 1, 1, 0, 0, 0, 1, 1]
  # existence: image e/1 acc 100, acc+ 100; e/2 acc 50, acc+ 0 -> acc 75, acc+ 50, score 125
  # count: c/1 both wrong -> 0; perception = 125 + 0. code_reasoning: both right -> 100 + 100; cognition = 200
  metrics = mme.aggregate(samples, [float(s) for s in scores])
  assert metrics["mme_perception_score"] == 125.0
  assert metrics["mme_cognition_score"] == 200.0
  assert (metrics["acc/existence"], metrics["acc_plus/existence"]) == (75.0, 50.0)
  assert (metrics["acc/count"], metrics["acc_plus/count"]) == (0.0, 0.0)


def test_loader_numbers_the_questions_of_each_image(tmp_path):
  rows = [{"question_id": "count/1.png", "image": image_cell((9, 9, 9)), "question": "Two dogs? Please answer yes or no.",
           "answer": "Yes", "category": "count"},
          {"question_id": "count/1.png", "image": image_cell((9, 9, 9)), "question": "Three dogs? Please answer yes or no.",
           "answer": "No", "category": "count"},
          {"question_id": "OCR/7.jpg", "image": image_cell((1, 2, 3)), "question": "Is it 'STOP'? Please answer yes or no.",
           "answer": "Yes", "category": "OCR"}]
  write_parquet(os.path.join(tmp_path, "data", "test-00000-of-00001-0123abcd.parquet"), rows, ["image"])
  samples = list(mme.load(str(tmp_path)))
  assert [s.id for s in samples] == ["count/1.png#1", "count/1.png#2", "OCR/7.jpg#1"]
  assert [s.answers for s in samples] == [("Yes",), ("No",), ("Yes",)]
  assert samples[2].metadata == {"category": "OCR", "image_id": "OCR/7.jpg"}
  assert colour(samples[2].images[0]) == (1, 2, 3)
