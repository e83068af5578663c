"""`dvl eval`: scores a converted checkpoint, in process or through a `dvl serve` server, on a benchmark task
with several decoders (`evaluation.runner`).

Bad inputs (unknown task or decoder, missing data or checkpoint, a resume under other settings) are found by
`evaluation.settings.EvalSettings` before any weights load and end with one line and exit code 2, like every
`dvl` command.
"""

from __future__ import annotations

import argparse
from typing import Any

from dvl_jax.cli.checkpoint_args import (add_layer_layout, add_pixel_bounds, check_checkpoint, load_options,
                                         load_processor)

DECODERS = "ar,static,dynamic,threshold"  # evaluation.settings.DECODERS, spelled out to keep `dvl --help` light


def add_parser(sub: Any) -> argparse.ArgumentParser:
  cmd = sub.add_parser(
      "eval", help="score a converted checkpoint on a benchmark with AR and block-diffusion decoding",
      description="Prints one table row per decoder (the task's metric, tokens per forward, NFE, tokens/s, "
      "seconds per answer) and writes results.json, the accuracy-vs-tokens/s plot pareto.png (and the sample "
      "logs) to --out.")
  model = cmd.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", help="converted checkpoint directory, run in this process (required: this or --server)")
  model.add_argument("--server", help="URL of a `dvl serve` server to ask through its OpenAI API, e.g. "
                     "http://127.0.0.1:8000 (required: this or --checkpoint)")
  cmd.add_argument("--api-key", default=None, help="the key of a server started with `dvl serve --api-key`; also "
                   "read from the DVL_API_KEY environment variable (default: none)")
  cmd.add_argument("--task", required=True, help="benchmark name, e.g. synthetic or mmmu_val; an unknown name "
                   "lists the known ones (required)")
  cmd.add_argument("--data", default=None, help="the task's data directory, or its argument for generated data "
                   "(default: the task's own; see dvl_jax/evaluation)")
  cmd.add_argument("--decoders", default=DECODERS,
                   help=f"comma-separated decoders among {DECODERS}; may be empty with --sweep-threshold "
                   "(default: all)")
  cmd.add_argument("--sweep-threshold", default="", metavar="T1,T2,...",
                   help="also run the threshold decoder at each of these confidence thresholds, one row each, "
                   "e.g. 0.5,0.7,0.9 (default: none)")
  cmd.add_argument("--limit", type=int, default=None, help="score the first N samples (default: all)")
  cmd.add_argument("--batch-size", type=int, default=8,
                   help="answers generated together, or requests in flight with --server (default: 8)")
  cmd.add_argument("--gen-length", type=int, default=128, help="tokens generated per answer (default: 128)")
  cmd.add_argument("--steps", type=int, default=8, help="denoising passes per block of the static and dynamic decoders (default: 8)")
  cmd.add_argument("--threshold", type=float, default=0.9,
                   help="confidence threshold of the dynamic and threshold decoders (default: 0.9)")
  cmd.add_argument("--out", default=None,
                   help="directory for results.json, pareto.png and the sample logs (default: none)")
  cmd.add_argument("--log-samples", action="store_true",
                   help="write samples_DECODER.jsonl and run.json to --out as samples finish (default: off)")
  cmd.add_argument("--resume", action="store_true",
                   help="skip the samples already in --out's sample logs (refused if the logged run used other "
                   "settings); implies --log-samples (default: start fresh)")
  cmd.add_argument("--timing-repeats", type=int, default=1, metavar="N",
                   help="generate each batch N times and time its fastest run: steadier tokens/s on a shared "
                   "machine, N times the decoding (in process only; default: 1)")
  add_pixel_bounds(cmd)
  add_layer_layout(cmd)
  cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
  return cmd


def run(args: argparse.Namespace) -> int:
  import os

  from dvl_jax.evaluation import runner
  from dvl_jax.evaluation.settings import EvalSettings, parse_floats

  settings = EvalSettings(
      args.task, data=args.data, decoders=tuple(d.strip() for d in args.decoders.split(",") if d.strip()),
      sweep=parse_floats(args.sweep_threshold, "--sweep-threshold"), limit=args.limit, batch_size=args.batch_size,
      gen_length=args.gen_length, steps=args.steps, threshold=args.threshold, out_dir=args.out,
      log_samples=args.log_samples, resume=args.resume,
      model_id=args.server or os.path.abspath(args.checkpoint))
  if args.server is not None and args.timing_repeats != 1:
    raise ValueError("--timing-repeats times in-process decoding; with --server each answer is timed as served")
  if args.server is not None and (args.min_pixels, args.max_pixels) != (None, None):
    raise ValueError("--min-pixels / --max-pixels size images in this process; with --server the server's bounds "
                     "apply (set them on dvl serve)")
  samples = settings.samples()
  if args.checkpoint is not None:
    check_checkpoint(args.checkpoint)
  if args.server is not None:
    from dvl_jax.evaluation.client import Server

    answer = Server(args.server, api_key=args.api_key or os.environ.get("DVL_API_KEY"))
    answer.model()  # an unreachable server is one line before any sample runs
  else:
    import dvl_jax as dvl

    answer = runner.InProcess(dvl.load(args.checkpoint, **load_options(args)), load_processor(args), args.timing_repeats)
  runner.run(answer, settings, samples, progress=not args.no_progress, interleave=args.server is None)
  return 0
