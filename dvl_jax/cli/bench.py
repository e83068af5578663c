"""`dvl bench NAME [ARGS...]`: runs `benchmarks/NAME.py` of the source checkout, which prints a table.

The scripts live next to the package in the repository, not inside it, so an installed wheel has none;
a checkout installed with `pip install -e .` finds them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

BENCHMARKS = ("accelerator", "attention", "convert", "gpu_programs", "original", "random_checkpoint", "sampling",
              "serve", "tpu_programs", "train", "train_memory")
FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def add_parser(sub: Any) -> argparse.ArgumentParser:
  cmd = sub.add_parser("bench", help="run a speed / memory benchmark of benchmarks/ (source checkouts)",
                       description="Runs benchmarks/NAME.py with the remaining arguments; "
                       "`dvl bench NAME --help` lists the script's own options.")
  cmd.add_argument("name", choices=BENCHMARKS, help="which benchmark: everything on one GPU / TPU in one table, "
                   "attention backends, checkpoint conversion memory, the kernels of each decoding step compiled "
                   "for a GPU without one, side by side with the original PyTorch "
                   "sampler (needs its checkout), a random checkpoint with a real vocabulary to serve, sampling "
                   "speed, load on a running dvl serve, train step speed, or XLA's memory plan of a real-size train "
                   "step, here or for a TPU slice (required)")
  cmd.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script (default: none, its defaults)")
  return cmd


def run(args: argparse.Namespace) -> int:
  script = os.path.join(FOLDER, f"{args.name}.py")
  if not os.path.isfile(script):
    raise FileNotFoundError(f"no {script}: the benchmarks ship with the source repository, not the installed "
                            "package; run `dvl bench` from a checkout installed with `pip install -e .`")
  return subprocess.call([sys.executable, script, *args.args])
