"""The in-process evaluator behind `dvl eval`: one task, several decoders of the same model, scores and speed.

Every decoder answers the same samples in batches of `batch_size` (the last batch is padded with repeats of
its last sample, so one compile serves the whole run) after one untimed warm-up batch, so tokens/s measures
decoding rather than compilation. Each finished sample is appended to `samples_{decoder}.jsonl` at once:
a crash or Ctrl-C keeps it, and `resume=True` skips the logged samples and reuses their logged score, NFE,
tokens and seconds, so the metrics and the speed of a resumed run cover every sample.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Any, Sequence

from dvl_jax.diffusion.sampler import generate
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.evaluation.registry import get_task
from dvl_jax.evaluation.task import Sample, Task

DECODERS: dict[str, dict[str, Any]] = {  # name -> SamplingConfig fields (block diffusion: block 8, spec §9)
    "ar": dict(algorithm="autoregressive"),
    "static": dict(remasking_strategy="low_confidence_static"),
    "dynamic": dict(remasking_strategy="low_confidence_dynamic"),
    "threshold": dict(remasking_strategy="threshold"),
}
RESULTS_FILE = "results.json"
SPEED_FIELDS = ("tokens_per_forward", "nfe", "tokens_per_s", "s_per_answer")


def decoder_config(name: str, *, gen_length: int = 128, steps: int = 8, threshold: float = 0.9) -> SamplingConfig:
  """The `SamplingConfig` of a named decoder: greedy, spec §9's gen length, steps and block 8."""
  if name not in DECODERS:
    raise ValueError(f"unknown decoder {name!r}; known decoders: {', '.join(DECODERS)}")
  return SamplingConfig(gen_length=gen_length, steps=steps, block_size=8, confidence_threshold=threshold,
                        **DECODERS[name])


def samples_log(out_dir: str, decoder: str) -> str:
  return os.path.join(out_dir, f"samples_{decoder}.jsonl")


def evaluate(model: Any, processor: Any, task: Task | str, *, data: str | None = None,
             decoders: Sequence[str] = tuple(DECODERS), limit: int | None = None, batch_size: int = 8,
             gen_length: int = 128, steps: int = 8, threshold: float = 0.9, log_samples: bool = False,
             out_dir: str | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
  """Scores `task` (the first `limit` samples) with each decoder; returns and writes (`out_dir`) the
  results: `{"task", "metric", "decoders": {name: {"metrics", "speed", "config"}}}`, and prints the table."""
  task = get_task(task) if isinstance(task, str) else task
  configs = {name: decoder_config(name, gen_length=gen_length, steps=steps, threshold=threshold)
             for name in decoders}
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be >= 1, got {limit}")
  if (log_samples or resume) and out_dir is None:
    raise ValueError("sample logs and resume need an output directory (out_dir)")
  if resume and not log_samples:
    raise ValueError("resume continues from the sample logs; turn on log_samples")
  samples = list(itertools.islice(task.load(data), limit))
  if not samples:
    raise ValueError(f"task {task.name} has no samples in {data or 'its default data'}")
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
  results: dict[str, Any] = {"task": task.name, "metric": task.metric, "samples": len(samples), "decoders": {}}
  for name, config in configs.items():
    log = samples_log(out_dir, name) if log_samples else None
    rows = _run_decoder(model, processor, task, samples, config.resolve(processor.config), name=name,
                        batch_size=batch_size, log=log, resume=resume, progress=progress)
    results["decoders"][name] = {"metrics": task.aggregate(samples, [r["score"] for r in rows]),
                                 "speed": speed(rows), "config": dataclasses.asdict(config)}
  if out_dir is not None:
    with open(os.path.join(out_dir, RESULTS_FILE), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  print(results_table(results))
  return results


def _run_decoder(model: Any, processor: Any, task: Task, samples: list[Sample], config: SamplingConfig, *,
                 name: str, batch_size: int, log: str | None, resume: bool, progress: bool) -> list[dict[str, Any]]:
  """One logged row per sample, in sample order: the logged ones (resume) and the newly generated ones."""
  from tqdm import tqdm

  done = _read_log(log) if resume and log and os.path.exists(log) else {}
  pending = [s for s in samples if s.id not in done]
  batch_size = min(batch_size, max(len(pending), 1))
  if log is not None:  # a fresh log, or the resumed one without a line a crash cut short
    with open(log, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row) + "\n" for row in done.values())
  bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=name, unit="answer",
             file=sys.stderr, disable=not progress)
  for start in range(0, len(pending), batch_size):
    chunk = pending[start:start + batch_size]
    padded = chunk + chunk[-1:] * (batch_size - len(chunk))
    prompts = [task.chat_prompt(s) for s in padded]
    inputs = processor(prompts, [list(s.images) for s in padded])
    if start == 0:
      generate(model, inputs, config, tokenizer=processor.tokenizer)  # warm-up: compile outside the timing
    tic = time.perf_counter()
    out = generate(model, inputs, config, tokenizer=processor.tokenizer)
    seconds = (time.perf_counter() - tic) / batch_size
    for row, sample in enumerate(chunk):
      judgement = task.score(sample, out.text[row])
      done[sample.id] = {"id": sample.id, "prompt": prompts[row], "answer": out.text[row],
                         "parsed": judgement.parsed, "score": judgement.score, "nfe": int(out.nfe[row]),
                         "tokens": int(out.lengths[row]), "seconds": seconds}
      if log is not None:
        with open(log, "a", encoding="utf-8") as f:
          f.write(json.dumps(done[sample.id]) + "\n")
    bar.update(len(chunk))
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
