"""One tiny random checkpoint for the evaluator's end-to-end tests (synthetic and easy-vqa), built once per session.

It is the demo's model (56-px images: one merged token per grid cell) with a word tokenizer over the words of
both tasks, so prompts of either task tokenize without unknown words and share the compiled programs.
"""

from __future__ import annotations

import easy_vqa
import pytest

PIXELS = 56 * 56


@pytest.fixture(scope="session")
def eval_checkpoint(tmp_path_factory) -> str:
  from dvl_jax.data import synthetic
  from dvl_jax.data.word_tokenizer import word_tokenizer
  from dvl_jax.demos.train_demo import VOCAB_SIZE, demo_model_config, init_checkpoint
  from dvl_jax.evaluation.easy_vqa import POST_PROMPT

  questions, answers, _ = easy_vqa.get_test_questions()
  cfg = demo_model_config(VOCAB_SIZE)
  return init_checkpoint(str(tmp_path_factory.mktemp("eval-ckpt")), cfg,
                         word_tokenizer([*synthetic.corpus(), *questions, *answers, POST_PROMPT], cfg))


@pytest.fixture(scope="session")
def eval_model(eval_checkpoint):
  """(model, processor) of the checkpoint, images at `PIXELS`."""
  import dvl_jax as dvl

  return dvl.load(eval_checkpoint), dvl.Processor.from_pretrained(eval_checkpoint, min_pixels=PIXELS,
                                                                  max_pixels=PIXELS)


@pytest.fixture(scope="session")
def pixel_args() -> list[str]:
  """`dvl eval`'s options for the checkpoint's image size."""
  return ["--min-pixels", str(PIXELS), "--max-pixels", str(PIXELS)]
