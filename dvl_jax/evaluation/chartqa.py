"""ChartQA, scored by the rules of lmms-eval's `chartqa` task (tasks/chartqa/chartqa.yaml and utils.py of the
lmms-eval copy in DiffusionVL's repository, whose relaxed accuracy comes from Qwen-VL's evaluation).

Data: `lmms-lab/ChartQA`, split `test` (`data/test-00000-of-00001.parquet`). Columns read: `type`
("human_test" or "augmented_test"), `question`, `answer`, `image` (`datasets.Image`). No id column: a
sample's id is its row number.

Prompt: the question, then "\\nAnswer the question with a single word." (DiffusionVL's script also stops at
"\\n", which the answer clean-up already does).

Relaxed accuracy: answer and reference are read as numbers by Python's `float`, trailing "%" signs dividing
by 100; when both are numbers and the reference is not 0, the answer is right within 5% of the reference
(|answer - reference| <= 0.05 |reference|); otherwise it must equal the reference ignoring case. Nothing
else is stripped: "12 million", "$12" or "1,200" are texts, so "45%" matches "0.45" but "45" does not
match "45%", and "12 units" does not match "12". Metrics: `relaxed_overall` and the same on the human and
augmented halves.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from dvl_jax.evaluation.hf_data import download_hint, read_rows
from dvl_jax.evaluation.metrics import mean
from dvl_jax.evaluation.task import Judgement, Sample, Task

REPO = "lmms-lab/ChartQA"
SPLIT = "test"
POST_PROMPT = "\nAnswer the question with a single word."
MAX_RELATIVE_CHANGE = 0.05


def load(data_dir: str | None) -> Iterator[Sample]:
  for index, row in enumerate(read_rows(data_dir, SPLIT, ("type", "question", "answer"), REPO, images=("image",))):
    yield Sample(str(index), row["question"], (row["image"],), (row["answer"],), metadata={"type": row["type"]})


def prompt(sample: Sample) -> str:
  return sample.question + POST_PROMPT


def as_number(text: str) -> float | None:
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_match(answer: str, reference: str) -> bool:
  value, target = as_number(answer), as_number(reference)
  if value is not None and target:
    return abs(value - target) / abs(target) <= MAX_RELATIVE_CHANGE
  return answer.lower() == reference.lower()


def judge(sample: Sample, answer: str) -> Judgement:
  answer = answer.strip()  # lmms-eval strips every generated answer before scoring it
  return Judgement(answer, float(relaxed_match(answer, sample.answers[0])))


def aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
  human = [s for sample, s in zip(samples, scores) if sample.metadata["type"] == "human_test"]
  augmented = [s for sample, s in zip(samples, scores) if sample.metadata["type"] != "human_test"]
  return {"relaxed_overall": mean(scores), "relaxed_human_split": mean(human), "relaxed_augmented_split": mean(augmented)}


TASK = Task("chartqa", load, prompt, judge, aggregate, "relaxed_overall", download_hint(REPO, "DIR"))
