"""What every command that runs a converted checkpoint shares: its checks, its image-size options and the layer
layout it decodes with.

`dvl generate` and `dvl eval` both read a checkpoint's weights, tokenizer and pixel bounds; checking the
directory before anything loads keeps a wrong path a one-line error.
"""

from __future__ import annotations

import argparse
from typing import Any

from dvl_jax.checkpoints.loading import CONFIG_FILE, PARAMS_DIR
from dvl_jax.core import storage
from dvl_jax.data.processor import MAX_PIXELS, MIN_PIXELS

TOKENIZER_FILE = "tokenizer.json"


def add_pixel_bounds(cmd: argparse.ArgumentParser) -> None:
  cmd.add_argument("--min-pixels", type=int, default=None,
                   help="images are resized to at least this many pixels (default: the checkpoint's bound from "
                   f"hf_config.json or preprocessor_config.json, else {MIN_PIXELS})")
  cmd.add_argument("--max-pixels", type=int, default=None,
                   help="images are resized to at most this many pixels (default: the checkpoint's bound, else "
                   f"{MAX_PIXELS})")


def add_layer_layout(cmd: argparse.ArgumentParser) -> None:
  cmd.add_argument("--scan-layers", action="store_true",
                   help="keep the layers stacked and run them under lax.scan: compiles about one layer's program "
                   "(much faster for deep models), but every forward then copies each layer's weights out of "
                   "the stack (AR decoding of a 56M model on CPU: ~20%% slower) (default: off; per-layer weights, "
                   "unrolled, read in place)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
  """`dvl.load` overrides the command line chose (`add_layer_layout`)."""
  return dict(scan_layers=args.scan_layers)


def check_checkpoint(path: str) -> None:
  root = storage.as_path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  missing = [n for n in (CONFIG_FILE, PARAMS_DIR, TOKENIZER_FILE) if not (root / n).exists()]
  if missing:
    raise FileNotFoundError(f"{path} is not a converted checkpoint (no {', '.join(missing)}); make one with "
                            "`dvl convert` from Hugging Face / DiffusionVL weights")


def load_processor(args: argparse.Namespace) -> Any:
  """The checkpoint's `dvl.Processor` with the command line's pixel bounds (after `check_checkpoint`)."""
  from dvl_jax.data.processor import Processor

  return Processor.from_pretrained(args.checkpoint, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
