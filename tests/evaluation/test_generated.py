"""The generated and bundled tasks: `synthetic` (the demo's generator) and `easy_vqa` (the PyPI package)."""

import itertools

import easy_vqa as easy_vqa_package
import pytest

from dvl_jax.data import synthetic as generator
from dvl_jax.evaluation import easy_vqa, synthetic


def test_synthetic_default_split_is_the_demos_held_out_seed():
  samples = list(synthetic.load(None))
  assert len(samples) == 200
  first = generator.example(2000, 0)
  assert (samples[0].id, samples[0].question, samples[0].answers) == ("synthetic-2000-0", first.question, (first.answer,))
  assert synthetic.prompt(samples[0]) == first.question  # no post-prompt: the demo trains on the bare question


def test_synthetic_split_argument():
  assert [s.id for s in synthetic.load("7:3")] == ["synthetic-7-0", "synthetic-7-1", "synthetic-7-2"]
  assert synthetic.split("9") == (9, 200, generator.QUESTION_KINDS)
  assert synthetic.split("9:5:all") == (9, 5, generator.ALL_KINDS)
  assert synthetic.split("9:5:cells,color") == (9, 5, ("cells", "color"))
  with pytest.raises(ValueError, match="SEED"):
    synthetic.split("seven")
  with pytest.raises(ValueError, match="unknown question kind 'grid'"):
    synthetic.split("9:5:grid")


def test_synthetic_long_answers_are_opt_in():
  default, long = list(synthetic.load("4:40")), list(synthetic.load("4:40:all"))
  assert {s.metadata["kind"] for s in default} == set(generator.QUESTION_KINDS)
  assert {s.metadata["kind"] for s in long} == set(generator.ALL_KINDS)
  cells = [s for s in synthetic.load("4:10:cells")]
  assert {s.question for s in cells} == {"Where do you see the shapes?"}
  assert [s.answers[0] for s in cells] == [generator.example(4, i, kinds=("cells",)).answer for i in range(10)]
  assert synthetic.aggregate(cells[:2], [1.0, 0.0]) == {"exact_match": 0.5, "acc/cells": 0.5}


def test_synthetic_exact_match_after_clean_up():
  sample = next(s for s in synthetic.load("3:50") if s.metadata["kind"] == "describe")
  reference = sample.answers[0]
  assert synthetic.TASK.score(sample, f" {reference}.\nmore") == (reference, 1.0)
  assert synthetic.TASK.score(sample, reference.capitalize()).score == 0.0  # character for character
  metrics = synthetic.aggregate([sample, sample], [1.0, 0.0])
  assert metrics == {"exact_match": 0.5, "acc/describe": 0.5}


def test_easy_vqa_reads_the_bundled_test_split():
  samples = list(itertools.islice(easy_vqa.load(None), 3))
  questions, answers, image_ids = easy_vqa_package.get_test_questions()
  assert [s.id for s in samples] == ["test-0", "test-1", "test-2"]
  assert [(s.question, s.answers[0]) for s in samples] == list(zip(questions[:3], answers[:3]))
  assert samples[0].images[0].size == (64, 64) and samples[0].images[0].mode == "RGB"
  assert easy_vqa.prompt(samples[0]) == questions[0] + "\nAnswer the question using a single word or phrase."
  assert easy_vqa.TASK.score(samples[0], answers[0] + ".") == (answers[0], 1.0)
  with pytest.raises(ValueError, match="train"):
    next(easy_vqa.load("validation"))
