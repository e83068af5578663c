"""easy-VQA (the `easy-vqa` package on PyPI, MIT): 64x64 images of one coloured shape, with questions about
its shape and colour (13 possible answers, most questions yes/no), bundled in the package, so it runs offline.

`--data` is the split: "test" (default; 1,000 images, 9,673 questions) or "train" (4,000 images, 38,575
questions). Sample ids are `{split}-{n}`, n the question's place in the package's list. There is no
lmms-eval task for it: the prompt is the question and the VQA post-prompt lmms-eval uses for MME and MMMU's
open questions, "\\nAnswer the question using a single word or phrase."; an answer is right when, after
the spec §9.2 clean-up, it is the reference character for character (references are lower-case words).
Metric: `exact_match`.
"""

from __future__ import annotations

from typing import Iterator

import easy_vqa
from PIL import Image

from dvl_jax.evaluation.metrics import exact_answer, mean_metric
from dvl_jax.evaluation.task import Sample, Task

POST_PROMPT = "\nAnswer the question using a single word or phrase."
SPLITS = {"train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
          "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths)}


def load(data: str | None) -> Iterator[Sample]:
  split = data or "test"
  if split not in SPLITS:
    raise ValueError(f"easy_vqa --data is a split, one of {sorted(SPLITS)}; got {data!r}")
  questions, image_paths = SPLITS[split]
  paths = image_paths()
  for index, (question, answer, image_id) in enumerate(zip(*questions())):
    with Image.open(paths[image_id]) as image:
      yield Sample(f"{split}-{index}", question, (image.convert("RGB"),), (answer,), metadata={"image_id": image_id})


def prompt(sample: Sample) -> str:
  return sample.question + POST_PROMPT


TASK = Task("easy_vqa", load, prompt, exact_answer, mean_metric("exact_match"), "exact_match",
            "the split: test (default) or train")
