"""The evaluator behind `dvl eval`: one task, several decoders of the same model, scores and speed.

An answerer turns samples into answers: `InProcess` runs `dvl.generate` in batches of `batch_size` (the last
batch padded with repeats of its last sample, so one compile serves the whole run) after one untimed warm-up
batch, so tokens/s measures decoding rather than compilation; `evaluation.client.Server` asks a `dvl serve`
server. Each finished sample is appended to `samples_{decoder}.jsonl` at once: a crash or Ctrl-C keeps it, and
a resumed run (`EvalSettings.resume`, under the logged settings) skips the logged samples and reuses their
score, NFE, tokens and seconds, so the metrics and the speed of a resumed run cover every sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Generator, Iterator, NamedTuple, Sequence

from dvl_jax.core import mappings
from dvl_jax.diffusion.sampler import generate
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.evaluation import pareto
from dvl_jax.evaluation.settings import DECODERS, EvalSettings, decoder_config, samples_log
from dvl_jax.evaluation.task import Sample, Task

__all__ = ["DECODERS", "RESULTS_FILE", "SPEED_FIELDS", "Answer", "InProcess", "decoder_config", "evaluate",
           "results_table", "run", "samples_log", "speed"]

RESULTS_FILE = "results.json"
SPEED_FIELDS = ("tokens_per_forward", "nfe", "tokens_per_s", "s_per_answer")


class Answer(NamedTuple):
  """One decoded answer: its text (up to EOS), the model forwards and tokens it took, and its share of the
  wall time (the shares of a run add up to the run's decoding time)."""

  text: str
  nfe: int
  tokens: int
  seconds: float


# (task, pending samples, decoder config, batch size) -> (sample, answer) as each finishes, in any order.
Answerer = Callable[[Task, Sequence[Sample], SamplingConfig, int], Iterator[tuple[Sample, Answer]]]


@dataclasses.dataclass(frozen=True)
class InProcess:
  """Answers with `dvl.generate` on `model` in this process, `batch_size` samples per call. `timing_repeats`:
  each batch is generated that many times and its fastest run is its time (the answers are the same: greedy and
  seeded decoding repeat exactly), so a hiccup of a shared machine does not land on one decoder's row. A long
  run compiles per prompt shape and decoder; near the process's limit on memory mappings (`mappings.make_room`: a
  CPU compile past it aborts) the compiled programs are dropped before the next batch and compile again as needed."""

  model: Any
  processor: Any
  timing_repeats: int = 1

  def __post_init__(self):
    if self.timing_repeats < 1:
      raise ValueError(f"--timing-repeats must be >= 1, got {self.timing_repeats}")

  def __call__(self, task: Task, samples: Sequence[Sample], config: SamplingConfig,
               batch_size: int) -> Iterator[tuple[Sample, Answer]]:
    config = config.resolve(self.processor.config)
    batch_size = min(batch_size, len(samples))
    for start in range(0, len(samples), batch_size):
      chunk = samples[start:start + batch_size]
      padded = [*chunk, *chunk[-1:] * (batch_size - len(chunk))]
      inputs = self.processor([task.chat_prompt(s) for s in padded], [list(s.images) for s in padded])
      mappings.make_room()
      if start == 0:
        generate(self.model, inputs, config, tokenizer=self.processor.tokenizer)  # compile outside the timing
      fastest = float("inf")
      for _ in range(self.timing_repeats):
        tic = time.perf_counter()
        out = generate(self.model, inputs, config, tokenizer=self.processor.tokenizer)
        fastest = min(fastest, time.perf_counter() - tic)
      seconds = fastest / batch_size
      for row, sample in enumerate(chunk):
        yield sample, Answer(out.text[row], int(out.nfe[row]), int(out.lengths[row]), seconds)


def evaluate(model: Any, processor: Any, task: Task | str, *, progress: bool = True, timing_repeats: int = 1,
             **settings: Any) -> dict[str, Any]:
  """Scores `task` with each decoder of `model` in process; `settings` are `EvalSettings`' fields (data,
  decoders, sweep, limit, batch_size, gen_length, steps, threshold, out_dir, log_samples, resume, model_id);
  `timing_repeats`: see `InProcess`. Returns and writes (`out_dir`) the results and prints the table (`run`)."""
  return run(InProcess(model, processor, timing_repeats), EvalSettings(task, **settings), progress=progress,
             interleave=True)


def run(answer: Answerer, settings: EvalSettings, samples: Sequence[Sample] | None = None, *,
        progress: bool = True, interleave: bool = False) -> dict[str, Any]:
  """Scores the settings' samples (`samples`: already loaded by `settings.samples()`) with each decoder row.

  `interleave`: the decoders take turns, a sample (so a batch) each, instead of one whole row after another, so
  their timings come from the same minutes of a shared machine, whose speed drifts by tens of percent between
  them; for answerers that run one batch at a time (`InProcess`), not for a server's requests in flight.

  Returns `{"task", "metric", "samples", "decoders": {row: {"metrics", "speed", "config"}}, "plot"}` and,
  with `out_dir`, writes it to results.json next to the accuracy-vs-tokens/s plot (`pareto.PLOT_FILE`; "plot"
  holds the points drawn there, read back from the figure)."""
  samples = list(settings.samples() if samples is None else samples)
  task = settings.task
  if settings.log_samples:
    settings.write_record()
  results: dict[str, Any] = {"task": task.name, "metric": task.metric, "samples": len(samples), "decoders": {}}
  decoders = {name: _run_decoder(answer, task, samples, config, name=name, settings=settings, bar_line=line,
                                 log=samples_log(settings.out_dir, name) if settings.log_samples else None,
                                 progress=progress)
              for line, (name, config) in enumerate(settings.configs.items())}
  for name, rows in _drive(decoders, interleave).items():
    results["decoders"][name] = {"metrics": task.aggregate(samples, [r["score"] for r in rows]),
                                 "speed": speed(rows), "config": dataclasses.asdict(settings.configs[name])}
  if settings.out_dir is not None:
    os.makedirs(settings.out_dir, exist_ok=True)
    plot = os.path.join(settings.out_dir, pareto.PLOT_FILE)
    results["plot"] = {"file": pareto.PLOT_FILE, "points": pareto.plot(results, plot)}
    with open(os.path.join(settings.out_dir, RESULTS_FILE), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  print(results_table(results))
  return results


RowsOf = Generator[None, None, list[dict[str, Any]]]  # one decoder's run: a step per answered sample, then its rows


def _drive(decoders: dict[str, RowsOf], interleave: bool) -> dict[str, list[dict[str, Any]]]:
  """Runs each decoder's generator to its rows: one after another, or taking turns (`run`'s `interleave`)."""
  rows, active = {}, dict(decoders)
  while active:
    for name, steps in list(active.items()):
      try:
        while True:
          next(steps)
          if interleave:
            break
      except StopIteration as finished:
        rows[name] = finished.value
        del active[name]
  return {name: rows[name] for name in decoders}


def _run_decoder(answer: Answerer, task: Task, samples: list[Sample], config: SamplingConfig, *, name: str,
                 settings: EvalSettings, log: str | None, progress: bool, bar_line: int = 0) -> RowsOf:
  """One logged row per sample, in sample order: the logged ones (resume) and the newly answered ones; a step
  (`yield`) after each newly answered sample. `bar_line`: the line of its progress bar."""
  from tqdm import tqdm

  done = _read_log(log) if settings.resume and os.path.exists(log) else {}
  pending = [s for s in samples if s.id not in done]
  if log is not None:  # a fresh log, or the resumed one without a line a crash cut short
    with open(log, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row) + "\n" for row in done.values())
  bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=name, unit="answer",
             file=sys.stderr, disable=not progress, position=bar_line)
  for sample, a in (answer(task, pending, config, settings.batch_size) if pending else ()):
    judgement = task.score(sample, a.text)
    done[sample.id] = {"id": sample.id, "prompt": task.chat_prompt(sample), "answer": a.text,
                       "parsed": judgement.parsed, "score": judgement.score, "nfe": a.nfe, "tokens": a.tokens,
                       "seconds": a.seconds}
    if log is not None:
      with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(done[sample.id]) + "\n")
    bar.update(1)
    yield
  bar.close()
  return [done[s.id] for s in samples]


def _read_log(path: str) -> dict[str, dict[str, Any]]:
  """The logged rows by sample id; a last line cut short by a crash is dropped (that sample runs again)."""
  rows = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      rows[row["id"]] = row
  return rows


def speed(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Tokens per forward (all tokens / all forwards), mean NFE, tokens/s and seconds per answer of the rows."""
  tokens, nfe = sum(r["tokens"] for r in rows), sum(r["nfe"] for r in rows)
  seconds = sum(r["seconds"] for r in rows)
  return {"tokens_per_forward": tokens / max(nfe, 1), "nfe": nfe / len(rows),
          "tokens_per_s": tokens / seconds if seconds else 0.0, "s_per_answer": seconds / len(rows)}


def results_table(results: dict[str, Any]) -> str:
  """The markdown table: one row per decoder, the task's headline metric and the speed."""
  metric = results["metric"]
  lines = [f"| decoder | {metric} | tokens/forward | NFE | tokens/s | s/answer |", "|---|---|---|---|---|---|"]
  for name, r in results["decoders"].items():
    s = r["speed"]
    lines.append(f"| {name} | {r['metrics'][metric]:.4f} | {s['tokens_per_forward']:.2f} | {s['nfe']:.1f} | "
                 f"{s['tokens_per_s']:.1f} | {s['s_per_answer']:.3f} |")
  return "\n".join(lines)
