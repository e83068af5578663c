"""The `dvl` command: convert, export, generate, eval, train, the demo and the benchmarks.

User mistakes (missing files, wrong layouts, bad options) end with a one-line error and exit code 2;
`--debug` shows the traceback instead. `generate`, `eval` and `bench` live in their own modules; this one
registers and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dvl_jax.cli import bench as bench_cli
from dvl_jax.cli import eval as eval_cli
from dvl_jax.cli import generate as generate_cli
from dvl_jax.cli import serve as serve_cli


class _Parser(argparse.ArgumentParser):
  """A usage mistake is one line too (the usage is in --help); exit code 2 as for every user error."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checkpoint_command(sub, name: str, description: str, *, src: str, dtype: str,
                        src_optional: bool = False) -> argparse.ArgumentParser:
  """A src -> dst checkpoint command with the options convert and export share."""
  cmd = sub.add_parser(name, help=description)
  cmd.add_argument("src", nargs="?" if src_optional else None, help=src)
  cmd.add_argument("dst", help="output directory (written atomically)")
  cmd.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=dtype)
  cmd.add_argument("--overwrite", action="store_true", help="replace an existing dst (default: refuse)")
  cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
  return cmd


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="dvl", description="DiffusionVL in JAX: convert, export, generate, eval, train, demo, bench.")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (default: off)")
  sub = parser.add_subparsers(dest="command", required=True)

  conv = _checkpoint_command(sub, "convert", "HF / DiffusionVL safetensors checkpoint, or an LM + a SigLIP tower "
                             "(--lm/--vision) -> dvl (Orbax) checkpoint",
                             src="directory with config.json and *.safetensors (any layout of spec §8); "
                             "leave it out with --lm/--vision",
                             dtype="parameter dtype of the output (default: the config's param_dtype, float32)",
                             src_optional=True)
  conv.add_argument("--lm", default=None,
                    help="instead of src: a Qwen2 / Qwen2.5 language model checkpoint (e.g. Qwen2.5-7B-Instruct) "
                    "to start DiffusionVL-Qwen from, with --vision (default: none, convert src)")
  conv.add_argument("--vision", default=None,
                    help="with --lm: a SigLIP checkpoint (e.g. siglip2-so400m-patch14-384); its last layer, "
                    "pooling head and text half are dropped (default: none)")
  conv.add_argument("--stage", type=int, choices=[1, 2], default=1,
                    help="with --lm: the training stage the checkpoint starts: 1 square images, projector only; "
                    "2 anyres_max_4 with a new image_newline (default: 1)")
  conv.add_argument("--projector", default=None,
                    help="with --lm --stage 2: stage 1's mm_projector.bin (default: a newly drawn projector)")
  conv.add_argument("--seed", type=int, default=0,
                    help="with --lm: seed of the new projector and image_newline (default: 0)")
  conv.add_argument("--mask-token-id", type=int, default=None,
                    help="mask token id when config.json has none (default: 151671, DiffusionVL's)")
  conv.add_argument("--image-token-id", type=int, default=None,
                    help="image token id when config.json has none (default: 151655, Qwen2.5-VL's <|image_pad|>)")
  conv.add_argument("--block-size", type=int, default=None,
                    help="BD3-LM block size when config.json has none (default: 8)")
  conv.add_argument("--position-mode", choices=["mrope", "flat"], default=None,
                    help="position mode (default: mrope for Qwen2.5-VL, flat for DiffusionVL)")
  _checkpoint_command(sub, "export", "dvl (Orbax) checkpoint -> HF safetensors checkpoint (the family's "
                      "transformers layout: Qwen2.5-VL, Qwen2, LLaVA-OneVision)",
                      src="dvl checkpoint directory (from `dvl convert` or training)",
                      dtype="dtype of the exported tensors (default: keep the checkpoint dtype)")
  generate_cli.add_parser(sub)
  eval_cli.add_parser(sub)
  serve_cli.add_parser(sub)

  train = sub.add_parser("train", help="train (stage 1 / stage 2 / AR) from a config file; resumable",
                         description="Extra `--config.KEY=VALUE` arguments override config fields, e.g. "
                         "--config.init_checkpoint=ckpt --config.data.json=train.json --config.mesh=1,-1,4 "
                         "(all fields: dvl_jax/training/run_config.py).")
  train.add_argument("--config", required=True,
                     help="Python config file with get_config(), e.g. configs/stage2.py (required)")
  train.add_argument("--workdir", required=True,
                     help="run directory: checkpoints/, metrics.jsonl, tensorboard/, model/ (local or gs://) "
                     "(required)")
  train.add_argument("--resume", action="store_true",
                     help="continue from the newest complete checkpoint in --workdir (default: start fresh; "
                     "a workdir with checkpoints is refused)")
  train.add_argument("--stop-after", type=int, default=None,
                     help="end this invocation after N steps with a checkpoint (default: run to the end)")
  train.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")

  demo = sub.add_parser("demo", help="turn an AR VLM into a block-diffusion VLM on CPU, end to end (~13 min, 2 cores)",
                        description="Trains a small Qwen2.5-VL as an AR VLM on synthetic visual QA, exports it to "
                        "PyTorch/HF, converts it back, finetunes it with the BD3-LM objective and compares AR and "
                        "block-diffusion decoding on held-out questions with dvl eval's evaluator (exact match, "
                        "tokens per forward and tokens/s on the long answers and the short ones).")
  demo.add_argument("--workdir", default=None, help="where to write data, runs and checkpoints (default: a temp dir)")
  demo.add_argument("--seed", type=int, default=0, help="seed of the data splits and the model (default: 0)")
  demo.add_argument("--quick", action="store_true",
                    help="a ~3 minute run on less data (checks the pipeline; accuracy stays low) (default: off)")
  demo.add_argument("--from-lm", action="store_true",
                    help="instead: DiffusionVL-Qwen's two stages from a small text-only Qwen2 LM and a random SigLIP "
                    "tower (stage 1 the projector, stage 2 BD3-LM), then the same table (~15 min, 2 cores) "
                    "(default: off)")
  demo.add_argument("--parity", action="store_true",
                    help="instead: build a tiny PyTorch Qwen2.5-VL, convert it and compare logits (default: off)")
  bench_cli.add_parser(sub)
  return parser


def _run(args: argparse.Namespace) -> int:
  import dvl_jax as dvl

  if args.command == "convert":
    overrides = {k: v for k, v in (("mask_token_id", args.mask_token_id), ("image_token_id", args.image_token_id),
                                   ("block_size", args.block_size), ("position_mode", args.position_mode))
                 if v is not None}
    if _from_lm(args):
      from checkpoints_convert import convert_from_lm

      convert_from_lm(args.lm, args.vision, args.dst, projector=args.projector, stage=args.stage, dtype=args.dtype,
                      seed=args.seed, progress=not args.no_progress, overwrite=args.overwrite, **overrides)
    else:
      dvl.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                  **overrides)
    print(f"wrote {args.dst}")
  elif args.command == "export":
    dvl.export(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.dst}")
  elif args.command == "generate":
    return generate_cli.run(args)
  elif args.command == "bench":
    return bench_cli.run(args)
  elif args.command == "eval":
    return eval_cli.run(args)
  elif args.command == "serve":
    return serve_cli.run(args)
  elif args.command == "train":
    from dvl_jax.training.loop import train
    from dvl_jax.training.run_config import load_config

    config = load_config(args.config, [o[len("--config."):] for o in args.config_overrides])
    metrics = train(config, args.workdir, resume=args.resume, stop_after=args.stop_after,
                    progress=not args.no_progress)
    if metrics:
      print(f"step metrics: loss {metrics['loss']:.4f}, grad norm {metrics['grad_norm']:.3f}")
  elif args.command == "demo" and args.parity:
    from dvl_jax.demos import parity_demo

    diffs = parity_demo.run(args.workdir, args.seed)
    return 0 if all(d <= 1e-4 for d in diffs.values()) else 1
  elif args.command == "demo" and args.from_lm:
    from dvl_jax.demos import from_lm_demo

    out = from_lm_demo.run(args.workdir, quick=args.quick, seed=args.seed)
    if not args.quick and not from_lm_demo.passed(out["results"]):
      print(f"block-diffusion decoding missed the demo's bar (>= {from_lm_demo.BAR:.0%} exact match)")
      return 1
  elif args.command == "demo":
    from dvl_jax.demos import train_demo

    out = train_demo.run(args.workdir, quick=args.quick, seed=args.seed)
    if not args.quick and not train_demo.passed(out["results"]):
      print("block-diffusion decoding missed the demo's bar (every decoder >= 90% exact match on all answers and "
            "on the long ones, within 2 points of AR)")
      return 1
  return 0


def _from_lm(args: argparse.Namespace) -> bool:
  """Whether `dvl convert` starts DiffusionVL-Qwen from --lm + --vision (else it converts src); a mixture of
  the two forms, or an option of one given to the other, is a usage error."""
  if args.lm is None and args.vision is None:
    lm_only = [o for o, v in (("--projector", args.projector), ("--stage", args.stage != 1 or None),
                              ("--seed", args.seed != 0 or None)) if v is not None]
    if lm_only:
      raise ValueError(f"{', '.join(lm_only)} apply only with --lm/--vision; add --lm DIR --vision DIR")
    if args.src is None:
      raise ValueError("give a source checkpoint directory and dst, or --lm DIR --vision DIR and dst")
    return False
  if args.lm is None or args.vision is None:
    given, missing = ("--lm", "--vision") if args.vision is None else ("--vision", "--lm")
    raise ValueError(f"{given} needs {missing}: DiffusionVL-Qwen starts from a language model and a SigLIP tower")
  if args.src is not None:
    raise ValueError(f"a positional source ({args.src}) and --lm/--vision both given; use one of the two forms")
  if args.projector is not None and args.stage != 2:
    raise ValueError("--projector (stage 1's mm_projector.bin) starts stage 2; add --stage 2")
  return True


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if args.command != "train" or not (a.startswith("--config.") and "=" in a)]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.KEY=VALUE)")
  args.config_overrides = extra
  try:
    return _run(args)
  except (ValueError, KeyError, OSError, RuntimeError) as e:
    if args.debug:
      raise
    # One line names the problem; a conversion error continues with its full list of bad keys.
    print(f"dvl {args.command}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
