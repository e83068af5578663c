"""What a benchmark is to the evaluator: samples, a prompt builder and a scorer (design §7).

A `Task` knows nothing about models: the runner turns `Task.chat_prompt(sample)` and `sample.images`
into an answer by any decoder (in process or through the server) and hands the decoded text back to
`Task.score`. Scoring applies DiffusionVL's answer clean-up (spec §9.2: first line, `strip()`, one
trailing ".") once, here, so every decoder and the server path are scored on the same string; the
task's own parsing (lmms-eval's filters, its `strip()`, then `process_results` or the metric) runs on the
cleaned answer, as in the original evaluation, where the model wrapper cleaned before lmms-eval parsed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from PIL import Image

from dvl_jax.data.chat_template import generation_prompt
from dvl_jax.data.processor import IMAGE_MARKER
from dvl_jax.diffusion.sampling_config import clean_answer


@dataclasses.dataclass(frozen=True)
class Sample:
  """One benchmark question.

  `question` is the dataset's text as stored (the prompt builder adds options and the post-prompt);
  `options` the answer choices in order (empty for open questions); `answers` the reference
  answer(s) as the scorer compares them; `metadata` what an aggregate needs (MME's category and
  image, MMMU's question type, MMStar's categories, ChartQA's split).
  """

  id: str
  question: str
  images: tuple[Image.Image, ...]
  answers: tuple[str, ...]
  options: tuple[str, ...] = ()
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Judgement(NamedTuple):
  """The scorer's verdict on one answer: what it understood (`parsed`, for the sample logs) and `score`."""

  parsed: str
  score: float


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark: `load(data)` yields samples, `prompt(sample)` is the user text (question, options,
  post-prompt), `judge(sample, cleaned_answer)` scores one answer, `aggregate(samples, scores)` gives
  the metrics, `metric` names the headline one. `data_hint` says what `--data` is for this task
  (a download command, or the meaning of the optional argument for generated / bundled data)."""

  name: str
  load: Callable[[str | None], Iterator[Sample]]
  prompt: Callable[[Sample], str]
  judge: Callable[[Sample, str], Judgement]
  aggregate: Callable[[Sequence[Sample], Sequence[float]], dict[str, float]]
  metric: str
  data_hint: str

  def score(self, sample: Sample, answer: str) -> Judgement:
    """Scores the decoded answer text (up to EOS) after the spec §9.2 clean-up."""
    return self.judge(sample, clean_answer(answer))

  def chat_prompt(self, sample: Sample) -> str:
    """The whole prompt (spec §9.2 step 2): the `qwen_2_5` chat with one `<image>` per image in front of
    the user text, unless the text already places its images."""
    text = self.prompt(sample)
    if IMAGE_MARKER in text:
      return generation_prompt(text, num_images=0)
    return generation_prompt(text, num_images=len(sample.images))
