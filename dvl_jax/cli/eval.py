"""`dvl eval`: scores a converted checkpoint on a benchmark task with several decoders (`evaluation.runner`).

Bad inputs (unknown task or decoder, missing data or checkpoint) are found before any weights load and end
with one line and exit code 2, like every `dvl` command.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from dvl_jax.cli.checkpoint_args import add_pixel_bounds, check_checkpoint, load_processor

DECODERS = "ar,static,dynamic,threshold"  # evaluation.runner.DECODERS, spelled out to keep `dvl --help` light


def add_parser(sub: Any) -> argparse.ArgumentParser:
  cmd = sub.add_parser(
      "eval", help="score a converted checkpoint on a benchmark with AR and block-diffusion decoding",
      description="Prints one table row per decoder (the task's metric, tokens per forward, NFE, tokens/s, "
      "seconds per answer) and writes results.json (and the sample logs) to --out.")
  cmd.add_argument("--checkpoint", required=True, help="converted checkpoint directory (required)")
  cmd.add_argument("--task", required=True, help="benchmark name, e.g. synthetic or mmmu_val; an unknown name "
                   "lists the known ones (required)")
  cmd.add_argument("--data", default=None, help="the task's data directory, or its argument for generated data "
                   "(default: the task's own; see dvl_jax/evaluation)")
  cmd.add_argument("--decoders", default=DECODERS,
                   help=f"comma-separated decoders among {DECODERS} (default: all)")
  cmd.add_argument("--limit", type=int, default=None, help="score the first N samples (default: all)")
  cmd.add_argument("--batch-size", type=int, default=8, help="answers generated together (default: 8)")
  cmd.add_argument("--gen-length", type=int, default=128, help="tokens generated per answer (default: 128)")
  cmd.add_argument("--steps", type=int, default=8, help="denoising passes per block, static (default: 8)")
  cmd.add_argument("--threshold", type=float, default=0.9,
                   help="confidence threshold of the dynamic and threshold decoders (default: 0.9)")
  cmd.add_argument("--out", default=None, help="directory for results.json and the sample logs (default: none)")
  cmd.add_argument("--log-samples", action="store_true",
                   help="write samples_DECODER.jsonl to --out as samples finish (default: off)")
  cmd.add_argument("--resume", action="store_true",
                   help="skip the samples already in --out's sample logs; implies --log-samples (default: start fresh)")
  add_pixel_bounds(cmd)
  cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
  return cmd


def run(args: argparse.Namespace) -> int:
  import dvl_jax as dvl
  from dvl_jax.evaluation.registry import get_task
  from dvl_jax.evaluation.runner import decoder_config, evaluate

  try:
    task = get_task(args.task)
  except KeyError as e:  # a KeyError's message prints quoted
    raise ValueError(e.args[0]) from None
  decoders = [d.strip() for d in args.decoders.split(",") if d.strip()]
  for name in decoders:
    decoder_config(name, gen_length=args.gen_length, steps=args.steps, threshold=args.threshold)
  if not decoders:
    raise ValueError("--decoders names no decoder")
  if args.limit is not None and args.limit < 1 or args.batch_size < 1:
    raise ValueError(f"--limit and --batch-size must be >= 1, got {args.limit} and {args.batch_size}")
  if (args.log_samples or args.resume) and args.out is None:
    raise ValueError("--log-samples and --resume need --out")
  if not list(itertools.islice(task.load(args.data), 1)):
    raise ValueError(f"task {task.name} has no samples in {args.data or 'its default data'}")
  check_checkpoint(args.checkpoint)
  processor = load_processor(args)
  evaluate(dvl.load(args.checkpoint), processor, task, data=args.data, decoders=decoders, limit=args.limit,
           batch_size=args.batch_size, gen_length=args.gen_length, steps=args.steps, threshold=args.threshold,
           log_samples=args.log_samples or args.resume, out_dir=args.out, resume=args.resume,
           progress=not args.no_progress)
  return 0
