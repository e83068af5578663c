"""MMMU (validation), scored by the rules of lmms-eval's `mmmu_val` task (tasks/mmmu/utils.py of the lmms-eval
copy in DiffusionVL's repository, itself taken from the official MMMU eval_utils).

Data: `lmms-lab/MMMU`, split `validation` (`data/validation-*.parquet`). Columns read: `id`
("validation_{Subject}_{n}"), `question` (with `<image k>` references), `options` (a Python list literal,
stored as a string), `answer` (a letter for multiple choice, text for open questions), `question_type`
("multiple-choice" or "open"), `image_1` .. `image_7` (`datasets.Image`, null when unused).

Prompt: the question, then for multiple choice the options as "A. ..." lines, a blank line and "Answer with
the option's letter from the given choices directly."; for open questions a blank line and "Answer the
question using a single word or phrase." The `<image k>` references stay in the text (lmms-eval's
`interleaved_format: false`); the images are the referenced ones in `image_k` order, placed in front.

Multiple-choice parsing, in order: strip the characters `,.!?;:'` from both ends; letters written "(A)";
else letters followed by a space ("A " anywhere in " answer ", so "DNA " counts as an A); else letters
followed by "."; else, for answers of more than five words, options whose text appears in the answer.
Several candidates: the one whose marker ("(A)", " A ", or the option text) occurs last; the first
candidate when none occurs in that form. No candidate: a random letter. lmms-eval draws it from Python's
process-wide `random` (seeded 0 at start-up), so which letter a sample gets depends on the samples scored
before it; here it comes from a generator seeded with the sample id, the same for every run, order and
batching (the expected accuracy is the same).

Open parsing: the answer is lower-cased and cut into lines; from each line, the shortest text after one of
"could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result " (and "=" in the last line)
is a key phrase (the whole answer when no line has one); the key phrases and every number in them
(comma-grouped, scientific and plain forms) are normalised: a number becomes a float rounded to 2 places,
text is lower-cased (a one-character text becomes " x" and "x ", to avoid trivial matches). The answer is
right when a normalised reference string is a substring of a predicted string or a reference number equals
a predicted number. The reference is the `answer` string as stored (lmms-eval does not unpack the list
literals a few open answers hold). Metric: accuracy over all questions (`mmmu_acc`), and per subject (`acc/{subject}`).
"""

from __future__ import annotations

import ast
import random
import re
from typing import Iterator, Sequence

from dvl_jax.evaluation.hf_data import download_hint, read_rows
from dvl_jax.evaluation.metrics import grouped_means, lettered_options, mean, option_letters
from dvl_jax.evaluation.task import Judgement, Sample, Task

REPO = "lmms-lab/MMMU"
SPLIT = "validation"
MULTIPLE_CHOICE = "multiple-choice"
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
IMAGE_REFERENCE = re.compile(r"<image (\d+)>")
KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL_KEYS = {":", ",", ".", "!", "?", ";", "'"}
NUMBER_PATTERNS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands separators
                   re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific
                   re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))  # plain


def load(data_dir: str | None) -> Iterator[Sample]:
  columns = ("id", "question", "options", "answer", "question_type")
  for row in read_rows(data_dir, SPLIT, columns, REPO, images=IMAGE_COLUMNS):
    options = tuple(str(o) for o in ast.literal_eval(row["options"]))
    referenced = sorted({f"image_{k}" for k in IMAGE_REFERENCE.findall(row["question"] + "".join(options))})
    yield Sample(row["id"], row["question"], tuple(row[c] for c in referenced if row.get(c) is not None),
                 (row["answer"],), options, {"question_type": row["question_type"], "subject": subject(row["id"])})


def subject(sample_id: str) -> str:
  """"validation_Art_Theory_12" -> "Art_Theory"."""
  match = re.match(r"^[^_]+_(.+?)_\d+$", sample_id)
  return match.group(1) if match else "unknown"


def prompt(sample: Sample) -> str:
  if sample.metadata["question_type"] == MULTIPLE_CHOICE:
    return f"{sample.question}\n{lettered_options(sample.options)}\n\n{CHOICE_PROMPT}"
  return f"{sample.question}\n\n{OPEN_PROMPT}"


def judge(sample: Sample, answer: str) -> Judgement:
  answer = answer.strip()  # lmms-eval strips every generated answer before scoring it
  if sample.metadata["question_type"] == MULTIPLE_CHOICE:
    letter = parse_choice(answer, sample.options, random.Random(sample.id))
    return Judgement(letter, float(letter == sample.answers[0]))
  predictions = parse_open(answer)
  return Judgement(" | ".join(sorted(map(str, predictions))), float(open_match(sample.answers[0], predictions)))


def parse_choice(answer: str, options: Sequence[str], rng: random.Random) -> str:
  """The option letter an answer names (module docstring), `rng`'s pick when it names none."""
  letters = option_letters(len(options))
  for char in ",.!?;:'":
    answer = answer.strip(char)
  padded = f" {answer} "
  bracketed = [x for x in letters if f"({x})" in padded]
  candidates = (bracketed or [x for x in letters if f"{x} " in padded] or [x for x in letters if f"{x}." in padded])
  by_content = False
  if not candidates and len(padded.split()) > 5:
    candidates = [x for x, option in zip(letters, options) if option.lower() in padded.lower()]
    by_content = True
  if not candidates:
    return rng.choice(letters) if letters else ""
  if len(candidates) == 1:
    return candidates[0]
  if by_content:
    positions = [padded.lower().rfind(options[letters.index(x)].lower()) for x in candidates]
  else:
    positions = [padded.rfind(f"({x})" if bracketed else f" {x} ") for x in candidates]
  return candidates[positions.index(max(positions))]


def parse_open(answer: str) -> set[str | float]:
  """Normalised key phrases and numbers of an open answer (module docstring)."""
  predictions: list[str] = []
  for phrase in key_phrases(answer):
    predictions += [phrase] + [n for pattern in NUMBER_PATTERNS for n in pattern.findall(phrase)]
  return {value for p in predictions for value in normalise(p)}


def key_phrases(answer: str) -> list[str]:
  answer = answer.strip().strip(".").lower()
  lines = re.split(r"\.\s(?=[A-Z])|\n", answer)  # the sentence split never fires on lower-cased text, as in lmms-eval
  found = []
  for i, line in enumerate(lines):
    indicators = KEY_INDICATORS + (("=",) if i == len(lines) - 1 else ())
    shortest = None
    for indicator in indicators:
      if indicator in line:
        tail = line.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in TRIVIAL_KEYS:
      found.append(shortest)
  return found or [answer]


def normalise(text: str) -> list[str | float]:
  text = text.strip()
  try:
    return [round(float(text.replace(",", "")), 2)]
  except ValueError:
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def open_match(reference: str, predictions: set[str | float]) -> bool:
  references = normalise(reference)
  for prediction in predictions:
    if isinstance(prediction, str):
      if any(isinstance(r, str) and r in prediction for r in references):
        return True
    elif prediction in references:
      return True
  return False


def aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
  return {"mmmu_acc": mean(scores), **grouped_means(samples, scores, "subject")}


TASK = Task("mmmu_val", load, prompt, judge, aggregate, "mmmu_acc", download_hint(REPO, "DIR"))
