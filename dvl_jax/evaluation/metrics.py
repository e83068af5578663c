"""The rules several tasks share: lmms-eval's `mean` aggregation and `exact_match` metric, per-group means,
exact answers, and how lmms-eval letters options."""

from __future__ import annotations

import string
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from dvl_jax.evaluation.task import Judgement, Sample

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def mean(scores: Iterable[float]) -> float:
  """lmms-eval's `mean` aggregation; 0 for no samples (a `--limit 0` run)."""
  scores = list(scores)
  return float(sum(scores) / len(scores)) if scores else 0.0


def mean_metric(name: str) -> Callable[[Sequence[Sample], Sequence[float]], dict[str, float]]:
  """The aggregate of a task whose one metric is the mean score, called `name`."""
  return lambda samples, scores: {name: mean(scores)}


def grouped_means(samples: Sequence[Sample], scores: Sequence[float], key: str) -> dict[str, float]:
  """`acc/{value}`: the mean score of the samples whose `metadata[key]` is `value` (MMMU subjects, question kinds)."""
  groups: dict[str, list[float]] = defaultdict(list)
  for sample, score in zip(samples, scores):
    groups[sample.metadata[key]].append(score)
  return {f"acc/{value}": mean(group) for value, group in sorted(groups.items())}


def exact_answer(sample: Sample, answer: str) -> Judgement:
  """Right when the cleaned answer is one of the references, character for character (generated data sets,
  whose references are the exact strings a model is trained to write)."""
  return Judgement(answer, float(answer in sample.answers))


def exact_match(prediction: str, reference: str) -> bool:
  """lmms-eval's `exact_match` with `ignore_case` and `ignore_punctuation` (as AI2D and RealWorldQA set them):
  lower-case both, delete ASCII punctuation, compare; white space counts."""
  return prediction.lower().translate(_PUNCTUATION) == reference.lower().translate(_PUNCTUATION)


def option_letters(count: int) -> list[str]:
  return [chr(ord("A") + i) for i in range(count)]


def lettered_options(options: Sequence[str]) -> str:
  """"A. first\\nB. second ...", how lmms-eval lists the choices of MMMU and AI2D."""
  return "\n".join(f"{letter}. {option}" for letter, option in zip(option_letters(len(options)), options))
