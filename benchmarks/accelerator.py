"""Attention backends, the samplers and a stage-2 train step on the device JAX finds, in one table (`dvl bench
accelerator`). Meant for one GPU or TPU host, where it finishes in under 8 minutes; `--tiny` runs every section
at tiny shapes on a CPU in seconds (the test does, so the script cannot rot).

- attention: one jitted forward + backward of `attend` per backend on the BD3-LM training mask over
  `[x_t ; x_0]`, 2L = 2k, 8k, 16k, Qwen2.5-VL-3B's attention shape (16 / 2 heads, head_dim 128), bf16, batch 1,
  timed as `benchmarks/attention.py` does: ms, TFLOP/s of the useful work (allowed query-key pairs only),
  speed against xla, the fraction of its own tiles the backend never computes. GPU: the own Pallas kernel,
  cuDNN, xla; TPU: splash, xla; CPU: the Pallas kernels interpreted. "auto" marks the one `attend()` picks.
- train: one stage-2 (BD3-LM) `TrainStep` of `benchmarks/train.py`'s 1b decoder (hidden 2048, 16 layers, GQA
  16 / 2, 151,936-row vocabulary; 1.3B params, text only), bf16 compute on fp32 master weights, 4 rows of
  L = 1024 (the decoder runs over 2L = 2048; about 27 GB by estimate, 21 of them weights, gradients and
  AdamW state). MFU = FLOPs / median step time / peak, FLOPs as `benchmarks/train.py`'s `matmul_flops`
  counts them: 6 x rows x (2L x layers x (h x head_dim x (2 q heads + 2 kv heads) + 3 x h x mlp) + L x h x
  vocab), the weights' matmuls (decoder over 2L, lm_head over the noised L), forward and backward;
  attention's QK / PV products are not counted. tokens/s: rows x L per second.
- sampler: `dvl.generate` on a randomly initialised Qwen2.5-VL-3B-shaped text model (36 layers, hidden 2048,
  GQA 16 / 2, 151,936-row vocabulary) in bf16, batch 1, 8, 32, 256 new tokens, `benchmarks/sampling.py`'s
  settings (AR; static, dynamic, threshold; reference vs fused commit). Its lm_head is untied (the 3B ties
  it; a forward reads the same bytes) and scaled so confidences spread as a trained model's do, and EOS is
  never emitted, so every row decodes every token. ms per forward = wall time / the batch's forwards (prefill
  included); the bound is the time to read the weights a forward uses once (decoder layers, final norm,
  lm_head: not the input embedding, of which a forward gathers a few rows) at the HBM bandwidth, and "of
  bound" = bound / ms per forward. tok/fwd = decoded tokens / row forwards. Compile = first call - best timed
  call, "cached" when a setting reuses an earlier one's program (strategy and threshold are arrays there).

Bandwidth and peak FLOP/s come from `benchmarks/devices.py` (a table keyed by `device_kind`; `--bandwidth-gbs`,
`--peak-tflops` override; measured on a device the table lacks). Each section has a share of `--budget-s`: a
cell not started by its section's deadline, or whose backend fails here (no cuDNN, out of memory), reads
"n/a: <reason>" and the run goes on; at the budget the table printed so far is final. The table is also
written as JSON (`--json`, default runs/accelerator.json) with the raw numbers behind each cell.

    python benchmarks/accelerator.py [--json PATH] [--budget-s 450] [--sections attention train sampler]
                                     [--batches 1 8 32] [--settings "AR greedy" "dynamic t0.85 fused" ...]
    python benchmarks/accelerator.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dvl_jax as dvl  # noqa: E402
from benchmarks import attention, devices, sampling, train  # noqa: E402
from dvl_jax.attention import cudnn, dispatch, pallas_gpu, splash  # noqa: E402
from dvl_jax.core.batch import IGNORE  # noqa: E402
from dvl_jax.core.config import QWEN25_VL_3B, ModelConfig  # noqa: E402
from dvl_jax.diffusion import sampler  # noqa: E402
from dvl_jax.models import layers  # noqa: E402
from dvl_jax.models.families import build_model  # noqa: E402
from dvl_jax.models.interface import path_names  # noqa: E402
from dvl_jax.testing.tiny import tiny_text_config  # noqa: E402
from dvl_jax.training.optimizer import OptimizerConfig  # noqa: E402
from dvl_jax.training.state import stage  # noqa: E402
from dvl_jax.training.step import TrainStep  # noqa: E402

COLUMNS = ("section", "setting", "shape", "ms", "rate", "efficiency", "detail", "compile s")
SECTIONS = ("attention", "train", "sampler")  # run in this order; the sampler, many small cells, takes what is left
DEADLINES = {"attention": 0.2, "train": 0.45, "sampler": 0.93}  # no cell of a section starts past this share
UNSUPPORTED = {"splash": splash.unsupported, "pallas_gpu": pallas_gpu.unsupported, "cudnn": cudnn.unsupported}
CPU_BACKENDS = ("xla", "pallas_gpu", "splash")  # the kernels interpreted: their code paths, not their speed
NOT_RUN = "not run"
XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # in the header and the JSON: an A/B of compiler flags is two runs
# Every batch gets these first, the other settings after: each new program compiles for 20-45 s on a GPU, and
# on an H200 the full grid did not fit the budget (batch 32's block diffusion was left out).
FIRST_SETTINGS = ("AR greedy", "static s8 reference (original)", "dynamic t0.85 fused", "threshold t0.9 fused")
LOGIT_GAP = 3.0  # the scaled lm_head's typical gap between the two best logits, in nats


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What every section runs at."""

  name: str
  lengths: tuple[int, ...]  # attention's 2L
  heads: tuple[int, int, int]  # attention's query heads, kv heads, head_dim
  sampler: ModelConfig
  batches: tuple[int, ...]
  settings: tuple[str, ...]  # the sampler's rows per batch: `benchmarks/sampling.py`'s SETTINGS names
  gen: int  # new tokens per row
  prompt: int  # row i's prompt has prompt + 3 i tokens (different lengths: per-row offsets)
  train: ModelConfig
  train_rows: int
  train_length: int  # L; the decoder runs over 2L
  repeats: int  # timed runs after the first (compiling) one
  copy_bytes: int  # the bandwidth measurement's array, for a device the table lacks
  matmul_n: int  # the peak FLOP/s measurement's matmul


def shapes(tiny: bool) -> Shapes:
  """The accelerator shapes of the module docstring, or tiny ones that run in seconds on a CPU."""
  if tiny:
    cfg = tiny_text_config(param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=False)
    return Shapes(name="tiny", lengths=(256,), heads=(cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim),
                  sampler=cfg, batches=(2,), settings=tuple(sampling.SETTINGS), gen=16, prompt=5,
                  train=tiny_text_config(compute_dtype="bfloat16"),
                  train_rows=2, train_length=32, repeats=1, copy_bytes=16 * 2**20, matmul_n=256)
  t = QWEN25_VL_3B.text
  sampler_cfg = QWEN25_VL_3B.replace(family="qwen2", vision=None, position_mode="flat", param_dtype="bfloat16",
                                     compute_dtype="bfloat16", text=dataclasses.replace(t, tie_word_embeddings=False),
                                     scan_layers=False)  # per-layer weights, read in place (`dvl generate`'s default)
  return Shapes(name="full", lengths=(2048, 8192, 16384), heads=(t.num_heads, t.num_kv_heads, t.head_dim),
                sampler=sampler_cfg, batches=(1, 8, 32), settings=tuple(sampling.SETTINGS), gen=256, prompt=64,
                train=train.model_config("1b", "bfloat16").replace(family="qwen2", vision=None), train_rows=4,
                train_length=1024, repeats=2, copy_bytes=2**30, matmul_n=8192)


@dataclasses.dataclass
class Row:
  """One line of the table: `cells` (ms ... compile s) and the raw `values` behind them, or why there are none."""

  section: str
  setting: str
  shape: str
  na: str | None = NOT_RUN
  cells: tuple[str, ...] = ()
  values: dict[str, Any] = dataclasses.field(default_factory=dict)

  def markdown(self) -> str:
    cells = self.cells if self.na is None else (f"n/a: {self.na}",) + ("-",) * (len(COLUMNS) - 4)
    return "| " + " | ".join((self.section, self.setting, self.shape, *cells)) + " |"


class Report:
  """The planned rows in table order, filled as cells are measured."""

  def __init__(self, limits: devices.DeviceLimits, shapes_name: str, budget_s: float):
    self.limits, self.shapes_name, self.budget_s = limits, shapes_name, budget_s
    self.rows: list[Row] = []
    self.lock = threading.Lock()  # the budget's watchdog thread prints the table too

  def plan(self, section: str, setting: str, shape: str) -> Row:
    self.rows.append(Row(section, setting, shape))
    return self.rows[-1]

  def header(self) -> str:
    d = self.limits
    return (f"{jax.device_count()} x {d.kind} ({d.platform}); HBM {d.bandwidth_gbs:.0f} GB/s ({d.bandwidth_source}), "
            f"peak {d.peak_tflops:.3g} TFLOP/s ({d.peak_source}); shapes {self.shapes_name}"
            + (f"; XLA_FLAGS={XLA_FLAGS}" if XLA_FLAGS else "")
            + f"; single rows as two (AR batch 1 as batch 2) on: {', '.join(layers.ONE_ROW_AS_TWO) or 'no backend'}")

  def markdown(self) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + [row.markdown() for row in self.rows])

  def to_json(self) -> dict[str, Any]:
    return {"device": dataclasses.asdict(self.limits), "device_count": jax.device_count(),
            "shapes": self.shapes_name, "budget_s": self.budget_s, "xla_flags": XLA_FLAGS,
            "one_row_as_two": list(layers.ONE_ROW_AS_TWO), "columns": list(COLUMNS),
            "rows": [dataclasses.asdict(row) for row in self.rows]}

  def emit(self, json_path: str) -> dict[str, Any]:
    """Prints the header and the table, writes the JSON; returns it."""
    with self.lock:
      text = json.dumps(self.to_json(), indent=1)
      print(self.header())
      print(self.markdown(), flush=True)
      os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
      with open(json_path, "w") as f:
        f.write(text)
      return json.loads(text)


class NotHere(Exception):
  """A backend that cannot run these inputs on this platform (its own reason, shown as it is)."""


def one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  text = text if isinstance(error, NotHere) else f"{type(error).__name__}: {text}"
  return text.replace("|", "/")[:160]


def measure(row: Row, deadline: float, cell: Callable[[], tuple[tuple[str, ...], dict[str, Any]]]) -> None:
  """Fills `row` from `cell()`; a cell past its section's deadline, or one that fails, says why instead."""
  if time.monotonic() > deadline:
    row.na = "past this section's share of --budget-s"
    return
  try:
    row.cells, row.values = cell()
    row.na = None
  except Exception as error:  # one backend or shape failing here (no cuDNN, out of memory) ends its cell only
    row.na = one_line(error)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
  """(seconds of the first call, best of `repeats` more, the last result), every result waited for."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first, best = time.perf_counter() - start, math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return first, best, out


# ---- attention -----------------------------------------------------------------------------------------------

def attention_backends() -> tuple[str, ...]:
  """xla first (the others are compared with it), then the platform's kernels."""
  platform = jax.default_backend()
  found = CPU_BACKENDS if platform == "cpu" else attention.DEFAULTS.get(platform, ((),))[0]
  return ("xla",) + tuple(b for b in found if b != "xla")


def plan_attention(report: Report, s: Shapes) -> dict[tuple[int, str], Row]:
  auto, interpreted = dispatch.resolve_backend("auto"), jax.default_backend() == "cpu"
  label = lambda b: b + (" (auto)" if b == auto else "") + (" (interpreted)" if interpreted and b != "xla" else "")
  return {(n, b): report.plan("attention", label(b), f"2L={n} fwd+bwd") for n in s.lengths
          for b in attention_backends()}


def attention_cell(backend: str, length: int, s: Shapes, xla: Row) -> tuple[tuple[str, ...], dict[str, Any]]:
  hq, hkv, d = s.heads
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  spec = attention.bd3_spec(1, length, s.sampler.block_size)
  keys = jax.random.split(jax.random.key(length), 4)
  q, do = (jax.random.normal(k, (1, length, hq, d), dtype) for k in keys[:2])
  k, v = (jax.random.normal(key, (1, length, hkv, d), dtype) for key in keys[2:])
  reason = UNSUPPORTED.get(backend, lambda *_: None)(q, k, v, spec)
  if reason is not None:
    raise NotHere(reason)
  step = attention.step(backend, spec)
  first, best, _ = timed(lambda: step(q, k, v, do), max(s.repeats, 2))
  flops, skipped = attention.useful_flops(spec, hq, d), attention.skipped(backend, spec, length)
  vs_xla = xla.values["ms"] / (1e3 * best) if xla.values else None
  values = {"backend": backend, "length": length, "ms": 1e3 * best, "useful_flops": flops,
            "tflops": flops / best / 1e12, "skipped": skipped, "vs_xla": vs_xla, "compile_s": first - best}
  return (f"{1e3 * best:.2f}", f"{values['tflops']:.2f} TFLOP/s", "-" if vs_xla is None else f"{vs_xla:.2f}x xla",
          f"{skipped:.1%} tiles skipped", f"{first - best:.1f}"), values


def run_attention(rows: dict[tuple[int, str], Row], s: Shapes, deadline: float) -> None:
  for (length, backend), row in rows.items():
    measure(row, deadline, functools.partial(attention_cell, backend, length, s, rows[length, "xla"]))


# ---- train -----------------------------------------------------------------------------------------------------

def plan_train(report: Report, s: Shapes) -> Row:
  return report.plan("train", "stage 2 (BD3-LM) step", f"{s.train_rows} x 2L={2 * s.train_length}")


def text_batch(cfg: ModelConfig, rows: int, length: int) -> dict[str, jax.Array]:
  """One micro-batch of random token rows, no padding, the last three quarters supervised (the answer)."""
  ids = np.random.default_rng(0).integers(3, min(1000, cfg.text.vocab_size - 8), (1, rows, length), dtype=np.int32)
  labels = np.where(np.arange(length) >= length // 4, ids, IGNORE)
  return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.ones_like(ids)}


def train_cell(s: Shapes, peak: float) -> tuple[tuple[str, ...], dict[str, Any]]:
  cfg, rows, length = s.train, s.train_rows, s.train_length
  model = build_model(cfg, nnx.Rngs(0))
  trainer = TrainStep(model, stage("stage2"), OptimizerConfig(), total_steps=1000, loss_chunk_size=1024)
  state = trainer.init(model)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  del model
  batch, key = text_batch(cfg, rows, length), jax.random.key(0)
  start = time.perf_counter()
  state, metrics = jax.block_until_ready(trainer(state, batch, key))
  first, times = time.perf_counter() - start, []
  for _ in range(max(s.repeats, 2)):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(trainer(state, batch, key))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops = train.matmul_flops(cfg, rows, length, stage2=True)
  t = cfg.text
  values = {"rows": rows, "length": length, "params": params, "step_s": step_s, "flops": flops, "peak_flops": peak,
            "mfu": flops / step_s / peak, "tokens_s": rows * length / step_s, "compile_s": first - step_s,
            "loss": float(metrics["loss"]), "model": {"hidden": t.hidden_size, "layers": t.num_layers,
            "heads": t.num_heads, "kv_heads": t.num_kv_heads, "head_dim": t.head_dim, "mlp": t.intermediate_size,
            "vocab": t.vocab_size}}
  return (f"{1e3 * step_s:.1f}", f"{values['tokens_s']:.0f} tok/s", f"MFU {values['mfu']:.1%}",
          f"{flops / 1e12:.3g} TFLOP/step, {params / 1e9:.3g}B params", f"{first - step_s:.1f}"), values


# ---- sampler ---------------------------------------------------------------------------------------------------

def plan_sampler(report: Report, s: Shapes) -> dict[tuple[int, str], Row]:
  return {(b, name): report.plan("sampler", name, f"batch {b}, {s.gen} new") for b in s.batches
          for name in s.settings}


def decoding_model(cfg: ModelConfig) -> Any:
  """A random model whose logits spread as a trained one's (top-two gap ~`LOGIT_GAP`) and never pick EOS."""
  model = build_model(cfg, nnx.Rngs(0))
  kernel = model.lm_head.kernel[...].astype(jnp.float32)
  vocab = cfg.text.vocab_size
  # Logits of a unit-RMS hidden state have std s; the best two of V normal draws lie ~s / sqrt(2 ln V) apart.
  target = LOGIT_GAP * math.sqrt(2 * math.log(vocab)) / math.sqrt(cfg.text.hidden_size)
  kernel = kernel * (target / jnp.std(kernel))
  eos = (slice(None),) * kernel.shape.index(vocab) + (cfg.eos_token_id,)
  model.lm_head.kernel[...] = kernel.at[eos].set(0.0).astype(model.lm_head.kernel.dtype)  # logit 0: far below the max
  return model


def weight_bytes(model: Any) -> int:
  """Bytes a forward reads once: every language param but the input embedding table (a few rows are gathered)."""
  t, state = model.config.text, nnx.state(model, nnx.Param)
  total = sum(x.nbytes for path, x in jax.tree.leaves_with_path(state)
              if model.param_group(path_names(path)) == "language")
  embedding = t.vocab_size * t.hidden_size * jnp.dtype(model.config.param_dtype).itemsize
  return total - (0 if t.tie_word_embeddings else embedding)


def sampler_cell(model: Any, prompts: Any, config: Any, s: Shapes, read_bytes: int, bandwidth: float
                 ) -> tuple[tuple[str, ...], dict[str, Any]]:
  traces = sum(sampler.TRACES.values())
  first, best, out = timed(lambda: dvl.generate(model, prompts, config), s.repeats)
  compiled = sum(sampler.TRACES.values()) > traces
  tokens, nfe = (out.steps_per_token >= 0).sum(1), out.nfe
  ms, bound_ms = 1e3 * best / out.forwards, 1e3 * read_bytes / bandwidth
  values = {"batch": len(nfe), "gen": config.gen_length, "tokens": tokens.tolist(), "nfe": nfe.tolist(),
            "forwards": int(out.forwards), "seconds": best, "tokens_s": float(tokens.sum() / best),
            "tokens_per_forward": float(tokens.sum() / nfe.sum()), "sampler_tokens_per_forward":
            out.tokens_per_forward.tolist(), "ms_per_forward": ms, "weight_bytes": read_bytes, "bandwidth": bandwidth,
            "bound_ms": bound_ms, "of_bound": bound_ms / ms, "compile_s": first - best if compiled else None}
  return (f"{ms:.2f}", f"{values['tokens_s']:.1f} tok/s", f"{bound_ms / ms:.0%} of {bound_ms:.3g} ms bound",
          f"{values['tokens_per_forward']:.2f} tok/fwd, NFE {nfe.mean():.0f}",
          f"{first - best:.1f}" if compiled else "cached"), values


def run_sampler(rows: dict[tuple[int, str], Row], s: Shapes, bandwidth: float, deadline: float) -> None:
  try:
    model = decoding_model(s.sampler)
  except Exception as error:  # e.g. out of memory: every sampler cell says so
    for row in rows.values():
      row.na = one_line(error)
    return
  read_bytes = weight_bytes(model)
  prompts = {}
  for batch in s.batches:
    ids = np.random.default_rng(batch).integers(3, min(1000, s.sampler.text.vocab_size - 8), s.prompt + 3 * batch)
    prompts[batch] = dvl.Prompts.from_lists([ids[:s.prompt + 3 * i].tolist() for i in range(batch)])
  first_pass = [key for key in rows if key[1] in FIRST_SETTINGS]
  for batch, name in first_pass + [key for key in rows if key not in first_pass]:
    config = dvl.SamplingConfig(gen_length=s.gen, **sampling.SETTINGS[name])
    cell = functools.partial(sampler_cell, model, prompts[batch], config, s, read_bytes, bandwidth)
    measure(rows[batch, name], deadline, cell)


# ---- the run ---------------------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, any device (CPU: seconds; what the test runs)")
  parser.add_argument("--json", default=os.path.join("runs", "accelerator.json"), help="where the JSON goes "
                      "(default: runs/accelerator.json)")
  parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for all sections (default 450)")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="(default: all)")
  parser.add_argument("--batches", type=int, nargs="+", help="the sampler's batch sizes, e.g. 32 alone to finish "
                      "a table a budget cut short (default: 1 8 32; --tiny: 2)")
  parser.add_argument("--settings", nargs="+", choices=list(sampling.SETTINGS), metavar="SETTING",
                      help="the sampler's settings, e.g. \"AR greedy\" alone at --batches 1 2 "
                      f"(default: all of {', '.join(sampling.SETTINGS)})")
  parser.add_argument("--plain-one-row-products", action="store_true",
                      help="a single row runs as one row on GPUs too (AR at batch 1 without its dead row, no product "
                      "doubled), as before `layers.ONE_ROW_AS_TWO`: the other half of that workaround's A/B "
                      "(default: off)")
  parser.add_argument("--bandwidth-gbs", type=float, help="HBM GB/s (default: the device table, else measured)")
  parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s (default: the device table, else measured)")
  args = parser.parse_args(argv)
  for name in ("budget_s", "bandwidth_gbs", "peak_tflops"):
    value = getattr(args, name)
    if value is not None and not value > 0:
      parser.error(f"--{name.replace('_', '-')} must be positive; got {value}")
  if args.batches is not None and min(args.batches) < 1:
    parser.error(f"--batches must be >= 1; got {args.batches}")
  if jax.default_backend() == "cpu" and not args.tiny:
    parser.error("JAX sees no GPU or TPU (install '.[cuda]' or '.[tpu]' on an accelerator host); "
                 "--tiny runs the tiny shapes on the CPU")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the chosen sections within the budget, prints the table, writes the JSON and returns it."""
  args = parse(argv)
  start = time.monotonic()
  os.environ.pop(dispatch.ENV_VAR, None)  # every backend is asked for by name here
  if args.plain_one_row_products:
    layers.ONE_ROW_AS_TWO = ()
  s = shapes(args.tiny)
  s = s if args.batches is None else dataclasses.replace(s, batches=tuple(args.batches))
  s = s if args.settings is None else dataclasses.replace(s, settings=tuple(dict.fromkeys(args.settings)))
  limits = devices.limits(args.bandwidth_gbs, args.peak_tflops, copy_bytes=s.copy_bytes, matmul_n=s.matmul_n)
  report = Report(limits, s.name, args.budget_s)
  attention_rows, train_row, sampler_rows = plan_attention(report, s), plan_train(report, s), plan_sampler(report, s)
  for row in report.rows:
    row.na = row.na if row.section in args.sections else "not asked for (--sections)"
  deadline = lambda section: start + DEADLINES[section] * args.budget_s  # noqa: E731

  def stop() -> None:  # a compile or a step that hangs past the budget: the table so far is the answer
    for row in report.rows:
      row.na = f"the run passed --budget-s {args.budget_s:g}" if row.na == NOT_RUN else row.na
    report.emit(args.json)
    os._exit(0)

  watchdog = threading.Timer(args.budget_s, stop)
  watchdog.daemon = True
  watchdog.start()
  if "attention" in args.sections:
    run_attention(attention_rows, s, deadline("attention"))
  if "train" in args.sections:
    measure(train_row, deadline("train"), functools.partial(train_cell, s, limits.peak))
  if "sampler" in args.sections:
    run_sampler(sampler_rows, s, limits.bandwidth, deadline("sampler"))
  watchdog.cancel()
  return report.emit(args.json)


if __name__ == "__main__":
  main()
