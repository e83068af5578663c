"""MME, scored by the rules of lmms-eval's `mme` task (tasks/mme/utils.py and mme.yaml of the lmms-eval copy in
DiffusionVL's repository).

Data: `lmms-lab/MME`, split `test` (`data/test-0000k-of-00004-{hash}.parquet`). Columns read: `question_id`
(the image's file name, e.g. "code_reasoning/0020.png", shared by the image's two questions), `image`
(`datasets.Image`), `question` (ending " Please answer yes or no."), `answer` ("Yes" / "No"), `category`.

Prompt (the `default` model kwargs): the stripped question without " Please answer yes or no.", then
"\\nAnswer the question using a single word or phrase."

Yes/no parsing: lower-case, strip, delete every "."; "yes" / "no" as such; a one-letter answer "y" / "n";
otherwise "yes" within the first four characters, else "no" within them ("no, it is not" is no, "Not
sure" is no too, "I think yes" is neither), else neither (always wrong).

Metrics: per category, the image-level mean of acc + acc+ in percent, where an image's acc is the share of
its questions answered right and acc+ is 100 when all of them are (lmms-eval requires exactly two
questions per image; a `--limit` that cuts a pair here scores the one question for both): that is, the
category's accuracy plus its accuracy+. The perception score sums this over the ten perception categories
(existence, count, position, color, posters, celebrity, scene, landmark, artwork, OCR), the cognition
score over the rest (commonsense_reasoning, numerical_calculation, text_translation, code_reasoning);
full marks are 2000 and 800.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

from dvl_jax.evaluation.hf_data import download_hint, read_rows
from dvl_jax.evaluation.task import Judgement, Sample, Task

REPO = "lmms-lab/MME"
SPLIT = "test"
POST_PROMPT = "\nAnswer the question using a single word or phrase."
YES_NO_SUFFIX = " Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")


def load(data_dir: str | None) -> Iterator[Sample]:
  """Sample ids are `question_id#k`, k counting the image's questions in file order."""
  seen: dict[str, int] = defaultdict(int)
  for row in read_rows(data_dir, SPLIT, ("question_id", "question", "answer", "category"), REPO, images=("image",)):
    image_id = row["question_id"]
    seen[image_id] += 1
    yield Sample(f"{image_id}#{seen[image_id]}", row["question"], (row["image"],), (row["answer"],),
                 metadata={"category": row["category"], "image_id": image_id})


def prompt(sample: Sample) -> str:
  return sample.question.strip().replace(YES_NO_SUFFIX, "") + POST_PROMPT


def yes_no(answer: str) -> str:
  """"yes", "no" or "other" (module docstring)."""
  answer = answer.lower().strip().replace(".", "")
  if answer in ("yes", "no"):
    return answer
  if len(answer) == 1:
    return {"y": "yes", "n": "no"}.get(answer, "other")
  head = answer[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def judge(sample: Sample, answer: str) -> Judgement:
  parsed = yes_no(answer)
  return Judgement(parsed, float(parsed == sample.answers[0].lower().strip().replace(".", "")))


def aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
  by_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  for sample, score in zip(samples, scores):
    by_image[sample.metadata["category"]][sample.metadata["image_id"]].append(score)
  metrics = {"mme_perception_score": 0.0, "mme_cognition_score": 0.0}
  for category, images in sorted(by_image.items()):
    acc = 100.0 * sum(sum(s) / len(s) for s in images.values()) / len(images)
    acc_plus = 100.0 * sum(all(s) for s in images.values()) / len(images)
    metrics[f"acc/{category}"], metrics[f"acc_plus/{category}"] = acc, acc_plus
    metrics["mme_perception_score" if category in PERCEPTION else "mme_cognition_score"] += acc + acc_plus
  return metrics


TASK = Task("mme", load, prompt, judge, aggregate, "mme_perception_score", download_hint(REPO, "DIR"))
