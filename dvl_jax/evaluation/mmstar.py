"""MMStar, scored by the rules of lmms-eval's `mmstar` task (tasks/mmstar/mmstar.yaml and utils.py of the
lmms-eval copy in DiffusionVL's repository, its `exact_match` taken from MMStar's own evaluation).

Data: `Lin-Chen/MMStar`, split `val`: the repository holds one file, `mmstar.parquet` (a save_to_disk copy or
`val-*.parquet` files are read too). Columns read: `index` (the id), `question` (the options are in it:
"Options: A: ..., B: ..."), `answer` (a letter), `category` (six of them), `l2_category` (eighteen),
`image` (`datasets.Image`).

Prompt: the stripped question (without " Please answer yes or no.") and "\\nAnswer with the option's letter
from the given choices directly" (no final stop in the original either).

Scoring: lower-case and strip answer and reference; right when the answer's first character is the letter,
or it starts with "(" and the second is, or it starts with "option " or "the answer is " and the letter
follows. So "B", "b) ...", "(b)", "Option B" are right for B and "Answer: B" is wrong; an answer starting
with the word "a" counts as A, as in the original. Metrics: `average`, the mean over the l2 categories of
their accuracy, and the same mean within each of the six categories.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

from dvl_jax.evaluation.hf_data import download_hint, read_rows
from dvl_jax.evaluation.metrics import mean
from dvl_jax.evaluation.task import Judgement, Sample, Task

REPO = "Lin-Chen/MMStar"
SPLIT = "val"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
YES_NO_SUFFIX = " Please answer yes or no."
PREFIXES = ("", "(", "option ", "the answer is ")


def load(data_dir: str | None) -> Iterator[Sample]:
  columns = ("index", "question", "answer", "category", "l2_category")
  for row in read_rows(data_dir, SPLIT, columns, REPO, images=("image",), file_names=("mmstar.parquet",)):
    yield Sample(str(row["index"]), row["question"], (row["image"],), (row["answer"],),
                 metadata={"category": row["category"], "l2_category": row["l2_category"]})


def prompt(sample: Sample) -> str:
  return sample.question.strip().replace(YES_NO_SUFFIX, "") + POST_PROMPT


def letter_match(answer: str, reference: str) -> bool:
  """MMStar's `exact_match` (module docstring)."""
  reference = reference.lower().strip().replace("\n", " ")
  answer = answer.lower().strip().replace("\n", " ")
  return any(answer.startswith(prefix) and answer[len(prefix):len(prefix) + 1] == reference for prefix in PREFIXES)


def judge(sample: Sample, answer: str) -> Judgement:
  return Judgement(answer.lower().strip(), float(letter_match(answer, sample.answers[0])))


def aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
  by_l2: dict[str, list[float]] = defaultdict(list)
  category_of = {}
  for sample, score in zip(samples, scores):
    by_l2[sample.metadata["l2_category"]].append(score)
    category_of[sample.metadata["l2_category"]] = sample.metadata["category"]
  l2_accuracy = {l2: mean(s) for l2, s in by_l2.items()}
  metrics = {"average": mean(l2_accuracy.values())}
  for category in sorted(set(category_of.values())):
    metrics[category] = mean(acc for l2, acc in l2_accuracy.items() if category_of[l2] == category)
  return metrics


TASK = Task("mmstar", load, prompt, judge, aggregate, "average", download_hint(REPO, "DIR"))
