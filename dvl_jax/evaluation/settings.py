"""What one `dvl eval` run is (task, data slice, decoders, model, output), checked in one place.

`dvl eval` builds `EvalSettings` from its options before any weights load and `dvl.evaluate` from its
arguments, so both refuse the same mistakes with the same one line; messages name the command-line option.

A resumed run reuses logged rows (answers, scores, NFE and seconds), which only mean something under the
settings they were logged with: a run that logs samples records its settings in `run.json`, and `--resume`
refuses, naming the setting and the fix, when the task, data, limit, model, batch size (the logged seconds
are per batch) or a decoder's config differ.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import tempfile
from typing import Any

from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.evaluation.registry import get_task
from dvl_jax.evaluation.task import Sample, Task

DECODERS: dict[str, dict[str, Any]] = {  # name -> SamplingConfig fields (block diffusion: block 8, spec §9)
    "ar": dict(algorithm="autoregressive"),
    "static": dict(remasking_strategy="low_confidence_static"),
    "dynamic": dict(remasking_strategy="low_confidence_dynamic"),
    "threshold": dict(remasking_strategy="threshold"),
}
# The options each decoder reads; the others keep SamplingConfig's defaults, so a resume is not refused over a
# setting that cannot change a decoder's answers (the AR decoder's threshold).
USES = {"ar": (), "static": ("steps",), "dynamic": ("steps", "confidence_threshold"),
        "threshold": ("confidence_threshold",)}
RUN_FILE = "run.json"
# A recorded setting -> the option that sets it (run-level keys and SamplingConfig fields).
OPTIONS = {"task": "--task", "data": "--data", "limit": "--limit", "model": "--checkpoint / --server",
           "batch_size": "--batch-size", "gen_length": "--gen-length", "steps": "--steps",
           "confidence_threshold": "--threshold"}
RUN_KEYS = ("task", "data", "limit", "model", "batch_size")


def decoder_config(name: str, *, gen_length: int = 128, steps: int = 8, threshold: float = 0.9) -> SamplingConfig:
  """The `SamplingConfig` of a named decoder: greedy, block 8, spec §9's gen length and steps (`USES`)."""
  if name not in DECODERS:
    raise ValueError(f"unknown decoder {name!r} (--decoders); known decoders: {', '.join(DECODERS)}")
  options = {"steps": steps, "confidence_threshold": threshold}
  return SamplingConfig(gen_length=gen_length, block_size=8, **{k: options[k] for k in USES[name]},
                        **DECODERS[name])


def sweep_name(threshold: float) -> str:
  """The row of the threshold decoder at one `--sweep-threshold` value, e.g. "threshold@0.7"."""
  return f"threshold@{threshold:g}"


def parse_floats(text: str, option: str) -> tuple[float, ...]:
  """"0.5,0.7,0.9" -> (0.5, 0.7, 0.9), or a one-line error naming `option`."""
  try:
    return tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise ValueError(f"{option} takes comma-separated numbers such as 0.5,0.7,0.9; got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """One evaluation run. `task` is a `Task` or its name; `decoders` are names of `DECODERS`; `sweep` adds the
  threshold decoder at each confidence threshold (rows `threshold@T`); `model_id` names the weights (checkpoint
  path or server URL) for the resume check; `resume` implies `log_samples`."""

  task: Task | str
  data: str | None = None
  decoders: tuple[str, ...] = tuple(DECODERS)
  sweep: tuple[float, ...] = ()
  limit: int | None = None
  batch_size: int = 8
  gen_length: int = 128
  steps: int = 8
  threshold: float = 0.9
  out_dir: str | None = None
  log_samples: bool = False
  resume: bool = False
  model_id: str | None = None

  def __post_init__(self):
    if isinstance(self.task, str):
      try:
        object.__setattr__(self, "task", get_task(self.task))
      except KeyError as e:  # a KeyError prints its message quoted
        raise ValueError(e.args[0]) from None
    object.__setattr__(self, "decoders", tuple(dict.fromkeys(self.decoders)))
    object.__setattr__(self, "sweep", tuple(dict.fromkeys(self.sweep)))
    object.__setattr__(self, "log_samples", self.log_samples or self.resume)
    if not self.decoders and not self.sweep:
      raise ValueError("no decoder to run: name some with --decoders or give --sweep-threshold values")
    for option, value in (("--limit", self.limit), ("--batch-size", self.batch_size),
                          ("--gen-length", self.gen_length), ("--steps", self.steps)):
      if value is not None and value < 1:
        raise ValueError(f"{option} must be >= 1, got {value}")
    for option, value in (("--threshold", self.threshold), *(("--sweep-threshold", t) for t in self.sweep)):
      if not 0.0 < value < 1.0:
        raise ValueError(f"{option} values are confidence thresholds in (0, 1), got {value}")
    if self.log_samples and self.out_dir is None:
      raise ValueError("--log-samples and --resume write to and read from an output directory: add --out DIR")
    if self.out_dir is not None:
      check_writable(self.out_dir)
    self.configs  # unknown decoder names fail here, before any weights load

  @functools.cached_property
  def configs(self) -> dict[str, SamplingConfig]:
    """Row name -> decoder config: the named decoders, then the threshold decoder at each sweep value."""
    configs = {name: decoder_config(name, gen_length=self.gen_length, steps=self.steps, threshold=self.threshold)
               for name in self.decoders}
    for t in self.sweep:
      configs[sweep_name(t)] = decoder_config("threshold", gen_length=self.gen_length, steps=self.steps,
                                              threshold=t)
    return configs

  def record(self) -> dict[str, Any]:
    """What `run.json` keeps: the settings every logged row depends on."""
    return {"task": self.task.name, "data": self.data, "limit": self.limit, "model": self.model_id,
            "batch_size": self.batch_size,
            "decoders": {name: dataclasses.asdict(c) for name, c in self.configs.items()}}

  def samples(self) -> list[Sample]:
    """The run's samples (the first `limit`), after the resume check; refuses an empty task."""
    if self.resume:
      self.check_resume()
    samples = list(itertools.islice(self.task.load(self.data), self.limit))
    if not samples:
      raise ValueError(f"task {self.task.name} has no samples in {self.data or 'its default data'}")
    return samples

  def check_resume(self) -> None:
    """Refuses to continue logs written under other settings (one line: the setting, both values, the fix)."""
    logged, now = read_record(self.out_dir), self.record()
    if logged is None:
      raise ValueError(f"nothing to resume in {self.out_dir} (no {RUN_FILE}): leave out --resume to start a run")
    for key in RUN_KEYS:
      if logged.get(key) != now[key]:
        raise ValueError(_refusal(self.out_dir, key, logged.get(key), now[key]))
    for name, config in now["decoders"].items():
      old = logged["decoders"].get(name)
      if old is None and os.path.exists(samples_log(self.out_dir, name)):
        raise ValueError(f"cannot resume {self.out_dir}: {os.path.basename(samples_log(self.out_dir, name))} is "
                         f"not from the run in {RUN_FILE}; delete it or leave out --resume to start over")
      for key in config:
        if old is not None and old.get(key) != config[key]:
          raise ValueError(_refusal(self.out_dir, key, old.get(key), config[key], decoder=name))

  def write_record(self) -> None:
    """Records this run's settings; a resumed run adds its new decoders to the logged ones."""
    record = self.record()
    if self.resume:
      record["decoders"] = {**read_record(self.out_dir)["decoders"], **record["decoders"]}
    os.makedirs(self.out_dir, exist_ok=True)
    with open(os.path.join(self.out_dir, RUN_FILE), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)


def check_writable(out_dir: str) -> None:
  """Creates the output directory now and writes a file in it: results come after hours of decoding, too late to
  find that they cannot be written."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    tempfile.TemporaryFile(dir=out_dir).close()
  except OSError as e:
    raise ValueError(f"--out {out_dir}: cannot write there ({e.strerror}); pass a directory this process can "
                     "write") from e


def samples_log(out_dir: str, decoder: str) -> str:
  return os.path.join(out_dir, f"samples_{decoder}.jsonl")


def read_record(out_dir: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, RUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _refusal(out_dir: str, key: str, logged: Any, now: Any, decoder: str | None = None) -> str:
  option = OPTIONS.get(key, key)
  fix = f"without {option}" if logged is None else f"{option} {logged}"
  if key not in OPTIONS:  # a field no option sets: the logs come from another version of dvl eval
    fix = "the dvl version that wrote them"
  where = f"decoder {decoder}: " if decoder else ""
  return (f"cannot resume {out_dir}: {where}the logged run has {key}={logged}, this one {key}={now}; rerun with "
          f"{fix}, or leave out --resume to start over")
