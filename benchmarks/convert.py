"""Streaming conversion benchmark: peak memory of `convert` / `export` against the checkpoint size.

Writes a synthetic multi-shard Hub-layout checkpoint (random fp32 weights of a mid-size Qwen2.5-VL,
generated tensor by tensor, never held whole), converts it and exports it back, each in a child
process, and prints wall time and that child's peak RSS (`wait4` rusage).

    python benchmarks/convert.py [--layers 5] [--workdir /tmp/dvl_convert_bench] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints_convert import orbax_stream
from dvl_jax.models import key_map  # noqa: E402
from checkpoints_convert.safetensors_writer import PlannedTensor, write_checkpoint  # noqa: E402
from dvl_jax.core.config import VisionConfig  # noqa: E402
from dvl_jax.testing.tiny import tiny_config  # noqa: E402
from dvl_jax.models.families import abstract_model  # noqa: E402

GB = 1 << 30


def mid_config(layers: int):
  """Real 3B-like widths (vision as in Qwen2.5-VL, text 2048 wide), fewer layers, 32k vocabulary."""
  cfg = tiny_config()
  text = dataclasses.replace(cfg.text, vocab_size=32000, hidden_size=2048, intermediate_size=11008,
                             num_layers=layers, num_heads=16, num_kv_heads=2, mrope_section=(16, 24, 24))
  return cfg.replace(vision=VisionConfig(depth=8, out_hidden_size=2048, fullatt_block_indexes=(3, 7)), text=text)


def hub_plan(cfg) -> list[key_map.HubTensor]:
  _, state = nnx.split(abstract_model(cfg), nnx.Param)
  return key_map.hub_tensors({p: v.shape for p, v in orbax_stream.variables(state).items()}, cfg)


def write_synthetic(path: str, cfg, shard_bytes: int) -> int:
  """A Hub-layout checkpoint of random weights, produced one tensor at a time; returns its size."""
  rng = np.random.default_rng(0)
  f32 = np.dtype(np.float32)
  tensors = [PlannedTensor(t.name, f32, t.shape, lambda s=t.shape: rng.standard_normal(s, np.float32))
             for t in hub_plan(cfg)]
  os.makedirs(path, exist_ok=True)
  write_checkpoint(path, tensors, shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f)
  return sum(t.nbytes for t in tensors)


def run_child(code: str) -> tuple[float, float]:
  """Runs `code` in a fresh interpreter; returns (wall seconds, that child's peak RSS in bytes)."""
  start = time.perf_counter()
  child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
  _, status, usage = os.wait4(child.pid, 0)
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    raise RuntimeError(f"benchmark child failed ({child.returncode}): {code}")
  return time.perf_counter() - start, usage.ru_maxrss * 1024.0  # KiB on Linux


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=5)
  parser.add_argument("--shard-gb", type=float, default=1.0)
  parser.add_argument("--workdir", default="/tmp/dvl_convert_bench")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
  args = parser.parse_args()
  src, dvl, hf = (os.path.join(args.workdir, n) for n in ("hf", "dvl", "export"))
  shutil.rmtree(args.workdir, ignore_errors=True)
  cfg = mid_config(args.layers)
  t0 = time.perf_counter()
  size = write_synthetic(src, cfg, int(args.shard_gb * GB))
  shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
  print(f"synthetic checkpoint: {size / GB:.2f} GiB fp32 in {shards} shards, written in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  # Fixed cost: the interpreter with jax, flax, orbax and the converter imported, doing nothing.
  rows = [("imports only", *run_child("import checkpoints_convert"))]
  rows.append(("convert (HF -> Orbax)", *run_child(
      f"from checkpoints_convert import convert; convert({src!r}, {dvl!r}, progress=False)")))
  rows.append(("export (Orbax -> HF)", *run_child(
      f"from checkpoints_convert import export; export({dvl!r}, {hf!r}, progress=False)")))
  print(f"\nOrbax checkpoint: {dir_bytes(dvl) / GB:.2f} GiB; exported: {dir_bytes(hf) / GB:.2f} GiB")
  print("\n| step | checkpoint | wall (s) | peak RSS | peak RSS / checkpoint |")
  print("|---|---|---|---|---|")
  for name, wall, peak in rows:
    print(f"| {name} | {size / GB:.2f} GiB | {wall:.1f} | {peak / GB:.2f} GiB | {peak / size:.3f} |")
  largest = max(int(np.prod(t.shape)) * 4 for t in hub_plan(cfg))
  print(f"\nlargest single tensor: {largest / GB:.3f} GiB")
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
