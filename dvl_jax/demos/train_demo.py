"""`dvl demo`: translate an AR VLM into a block-diffusion VLM on a CPU, end to end through the real paths.

1. a small Qwen2.5-VL-architecture model (random init) learns the synthetic coloured-shapes VQA task
   as an ordinary AR VLM (`dvl train`, stage "ar");
2. it is saved as a PyTorch / Hugging Face checkpoint (`dvl export`) and converted back (`dvl convert`),
   exactly what a user does with a Hub checkpoint;
3. stage-2 diffusion finetuning (`dvl train`, BD3-LM, block-aligned EOS) turns it into a block-diffusion
   VLM;
4. `dvl eval`'s evaluator scores held-out questions (another seed of the generator): AR greedy decoding
   of the source model vs static / dynamic / threshold block-diffusion decoding of the finetuned one, on
   the 23-token "cells" answers and on the one- to three-word ones apart, in one table: exact match, tokens
   per forward, NFE and tokens/s (compilation untimed).

AR training is a curriculum: first the short answers alone, then the long ones with twice as many short ones
(a balanced mix, also what BD3-LM trains on). Mixed in from the start (one question in six), the long answers
slowed the ViT's shape features: after 800 AR steps the model named the shape right 76% of the time (98% on
the short kinds alone), so AR got 57% of the long answers right and block diffusion 36%. With the
curriculum, same steps: AR 95-97%, block diffusion 98% on the long answers.

The speed-up comes from the long answers (several tokens per forward); the short ones end inside their first
block, where block diffusion has nothing to decode in parallel and costs a forward or more per token.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any


from dvl_jax.core.config import ModelConfig, TextConfig, VisionConfig
from dvl_jax.data import synthetic
from dvl_jax.data.word_tokenizer import word_tokenizer


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """Data, steps and learning rates of a demo run. The ViT and the projector train at
  `vision_learning_rate` in both stages: at the LM's 1e-3 their features churn from step to step, the LM
  learns to ignore them and even "what colour is the one shape" stays at chance for hundreds of steps."""

  train_examples: int
  eval_examples: int
  ar_steps: int
  diffusion_steps: int
  short_first_steps: int = 0  # AR steps on the one- to three-word answers alone, before `ar_steps` on every kind
  batch_size: int = 32
  ar_learning_rate: float = 1e-3
  diffusion_learning_rate: float = 1e-3
  vision_learning_rate: float = 3e-5
  latency_groups: bool = True  # evaluate `LATENCY_GROUPS` too (the quick run skips their compiles)
  per_layer: bool = True  # decode with per-layer weights (faster decoding; the quick run keeps the faster compiles)


VOCAB_SIZE = 128  # the generator's ~50 words, the chat markup and the reserved ids
FULL = DemoSize(train_examples=8192, eval_examples=256, short_first_steps=400, ar_steps=400, diffusion_steps=1000,
                diffusion_learning_rate=3e-4)
QUICK = DemoSize(train_examples=256, eval_examples=32, short_first_steps=20, ar_steps=40, diffusion_steps=40,
                 latency_groups=False, per_layer=False)

# The held-out questions are evaluated in two groups, since a batch decodes until its longest answer ends: the
# 23-token "cells" answers, where block diffusion decodes several tokens per forward, and the one- to three-word
# ones, which end inside the first 8-token block and leave nothing to decode in parallel.
GROUPS = {"long": ("cells",), "short": synthetic.QUESTION_KINDS}
# The long answers once more one question at a time ("long_b1": batch 1, the latency setting the paper and the
# original sampler measure). In a batch of 16 the 2-core CPU is compute-bound and a block-diffusion forward over
# 16 positions per row costs ~4.4 AR steps; alone it costs ~3 (decoder and logits: 0.56 vs 0.2 ms), so the
# 6x fewer forwards count for more. A repeat: its questions are not counted twice in the all-answers columns.
LATENCY_GROUPS = {"long_b1": "long"}
LATENCY_BATCH = 1
# Short rows per long one in the balanced mix of stages 1b and 2. At one each, a long answer's 23 tokens outweighed
# the short answers' one to three in the BD3 loss, and the block-diffusion model forgot where the shape is (position
# 66%: "top left" for most questions; short answers 94% vs AR's 99.5%).
SHORT_PER_LONG = 2
GEN_LENGTH = 24  # tokens: a long answer and its EOS, three blocks
BATCH_SIZE = 16
TIMING_REPEATS = 3  # each evaluated batch's time is its fastest of 3 runs: a decoder's row takes well under a second


def demo_model_config(vocab_size: int) -> ModelConfig:
  """A 4-layer Qwen2.5-VL: the ViT sees a 56-px image as 4x4 patches, i.e. one merged token per grid cell."""
  vision = VisionConfig(depth=4, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=128,
                        fullatt_block_indexes=(1, 3))
  text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                    num_kv_heads=2, rope_theta=10_000.0, tie_word_embeddings=False, mrope_section=(4, 6, 6),
                    max_position_embeddings=1024)
  return ModelConfig(vision=vision, text=text, image_token_id=vocab_size - 6, video_token_id=vocab_size - 5,
                     vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 3, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, mask_token_id=vocab_size - 1, position_mode="flat")


def init_checkpoint(dst: str, cfg: ModelConfig, tokenizer: Any, seed: int = 0) -> str:
  """A randomly initialised model in the converted-checkpoint layout, with its tokenizer."""
  from dvl_jax.testing import save_tiny_checkpoint

  return save_tiny_checkpoint(dst, cfg, seed=seed, tokenizer=tokenizer)


def run_config(stage: str, init: str, data_json: str, *, steps: int, learning_rate: float, size: DemoSize,
               seed: int = 0, log_every: int = 20) -> Any:
  """The `dvl train` config of one demo run: float32, no remat, 56-px images, the ViT and the projector at
  `size.vision_learning_rate`; stage 2 aligns each answer's EOS padding to the block size."""
  from dvl_jax.training.run_config import default_config

  c = default_config()
  c.stage, c.init_checkpoint, c.total_steps, c.seed = stage, init, steps, seed
  c.compute_dtype, c.remat_policy, c.attention_backend = "float32", "none", "xla"
  c.log_every, c.checkpoint_every, c.keep_checkpoints = log_every, steps, 1
  c.optimizer.learning_rate = learning_rate
  c.optimizer.vision_learning_rate = c.optimizer.projector_learning_rate = size.vision_learning_rate
  c.optimizer.warmup_ratio = 0.05
  c.data.json, c.data.batch_size, c.data.micro_batches = data_json, size.batch_size, 1
  c.data.max_length, c.data.length_multiple, c.data.num_threads = 128, 8, 2
  c.data.square_pad, c.data.block_aligned_eos = True, stage == "stage2"
  c.data.min_pixels = c.data.max_pixels = synthetic.IMAGE_SIZE ** 2
  return c


def split_by_answer_length(data_json: str) -> tuple[str, str]:
  """Two LLaVA JSONs next to `data_json` (same image folder): its short-answer rows alone, and its long ("cells")
  rows with `SHORT_PER_LONG` times as many short ones; returns their paths."""
  import json

  with open(data_json) as f:
    rows = json.load(f)
  cells = synthetic.QUESTIONS["cells"]
  long = [r for r in rows if r["conversations"][0]["value"].endswith(cells)]
  short = [r for r in rows if not r["conversations"][0]["value"].endswith(cells)]
  paths = tuple(os.path.join(os.path.dirname(data_json), f"{name}.json") for name in ("short", "balanced"))
  for path, subset in zip(paths, (short, long + short[:SHORT_PER_LONG * len(long)])):
    with open(path, "w") as f:
      json.dump(subset, f)
  return paths


def _train(workdir: str, config: Any, progress: bool) -> str:
  from dvl_jax.training.loop import train

  train(config, workdir, progress=progress)
  return os.path.join(workdir, "model")


def run(workdir: str | None = None, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
  """Runs the four stages; prints the evaluator's tables and returns `{group: results}` (`evaluate`), the run
  directory and the seconds it took."""
  import dvl_jax as dvl

  size = QUICK if quick else FULL
  workdir = workdir or tempfile.mkdtemp(prefix="dvl-demo-")
  tic = time.perf_counter()
  data_json = synthetic.write_dataset(os.path.join(workdir, "data"), size.train_examples, seed=1000 + seed,
                                      kinds=synthetic.ALL_KINDS)
  cfg = demo_model_config(VOCAB_SIZE)
  tokenizer = word_tokenizer(synthetic.corpus(), cfg)
  print(f"[1/4] AR training of a {cfg.text.num_layers}-layer Qwen2.5-VL on {size.train_examples} synthetic "
        f"VQA examples ({size.short_first_steps} steps on the short answers, then {size.ar_steps} on a balanced mix)")
  init = init_checkpoint(os.path.join(workdir, "init"), cfg, tokenizer, seed)
  short_json, balanced_json = split_by_answer_length(data_json)
  if size.short_first_steps:
    short_config = run_config("ar", init, short_json, steps=size.short_first_steps,
                              learning_rate=size.ar_learning_rate, size=size, seed=seed)
    init = _train(os.path.join(workdir, "ar_short"), short_config, progress)
  ar_config = run_config("ar", init, balanced_json, steps=size.ar_steps, learning_rate=size.ar_learning_rate,
                         size=size, seed=seed)
  ar_model = _train(os.path.join(workdir, "ar"), ar_config, progress)

  print("[2/4] dvl export (-> PyTorch / HF safetensors), dvl convert (-> dvl checkpoint)")
  hf_dir, source = os.path.join(workdir, "ar_hf"), os.path.join(workdir, "source")
  dvl.export(ar_model, hf_dir, progress=False)
  dvl.convert(hf_dir, source, progress=False)

  print(f"[3/4] stage-2 diffusion finetuning (BD3-LM, block size {cfg.block_size}, {size.diffusion_steps} steps)")
  diffusion_config = run_config("stage2", source, balanced_json, steps=size.diffusion_steps,
                                learning_rate=size.diffusion_learning_rate, size=size, seed=seed)
  diffusion_model = _train(os.path.join(workdir, "diffusion"), diffusion_config, progress)

  print(f"[4/4] dvl eval on {size.eval_examples} held-out questions (long and short answers apart)")
  results = evaluate(source, diffusion_model, os.path.join(workdir, "eval"),
                     data=f"{2000 + seed}:{size.eval_examples}:all", progress=progress,
                     latency_groups=LATENCY_GROUPS if size.latency_groups else {}, per_layer=size.per_layer)
  print(f"total {time.perf_counter() - tic:.0f} s; runs in {workdir}")
  return {"results": results, "workdir": workdir, "seconds": time.perf_counter() - tic}


def evaluate(source: str, diffusion: str, out_dir: str, *, data: str, batch_size: int = BATCH_SIZE,
             groups: dict[str, tuple[str, ...]] = GROUPS, pixels: int | None = synthetic.IMAGE_SIZE ** 2,
             latency_groups: dict[str, str] = LATENCY_GROUPS, timing_repeats: int = TIMING_REPEATS,
             progress: bool = True, per_layer: bool = True) -> dict[str, dict[str, Any]]:
  """The evaluator (`dvl eval --task synthetic --data DATA --log-samples`) on the held-out questions, the long
  answers and the short ones apart (`groups`), since a batch decodes until its longest answer ends: AR
  decoding of the source model, block diffusion of the finetuned one, both loaded per layer as `dvl eval` loads
  them (`per_layer`; False: stacked, faster compiles; `DATA`: the task's --data, "all" kinds for both groups),
  each with its own checkpoint's processor (`pixels`: Qwen2.5-VL's resize bounds; None for a family without
  them); each batch timed as its fastest of `timing_repeats` runs. `latency_groups`: groups
  evaluated once more at `LATENCY_BATCH` prompts per call, `{name: group}` (marked `"repeats": group` in the
  results). Prints each group's evaluator table, then `results_table`; writes each group's results.json and
  per-sample logs to `out_dir/<group>`; returns `{group: results}`."""
  import dvl_jax as dvl
  from dvl_jax.evaluation.runner import InProcess, run
  from dvl_jax.evaluation.settings import EvalSettings

  bounds = {} if pixels is None else dict(min_pixels=pixels, max_pixels=pixels)
  ar, block = (InProcess(dvl.load(path, scan_layers=not per_layer), dvl.Processor.from_pretrained(path, **bounds),
                         timing_repeats) for path in (source, diffusion))

  def answer(task, samples, config, size):
    return (ar if config.algorithm == "autoregressive" else block)(task, samples, config, size)

  results = {}
  runs = [(group, kinds, batch_size, None) for group, kinds in groups.items()]
  runs += [(name, groups[of], LATENCY_BATCH, of) for name, of in latency_groups.items()]
  for group, kinds, size, repeats in runs:
    settings = EvalSettings("synthetic", data=data, gen_length=GEN_LENGTH, batch_size=size,
                            out_dir=os.path.join(out_dir, group), log_samples=True)
    samples = [s for s in settings.samples() if s.metadata["kind"] in kinds]
    print(f"\n{group} answers ({', '.join(kinds)}, batches of {size}): {len(samples)} questions")
    results[group] = run(answer, settings, samples, progress=progress, interleave=True)
    if repeats is not None:
      results[group]["repeats"] = repeats
  print("\n" + results_table(results))
  print(speedup_line(results))
  return results


def combined(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Per decoder, over every group together (a group that `"repeats"` another's questions is left out):
  exact match, tokens/s (all tokens / all decoding seconds), tokens per forward and NFE per answer; and each
  group's own, as `{metric}/{group}`."""
  rows: dict[str, dict[str, float]] = {}
  for decoder in next(iter(results.values()))["decoders"]:
    n = tokens = forwards = seconds = correct = 0.0
    row = {}
    for group, r in results.items():
      metrics, speed, count = r["decoders"][decoder]["metrics"], r["decoders"][decoder]["speed"], r["samples"]
      row.update({f"exact_match/{group}": metrics["exact_match"], f"nfe/{group}": speed["nfe"],
                  f"tokens_per_forward/{group}": speed["tokens_per_forward"],
                  f"tokens_per_s/{group}": speed["tokens_per_s"]})
      if "repeats" in r:
        continue
      n, correct, forwards = n + count, correct + metrics["exact_match"] * count, forwards + speed["nfe"] * count
      tokens += speed["tokens_per_forward"] * speed["nfe"] * count
      seconds += speed["s_per_answer"] * count
    rows[decoder] = {"exact_match": correct / n, "tokens_per_s": tokens / seconds,
                     "tokens_per_forward": tokens / forwards, "nfe": forwards / n, **row}
  return rows


def results_table(results: dict[str, dict[str, Any]]) -> str:
  """One row per decoder: exact match and tokens/s over all answers (with the speed-up over AR), then per group
  the exact match, tokens per forward, NFE per answer and tokens/s: where the speed-up comes from."""
  rows, groups = combined(results), list(results)
  head = ["decoder", "exact match", "tokens/s", "x AR"]
  for group in groups:
    head += [f"exact match, {group}", f"tokens/forward, {group}", f"NFE, {group}", f"tokens/s, {group}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  ar = rows["ar"]["tokens_per_s"]
  for decoder, r in rows.items():
    cells = [decoder, f"{100 * r['exact_match']:.1f}%", f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / ar:.2f}"]
    for group in groups:
      cells += [f"{100 * r[f'exact_match/{group}']:.1f}%", f"{r[f'tokens_per_forward/{group}']:.2f}",
                f"{r[f'nfe/{group}']:.1f}", f"{r[f'tokens_per_s/{group}']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def passed(results: dict[str, dict[str, Any]]) -> bool:
  """The demo's accuracy bar (issue #16): every block-diffusion decoder >= 90% exact match, on all answers and on
  the long ones, and within 2 points of AR on all answers. Speed is reported (`speedup`), not gated: a shared
  machine's load moves it between runs."""
  rows = combined(results)
  ar = rows["ar"]
  return all(r["exact_match"] >= 0.9 and r["exact_match/long"] >= 0.9
             and r["exact_match"] >= ar["exact_match"] - 0.02 for decoder, r in rows.items() if decoder != "ar")


def speedup_line(results: dict[str, dict[str, Any]]) -> str:
  """Per group, the faster adaptive decoder's tokens/s over AR's and the tokens per forward behind it; with long
  answers, whether they meet `SPEEDUP_GOAL` (per batch size when they are also run at `LATENCY_BATCH`)."""
  rows, parts, verdicts = combined(results), [], []
  for group in results:
    best, ratio = speedup(results, group)
    per_forward = rows[best][f"tokens_per_forward/{group}"]
    parts.append(f"{group} answers: {best} {ratio:.2f}x AR's tokens/s at {per_forward:.2f} tokens per forward")
    if "long" in (group, results[group].get("repeats")):
      where = f" at batch {LATENCY_BATCH}" if "repeats" in results[group] else ""
      verdicts.append(f"{'met' if ratio >= SPEEDUP_GOAL else 'not met'}{where}")
  verdict = f" (goal {SPEEDUP_GOAL}x on the long answers: {', '.join(verdicts)})" if verdicts else ""
  return f"block diffusion vs AR: {'; '.join(parts)}{verdict}"


SPEEDUP_GOAL = 1.5  # issue #16: dynamic or threshold decoding vs AR, tokens/s


def speedup(results: dict[str, dict[str, Any]], group: str = "long") -> tuple[str, float]:
  """The faster adaptive decoder (dynamic or threshold) and its tokens/s over AR's on `group`'s answers."""
  rows = combined(results)
  key = f"tokens_per_s/{group}"
  best = max(("dynamic", "threshold"), key=lambda d: rows[d][key])
  return best, rows[best][key] / rows["ar"][key]
