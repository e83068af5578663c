"""MMMU (val): lmms-eval's multiple-choice and open-answer parsing, the prompt, accuracy and the loader.

Expected values are worked out by hand from the rules in `dvl_jax/evaluation/mmmu.py`'s docstring."""

import os
import random

import pytest

from dvl_jax.evaluation import mmmu
from dvl_jax.evaluation.task import Sample
from tests.evaluation.fixtures import colour, image_cell, write_parquet

ANIMALS = ("red fox", "blue whale", "gray wolf", "brown bear")


def choice_sample(answer="B", options=ANIMALS, sample_id="validation_Biology_1"):
  return Sample(sample_id, "Which animal is shown in <image 1>?", (), (answer,), options,
                {"question_type": "multiple-choice", "subject": "Biology"})


def open_sample(answer, sample_id="validation_Math_1"):
  return Sample(sample_id, "What is x?", (), (answer,), (), {"question_type": "open", "subject": "Math"})


def test_prompts_follow_lmms_eval():
  assert mmmu.prompt(choice_sample()) == (
      "Which animal is shown in <image 1>?\nA. red fox\nB. blue whale\nC. gray wolf\nD. brown bear\n\n"
      "Answer with the option's letter from the given choices directly.")
  assert mmmu.prompt(open_sample("3")) == "What is x?\n\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize("answer, letter", [
    ("(B)", "B"),                                   # a bracketed letter
    ("The answer is (A), not (C).", "C"),           # several bracketed letters: the last one written
    ("B", "B"),                                     # a bare letter (" B " has "B ")
    ("I choose B.", "B"),                           # the final "." is stripped, then "B " matches
    ("A and C are wrong, so D", "D"),               # A, C, D all followed by a space: the last " X " wins
    ("B.cat", "B"),                                 # no "(X)", no "X ": the "X." form
    ("DNA is the answer", "A"),                     # lmms-eval's quirk: "DNA " contains "A "
    ("I am quite sure it is the blue whale", "B"),  # > 5 words, no letter: the option text
    ("Not the red fox but the blue whale instead", "B"),  # two option texts: the one written last
])
def test_multiple_choice_parsing(answer, letter):
  assert mmmu.parse_choice(answer, ANIMALS, random.Random(0)) == letter


def test_no_letter_falls_back_to_a_letter_seeded_by_the_sample_id():
  # "a whale" is two words (no content matching) and names no letter: random.Random(sample id).choice(A..D)
  sample = choice_sample()
  expected = random.Random(sample.id).choice(["A", "B", "C", "D"])
  judgements = {mmmu.judge(sample, "a whale") for _ in range(3)}
  assert judgements == {(expected, float(expected == "B"))}


@pytest.mark.parametrize("answer, reference, right", [
    ("The answer is 3.5 meters", "3.5", True),  # key phrase "3.5 meters" -> number 3.5 == 3.5
    ("It is 4", "3.5", False),                  # key phrase "4" -> 4.0 != 3.5
    ("1,000", "1000", True),                    # "1,000" -> 1000.0 (commas dropped) == 1000.0
    ("x = 12", "12", True),                     # "=" is a key in the last line: "12"
    ("so the total is 5\nthe result is 6", "5", True),  # every line's key phrase counts: {5.0, 6.0}
    ("Paris", "paris", True),                   # text: lower-cased reference inside lower-cased prediction
    ("the capital is paris, france", "Paris", True),
    ("banana", "a", False),                     # one-letter references become " a" / "a ": not inside "banana"
    ("it is a", "a", True),                     # key phrase "a" -> {" a", "a "}, which contain " a"
    ("Rome", "Paris", False),
])
def test_open_answers(answer, reference, right):
  assert mmmu.judge(open_sample(reference), answer).score == float(right)


def test_open_predictions_are_normalised_key_phrases_and_numbers():
  assert mmmu.parse_open("The answer is 3.5 meters") == {"3.5 meters", 3.5}
  assert mmmu.parse_open("The value is 1.256") == {1.26}  # numbers are rounded to 2 places


def test_accuracy_overall_and_per_subject():
  samples = [choice_sample(sample_id=f"validation_Biology_{i}") for i in range(3)] + [open_sample("3")]
  # Biology: 2 of 3 right; Math: 1 of 1; overall 3 of 4
  assert mmmu.aggregate(samples, [1.0, 0.0, 1.0, 1.0]) == {"mmmu_acc": 0.75, "acc/Biology": 2 / 3, "acc/Math": 1.0}
  assert mmmu.subject("validation_Art_Theory_12") == "Art_Theory"


def test_loader_reads_the_hub_parquet_layout(tmp_path):
  red, green, blue = image_cell((255, 0, 0)), image_cell((0, 255, 0)), image_cell((0, 0, 255))
  empty = dict.fromkeys(mmmu.IMAGE_COLUMNS)
  rows = [
      # <image 2> is referenced from an option, <image 3> nowhere: two images, in image_k order
      {**empty, "id": "validation_Art_1", "question": "Compare <image 1> with the option.",
       "options": "['<image 2>', 'a cat']", "answer": "A", "question_type": "multiple-choice",
       "image_1": red, "image_2": green, "image_3": blue},
      {**empty, "id": "validation_Math_2", "question": "Solve <image 1>.", "options": "[]", "answer": "7",
       "question_type": "open", "image_1": blue},
  ]
  write_parquet(os.path.join(tmp_path, "data", "validation-00000-of-00001.parquet"), rows, mmmu.IMAGE_COLUMNS)
  write_parquet(os.path.join(tmp_path, "data", "dev-00000-of-00001.parquet"), rows[:1], mmmu.IMAGE_COLUMNS)
  samples = list(mmmu.load(str(tmp_path)))
  assert [s.id for s in samples] == ["validation_Art_1", "validation_Math_2"]  # the dev split is not read
  first, second = samples
  assert [colour(im) for im in first.images] == [(255, 0, 0), (0, 255, 0)]
  assert first.options == ("<image 2>", "a cat") and first.answers == ("A",)
  assert first.metadata == {"question_type": "multiple-choice", "subject": "Art"}
  assert [colour(im) for im in second.images] == [(0, 0, 255)] and second.options == ()
  assert mmmu.prompt(second) == "Solve <image 1>.\n\nAnswer the question using a single word or phrase."
