"""AI2D, scored by the rules of lmms-eval's `ai2d` task (tasks/ai2d/ai2d.yaml and utils.py of the lmms-eval copy in
DiffusionVL's repository).

Data: `lmms-lab/ai2d`, split `test` (`data/test-0000k-of-00002.parquet`). Columns read: `question`, `options`
(a list of strings), `answer` (the right option's index, as a string), `image` (`datasets.Image`). The
dataset has no id column: a sample's id is its row number.

Prompt (`mcq` format): the question, the options as "A. ..." lines, then "\\nAnswer with the option's letter
from the given choices directly."

Scoring (the `flexible-extract` filter, then `exact_match` ignoring case and punctuation): an answer that
starts with a letter and a dot ("B. a leaf") counts as that letter; any other answer is compared whole with
the reference letter, so "b", "(B)" and "B)" are right and "The answer is B" is wrong. Metric: accuracy.
"""

from __future__ import annotations

import re
from typing import Iterator

from dvl_jax.evaluation.hf_data import download_hint, read_rows
from dvl_jax.evaluation.metrics import exact_match, lettered_options, mean_metric, option_letters
from dvl_jax.evaluation.task import Judgement, Sample, Task

REPO = "lmms-lab/ai2d"
SPLIT = "test"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")


def load(data_dir: str | None) -> Iterator[Sample]:
  for index, row in enumerate(read_rows(data_dir, SPLIT, ("question", "options", "answer"), REPO, images=("image",))):
    options = tuple(row["options"])
    yield Sample(str(index), row["question"], (row["image"],), (option_letters(len(options))[int(row["answer"])],),
                 options)


def prompt(sample: Sample) -> str:
  return f"{sample.question}\n{lettered_options(sample.options)}{POST_PROMPT}"


def judge(sample: Sample, answer: str) -> Judgement:
  match = LEADING_LETTER.match(answer)
  parsed = (match.group(1) if match else answer).strip()
  return Judgement(parsed, float(exact_match(parsed, sample.answers[0])))


TASK = Task("ai2d", load, prompt, judge, mean_metric("exact_match"), "exact_match", download_hint(REPO, "DIR"))
