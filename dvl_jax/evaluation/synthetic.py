"""The demo's generated task (`dvl_jax.data.synthetic`): shapes in a 2x2 grid, exact-match scored.

`--data SEED[:COUNT[:KINDS]]` picks the split: examples 0 .. COUNT-1 of generator seed SEED (default
"2000:200"; `dvl demo` trains on seed 1000 and holds out "2000:256:all" with its default seed), drawing the
question kinds KINDS (comma-separated, or "all" to add the long "cells" answers; default: the generator's
default kinds). The prompt is the question alone, as the demo trains (no post-prompt); an answer is right
when, after the spec §9.2 clean-up, it is the reference character for character. Metrics: `exact_match` and
the accuracy per question kind (`acc/color`, ..., `acc/describe`, `acc/cells`: the 23-token answers, where
block diffusion decodes several tokens per forward).
"""

from __future__ import annotations

from typing import Iterator, Sequence

from dvl_jax.data import synthetic
from dvl_jax.evaluation.metrics import exact_answer, grouped_means, mean
from dvl_jax.evaluation.task import Sample, Task

DEFAULT_SPLIT = "2000:200"


def split(data: str | None) -> tuple[int, int, tuple[str, ...]]:
  """"SEED[:COUNT[:KINDS]]" -> (seed, count, question kinds)."""
  seed, _, rest = (data or DEFAULT_SPLIT).partition(":")
  count, _, kinds = rest.partition(":")
  try:
    numbers = int(seed), int(count or DEFAULT_SPLIT.partition(":")[2])
  except ValueError:
    raise ValueError(f"synthetic --data is SEED[:COUNT[:KINDS]] (default {DEFAULT_SPLIT}), got {data!r}") from None
  if kinds == "all":
    return (*numbers, synthetic.ALL_KINDS)
  chosen = tuple(k for k in kinds.split(",") if k) or synthetic.QUESTION_KINDS
  unknown = [k for k in chosen if k not in synthetic.ALL_KINDS]
  if unknown:
    raise ValueError(f"synthetic --data: unknown question kind {unknown[0]!r}; KINDS are among "
                     f"{','.join(synthetic.ALL_KINDS)}, or all")
  return (*numbers, chosen)


def load(data: str | None) -> Iterator[Sample]:
  seed, count, kinds = split(data)
  for index in range(count):
    ex = synthetic.example(seed, index, kinds=kinds)
    yield Sample(f"synthetic-{seed}-{index}", ex.question, (ex.image,), (ex.answer,), metadata={"kind": ex.kind})


def prompt(sample: Sample) -> str:
  return sample.question


def aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
  return {"exact_match": mean(scores), **grouped_means(samples, scores, "kind")}


TASK = Task("synthetic", load, prompt, exact_answer, aggregate, "exact_match",
            f"SEED[:COUNT[:KINDS]] of the generator (default {DEFAULT_SPLIT}; KINDS all adds the long answers)")
