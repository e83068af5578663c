"""The `dvl` command: convert, export and the demo.

User mistakes (missing files, wrong layouts, bad options) end with a one-line error and exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _checkpoint_command(sub, name: str, description: str, *, src: str, dtype: str) -> argparse.ArgumentParser:
  """A src -> dst checkpoint command with the options convert and export share."""
  cmd = sub.add_parser(name, help=description)
  cmd.add_argument("src", help=src)
  cmd.add_argument("dst", help="output directory (written atomically)")
  cmd.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help=dtype)
  cmd.add_argument("--overwrite", action="store_true", help="replace an existing dst (default: refuse)")
  cmd.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
  return cmd


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dvl", description="DiffusionVL in JAX: convert, export, demo.")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (default: off)")
  sub = parser.add_subparsers(dest="command", required=True)

  conv = _checkpoint_command(sub, "convert", "HF / DiffusionVL safetensors checkpoint -> dvl (Orbax) checkpoint",
                             src="directory with config.json and *.safetensors (any layout of spec §8)",
                             dtype="parameter dtype of the output (default: the config's param_dtype, float32)")
  conv.add_argument("--mask-token-id", type=int, default=None,
                    help="mask token id when config.json has none (default: 151671, DiffusionVL's)")
  conv.add_argument("--block-size", type=int, default=None,
                    help="BD3-LM block size when config.json has none (default: 8)")
  conv.add_argument("--position-mode", choices=["mrope", "flat"], default=None,
                    help="position mode (default: mrope for Qwen2.5-VL, flat for DiffusionVL)")
  _checkpoint_command(sub, "export", "dvl (Orbax) checkpoint -> HF Qwen2.5-VL safetensors checkpoint",
                      src="dvl checkpoint directory (from `dvl convert` or training)",
                      dtype="dtype of the exported tensors (default: keep the checkpoint dtype)")

  demo = sub.add_parser("demo", help="build a tiny PyTorch Qwen2.5-VL, convert it, compare logits with PyTorch")
  demo.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
  demo.add_argument("--seed", type=int, default=0, help="seed of the random model and inputs (default: 0)")
  return parser


def _run(args: argparse.Namespace) -> int:
  import dvl_jax as dvl

  if args.command == "convert":
    overrides = {k: v for k, v in (("mask_token_id", args.mask_token_id), ("block_size", args.block_size),
                                   ("position_mode", args.position_mode)) if v is not None}
    dvl.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                **overrides)
    print(f"wrote {args.dst}")
  elif args.command == "export":
    dvl.export(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {args.dst}")
  elif args.command == "demo":
    from dvl_jax import parity_demo

    diffs = parity_demo.run(args.workdir, args.seed)
    return 0 if all(d <= 1e-4 for d in diffs.values()) else 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (ValueError, KeyError, OSError) as e:
    if args.debug:
      raise
    # One line names the problem; a conversion error continues with its full list of bad keys.
    print(f"dvl {args.command}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
