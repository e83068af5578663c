"""`dvl demo`: translate an AR VLM into a block-diffusion VLM on a CPU, end to end through the real paths.

1. a small Qwen2.5-VL-architecture model (random init) learns the synthetic coloured-shapes VQA task
   as an ordinary AR VLM (`dvl train`, stage "ar");
2. it is saved as a PyTorch / Hugging Face checkpoint (`dvl export`) and converted back (`dvl convert`),
   exactly what a user does with a Hub checkpoint;
3. stage-2 diffusion finetuning (`dvl train`, BD3-LM, block-aligned EOS) turns it into a block-diffusion
   VLM;
4. both answer held-out questions (another seed of the generator): AR greedy decoding of the source
   model vs static / dynamic / threshold block-diffusion decoding, exact match, tokens per forward (also
   on the three-word descriptions, the only answers long enough to decode several tokens per step), tok/s.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any


from dvl_jax.core.config import ModelConfig, TextConfig, VisionConfig
from dvl_jax.data import synthetic
from dvl_jax.data.chat_template import generation_prompt
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
  batch_size: int = 32
  ar_learning_rate: float = 1e-3
  diffusion_learning_rate: float = 1e-3
  vision_learning_rate: float = 3e-5


VOCAB_SIZE = 128  # the generator's ~50 words, the chat markup and the reserved ids
FULL = DemoSize(train_examples=8192, eval_examples=256, ar_steps=800, diffusion_steps=500, diffusion_learning_rate=3e-4)
QUICK = DemoSize(train_examples=256, eval_examples=32, ar_steps=40, diffusion_steps=40)

DECODERS = {  # name -> SamplingConfig fields
    "AR greedy (source model)": dict(algorithm="autoregressive"),
    "block diffusion, static (8 steps)": dict(remasking_strategy="low_confidence_static", steps=8),
    "block diffusion, dynamic (tau 0.85)": dict(remasking_strategy="low_confidence_dynamic",
                                                confidence_threshold=0.85),
    "block diffusion, threshold (tau 0.9)": dict(remasking_strategy="threshold", confidence_threshold=0.9),
}


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


def _train(workdir: str, config: Any, progress: bool) -> str:
  from dvl_jax.training.loop import train

  train(config, workdir, progress=progress)
  return os.path.join(workdir, "model")


def evaluate(model: Any, processor: Any, examples: list[synthetic.Example], sampling: dict[str, Any],
             batch_size: int = 32) -> dict[str, float]:
  """Exact match of the decoded answer, tokens per forward (decoded tokens / model forwards) overall and
  on the three-word descriptions, and tok/s (after an untimed first batch)."""
  import dvl_jax as dvl

  config = dvl.SamplingConfig(gen_length=8, length_bucket=16, **sampling)
  correct, tokens, forwards, seconds = 0, 0, 0, 0.0
  described = [0, 0]  # tokens, forwards of the "describe" rows
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    inputs = processor([generation_prompt(ex.question) for ex in chunk], [[ex.image] for ex in chunk])
    if start == 0:  # compile outside the timing (tokens/s used to include it and moved a lot between runs)
      dvl.generate(model, inputs, config, tokenizer=processor.tokenizer)
    tic = time.perf_counter()
    out = dvl.generate(model, inputs, config, tokenizer=processor.tokenizer)
    seconds += time.perf_counter() - tic
    correct += sum(text.strip() == ex.answer for text, ex in zip(out.text, chunk))
    tokens += int(out.lengths.sum())
    forwards += int(out.nfe.sum())
    for ex, length, nfe in zip(chunk, out.lengths, out.nfe):
      if ex.kind == "describe":
        described[0], described[1] = described[0] + int(length), described[1] + int(nfe)
  return {"exact_match": correct / len(examples), "tokens_per_forward": tokens / forwards,
          "tokens_per_forward_describe": described[0] / max(1, described[1]), "tokens_per_s": tokens / seconds}


def run(workdir: str | None = None, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
  """Runs the four stages; prints and returns `{decoder: metrics}` plus the run directories."""
  import dvl_jax as dvl

  size = QUICK if quick else FULL
  workdir = workdir or tempfile.mkdtemp(prefix="dvl-demo-")
  tic = time.perf_counter()
  data_json = synthetic.write_dataset(os.path.join(workdir, "data"), size.train_examples, seed=1000 + seed)
  held_out = synthetic.examples(size.eval_examples, seed=2000 + seed)
  cfg = demo_model_config(VOCAB_SIZE)
  tokenizer = word_tokenizer(synthetic.corpus(), cfg)
  print(f"[1/4] AR training of a {cfg.text.num_layers}-layer Qwen2.5-VL on {size.train_examples} synthetic "
        f"VQA examples ({size.ar_steps} steps)")
  init = init_checkpoint(os.path.join(workdir, "init"), cfg, tokenizer, seed)
  ar_config = run_config("ar", init, data_json, steps=size.ar_steps, learning_rate=size.ar_learning_rate,
                         size=size, seed=seed)
  ar_model = _train(os.path.join(workdir, "ar"), ar_config, progress)

  print("[2/4] dvl export (-> PyTorch / HF safetensors), dvl convert (-> dvl checkpoint)")
  hf_dir, source = os.path.join(workdir, "ar_hf"), os.path.join(workdir, "source")
  dvl.export(ar_model, hf_dir, progress=False)
  dvl.convert(hf_dir, source, progress=False)

  print(f"[3/4] stage-2 diffusion finetuning (BD3-LM, block size {cfg.block_size}, {size.diffusion_steps} steps)")
  diffusion_config = run_config("stage2", source, data_json, steps=size.diffusion_steps,
                                learning_rate=size.diffusion_learning_rate, size=size, seed=seed)
  diffusion_model = _train(os.path.join(workdir, "diffusion"), diffusion_config, progress)

  print(f"[4/4] evaluation on {size.eval_examples} held-out questions")
  processor = dvl.Processor.from_pretrained(source, min_pixels=synthetic.IMAGE_SIZE ** 2,
                                            max_pixels=synthetic.IMAGE_SIZE ** 2)
  models = {"source": dvl.load(source), "diffusion": dvl.load(diffusion_model)}
  results = {}
  for name, sampling in DECODERS.items():
    model = models["source" if sampling.get("algorithm") == "autoregressive" else "diffusion"]
    results[name] = evaluate(model, processor, held_out, sampling)
  print(results_table(results))
  print(f"total {time.perf_counter() - tic:.0f} s; runs in {workdir}")
  return {"results": results, "workdir": workdir, "seconds": time.perf_counter() - tic}


def results_table(results: dict[str, dict[str, float]]) -> str:
  lines = ["| decoder | exact match | tokens / forward | tokens / forward, descriptions | tokens / s |",
           "|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {100 * r['exact_match']:.1f}% | {r['tokens_per_forward']:.2f} | "
                 f"{r['tokens_per_forward_describe']:.2f} | {r['tokens_per_s']:.0f} |")
  return "\n".join(lines)


def passed(results: dict[str, dict[str, float]]) -> bool:
  """The demo's bar: every block-diffusion decoder >= 90% exact match and within 5 points of AR."""
  ar = results["AR greedy (source model)"]["exact_match"]
  diffusion = [r["exact_match"] for name, r in results.items() if name.startswith("block diffusion")]
  return all(em >= 0.9 and em >= ar - 0.05 for em in diffusion)
