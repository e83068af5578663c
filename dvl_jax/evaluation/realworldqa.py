"""RealWorldQA, scored by the rules of lmms-eval's `realworldqa` task (tasks/realworldqa/realworldqa.yaml and
utils.py of the lmms-eval copy in DiffusionVL's repository: its `flexible-extract` filters, then
`exact_match` ignoring case and punctuation; the file's `realworldqa_process_results` is not used by the yaml).

Data: `lmms-lab/RealWorldQA`, split `test` (`data/test-0000k-of-00002.parquet`). Columns read: `question`
(choices, when there are, are lines "A. ..." inside it, followed by an instruction such as "Please answer
directly with only the letter of the correct option and nothing else."), `answer` (a letter, or a word or
number for open questions), `image` (`datasets.Image`). No id column: a sample's id is its row number.

Prompt: the stripped question as is (the default post-prompt is empty).

Scoring: an answer that is exactly a number word "zero" .. "ten" (any case) becomes its digits; then its
characters other than letters, digits, "_" and white space are deleted and it is stripped; if the text of
a choice (as written after "X. " in the question, case and punctuation kept) occurs in it, the answer is
that choice's letter (the leftmost occurrence; choices are lettered A, B, ... in the order they appear);
the result must equal the reference ignoring case and punctuation. So "B", "(B)", "Right" and "Right, then
left" are right for "B. Right", and "right" (the case differs) or "It is B" are wrong. Metric: `exact_match`, the accuracy.
"""

from __future__ import annotations

import re
from typing import Iterator

from dvl_jax.evaluation.hf_data import download_hint, read_rows
from dvl_jax.evaluation.metrics import exact_match, mean_metric, option_letters
from dvl_jax.evaluation.task import Judgement, Sample, Task

REPO = "lmms-lab/RealWorldQA"
SPLIT = "test"
NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                                 "nine", "ten"))}
CHOICE_LINE = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


def load(data_dir: str | None) -> Iterator[Sample]:
  for index, row in enumerate(read_rows(data_dir, SPLIT, ("question", "answer"), REPO, images=("image",))):
    yield Sample(str(index), row["question"], (row["image"],), (row["answer"],), choices(row["question"]))


def choices(question: str) -> tuple[str, ...]:
  """The choice texts written in the question ("A. Left" lines), in order."""
  return tuple(text.strip() for _, text in CHOICE_LINE.findall(question))


def prompt(sample: Sample) -> str:
  return sample.question.strip()


def extract(answer: str, options: tuple[str, ...]) -> str:
  """The `flexible-extract` filters (module docstring)."""
  answer = NUMBER_WORDS.get(answer.lower(), answer)
  cleaned = re.sub(r"[^\w\s]", "", answer).strip()
  letter_of = dict(zip(options, option_letters(len(options))))  # a repeated text keeps its last letter, as there
  found = re.search("|".join(re.escape(o) for o in options), cleaned)
  return letter_of[found.group()] if found and found.group() in letter_of else cleaned


def judge(sample: Sample, answer: str) -> Judgement:
  parsed = extract(answer, sample.options).strip()
  return Judgement(parsed, float(exact_match(parsed, sample.answers[0])))


TASK = Task("realworldqa", load, prompt, judge, mean_metric("exact_match"), "exact_match", download_hint(REPO, "DIR"))
