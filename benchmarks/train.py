"""Training speed: stage 1 (AR, projector only) and stage 2 (BD3-LM, everything) train steps.

A Qwen2.5-VL of the chosen size trains on synthetic coloured-shapes VQA batches from the real pipeline
(images 112 px -> 16 image tokens, answers padded to blocks for stage 2). Columns: step time (median
after compile), tokens/s (attended tokens of the batch per second; stage 2 runs the decoder over 2L),
images/s, compile seconds (first step), peak memory (host RSS on CPU, device peak bytes on GPU/TPU),
and MFU on accelerators (6 * trainable-aware matmul FLOPs per token; peak FLOP/s from `--peak-tflops`).

    python benchmarks/train.py [--size small|1b] [--batch 16] [--steps 5] [--stage stage1 stage2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import psutil
from flax import nnx
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dvl_jax.core.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from dvl_jax.data import synthetic  # noqa: E402
from dvl_jax.data.pipeline import DataConfig, DataPipeline  # noqa: E402
from dvl_jax.data.processor import Processor  # noqa: E402
from dvl_jax.data.word_tokenizer import word_tokenizer  # noqa: E402
from dvl_jax.models.families import build_model  # noqa: E402
from dvl_jax.parallel.mesh import make_mesh  # noqa: E402
from dvl_jax.training.optimizer import OptimizerConfig  # noqa: E402
from dvl_jax.training.state import stage  # noqa: E402
from dvl_jax.parallel.rules import shard_model
from dvl_jax.training.step import TrainStep  # noqa: E402

SIZES = {  # (text hidden, layers, heads, kv heads, mlp, vocab), (vision hidden, depth, heads, mlp)
    "small": ((512, 8, 8, 2, 1536, 1024), (256, 8, 4, 768)),
    "1b": ((2048, 16, 16, 2, 5632, 151936), (1280, 32, 16, 3420)),  # Qwen2.5's vocabulary
}


def model_config(size: str, dtype: str) -> ModelConfig:
  (h, n, heads, kv, mlp, vocab), (vh, depth, vheads, vmlp) = SIZES[size]
  vision = VisionConfig(depth=depth, hidden_size=vh, num_heads=vheads, intermediate_size=vmlp, out_hidden_size=h,
                        fullatt_block_indexes=tuple(range(depth // 4 - 1, depth, depth // 4)))
  text = TextConfig(vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_layers=n, num_heads=heads,
                    num_kv_heads=kv, tie_word_embeddings=False, mrope_section=(h // heads // 8, h // heads // 16 * 3,
                                                                                h // heads // 16 * 3))
  return ModelConfig(vision=vision, text=text, image_token_id=1018, video_token_id=1019, vision_start_token_id=1020,
                     vision_end_token_id=1021, bos_token_id=1, eos_token_id=2, pad_token_id=0, mask_token_id=1023,
                     compute_dtype=dtype, remat_policy="full")


def peak_memory_gb() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30
  return psutil.Process().memory_info().rss / 2**30


def matmul_flops(cfg: ModelConfig, rows: int, length: int, stage2: bool) -> float:
  """Training matmul FLOPs of a batch: 3 * forward (2 * weights per token), the backward doubling it
  for every layer (gradients flow through all of them: the projector sits below the decoder). Stage 2
  runs the decoder over `[x_t ; x_0]` (2L) but the lm_head over x_t only (L)."""
  t = cfg.text
  per_layer = 2 * (t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads) + 3 * t.hidden_size
                   * t.intermediate_size)
  decoder_tokens = rows * length * (2 if stage2 else 1)
  return 3 * (decoder_tokens * t.num_layers * per_layer + rows * length * 2 * t.hidden_size * t.vocab_size)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="small")
  parser.add_argument("--stage", nargs="+", default=["stage1", "stage2"])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="float32" if jax.default_backend() == "cpu" else "bfloat16")
  parser.add_argument("--loss-chunk", type=int, default=1024, help="loss_chunk_size (default: 1024, as configs/)")
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak (H100 bf16 dense: 989)")
  args = parser.parse_args()

  cfg = model_config(args.size, args.dtype)
  processor = Processor(word_tokenizer(synthetic.corpus(), cfg),
                        Qwen2VLImageProcessor(min_pixels=112 * 112, max_pixels=112 * 112), cfg)
  rows = [synthetic.llava_row(ex, f"b{i}") for i, ex in enumerate(synthetic.examples(4 * args.batch, 0,
                                                                                      image_size=112))]
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model {args.size}, dtype {args.dtype}, "
        f"batch {args.batch}")
  print("| stage | params (trainable) | seq len | step s | tokens/s | images/s | compile s | peak mem GB | MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.stage:
    data = DataConfig(batch_size=args.batch, micro_batches=1, max_length=256, num_buckets=1, length_multiple=8,
                      block_aligned_eos=name == "stage2", num_threads=2)
    batches = iter(DataPipeline(rows, processor, data, mesh))
    model = shard_model(build_model(cfg, nnx.Rngs(0)), mesh)
    trainer = TrainStep(model, stage(name), OptimizerConfig(), total_steps=1000, mesh=mesh,
                        loss_chunk_size=args.loss_chunk)
    state = trainer.init(model)
    total = sum(x.size for x in jax.tree.leaves(state.params) + jax.tree.leaves(state.frozen))
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    batch = next(batches)
    tic = time.perf_counter()
    state, metrics = trainer(state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    compile_s, times = time.perf_counter() - tic, []
    for _ in range(args.steps):
      batch = next(batches)
      tic = time.perf_counter()
      state, metrics = trainer(state, batch, jax.random.key(0))
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - tic)
    step = statistics.median(times)
    tokens, images = float(metrics["tokens"]), float(metrics["images"])
    length = batch["input_ids"].shape[-1]
    mfu = "-"
    if jax.default_backend() != "cpu":
      flops = matmul_flops(cfg, args.batch, length, name == "stage2")
      mfu = f"{100 * flops / step / (args.peak_tflops * 1e12):.1f}%"
    print(f"| {name} | {total / 1e6:.1f}M ({trainable / 1e6:.2f}M) | {length * (2 if name == 'stage2' else 1)} | {step:.3f} | {tokens / step:.0f} | "
          f"{images / step:.1f} | {compile_s:.1f} | {peak_memory_gb():.2f} | {mfu} |")


if __name__ == "__main__":
  main()
