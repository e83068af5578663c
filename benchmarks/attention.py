"""Attention speed per backend on the BD3-LM training mask (spec §5.4) over `[x_t ; x_0]`, 2L = 1k…16k.

Each row times one jitted forward + backward (`jax.vjp`) of `attend` on bf16 inputs (fp32 on CPU),
Qwen2.5-VL-3B attention shape by default (16 query heads, 2 kv heads, head_dim 128), block size 8, no
padding. Backends alternate inside every repeat (timings drift); the best repeat is reported.

Columns: milliseconds forward+backward; achieved TFLOP/s counting only the non-masked tiles
(`7 * 2 * B * Hq * D` per allowed query-key pair of the 64x64 tiles that hold one: QK^T and PV
forward, five matmuls backward — the same useful work for every backend, so a dense backend is
charged for nothing it wastes); the fraction of tiles the backend skips (its own tiles: 64x64 for
pallas_gpu, splash's blocks, 0 for dense backends); speed relative to xla.

Defaults per platform: GPU pallas_gpu / cudnn / xla, TPU splash / xla, CPU xla at 1k and 2k. Pallas on
CPU runs interpreted — only tiny sizes are feasible (`--backends pallas_gpu --lengths 256`).

    python benchmarks/attention.py [--lengths 1024 2048 ...] [--backends ...] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dvl_jax.attention import block_table, dispatch, pallas_gpu, splash  # noqa: E402
from dvl_jax.attention.spec import AttentionSpec  # noqa: E402

FLOP_TILE = 64
DEFAULTS = {
    "gpu": (("pallas_gpu", "cudnn", "xla"), (1024, 2048, 4096, 8192, 16384)),
    "tpu": (("splash", "xla"), (1024, 2048, 4096, 8192, 16384)),
    "cpu": (("xla",), (1024, 2048)),
}


def bd3_spec(batch: int, length: int, block_size: int) -> AttentionSpec:
  """The training mask as the loss builds it: positional, so splash runs it and pallas_gpu skips its empty tiles."""
  return AttentionSpec.self_attention(jnp.ones((batch, length), jnp.int32), kind="bd3_train", block_size=block_size,
                                      half_len=length // 2)


def useful_flops(spec: AttentionSpec, heads: int, head_dim: int) -> float:
  """Forward + backward matmul FLOPs over the allowed query-key pairs of the non-empty 64x64 tiles."""
  length = spec.q_idx.shape[1]
  tiles = block_table.structural_tiles(spec.kind, spec.block_size, spec.half_len, True, length, length,
                                       FLOP_TILE, FLOP_TILE)
  return 7 * 2 * spec.q_idx.shape[0] * heads * head_dim * float(tiles.sum()) * FLOP_TILE ** 2


def skipped(backend: str, spec: AttentionSpec, length: int) -> float:
  """Fraction of its tiles this backend never computes."""
  if backend == "pallas_gpu":
    return 1.0 - float(block_table.live_tiles(spec, *pallas_gpu.default_tiles(length, length)).mean())
  if backend == "splash":
    padded = -(-length // splash.LANES) * splash.LANES
    block = splash.block_for(padded)
    tiles = block_table.structural_tiles(spec.kind, spec.block_size, spec.half_len, True, padded, padded,
                                         block, block)
    return 1.0 - float(tiles.mean())
  return 0.0


def step(backend: str, spec: AttentionSpec):
  """Jitted `(q, k, v, do) -> (out, dq, dk, dv)` on one backend."""

  def run(q, k, v, do):
    out, pull = jax.vjp(lambda q, k, v: dispatch.attend(q, k, v, spec, backend=backend), q, k, v)
    return out, *pull(do)

  return jax.jit(run)


def main() -> None:
  platform = jax.default_backend()
  backends, lengths = DEFAULTS.get(platform, DEFAULTS["cpu"])
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=list(lengths), help="2L, the [x_t ; x_0] length")
  parser.add_argument("--backends", nargs="+", default=list(backends), choices=dispatch.BACKENDS[1:])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, nargs=2, default=(16, 2), metavar=("Q", "KV"))
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--block-size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  os.environ.pop(dispatch.ENV_VAR, None)
  dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
  hq, hkv = args.heads
  print(f"platform {platform} ({jax.devices()[0].device_kind}), {jnp.dtype(dtype).name}, batch {args.batch}, "
        f"heads {hq}/{hkv}, head_dim {args.head_dim}, block {args.block_size}, best of {args.repeats}")
  print(f"{'2L':>6} {'backend':<11} {'ms fwd+bwd':>11} {'TFLOP/s':>8} {'skipped':>8} {'vs xla':>7}")
  for length in args.lengths:
    spec = bd3_spec(args.batch, length, args.block_size)
    keys = jax.random.split(jax.random.key(length), 4)
    q, do = (jax.random.normal(kk, (args.batch, length, hq, args.head_dim), dtype) for kk in keys[:2])
    k, v = (jax.random.normal(kk, (args.batch, length, hkv, args.head_dim), dtype) for kk in keys[2:])
    steps = {b: step(b, spec) for b in args.backends}
    for fn in steps.values():
      jax.block_until_ready(fn(q, k, v, do))  # compile
    best = {b: float("inf") for b in steps}
    for _ in range(args.repeats):
      for b, fn in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, do))
        best[b] = min(best[b], time.perf_counter() - start)
    flops = useful_flops(spec, hq, args.head_dim)
    for b, seconds in best.items():
      ratio = f"{best['xla'] / seconds:6.2f}x" if "xla" in best else "     -"
      print(f"{length:>6} {b:<11} {1e3 * seconds:>11.2f} {flops / seconds / 1e12:>8.3f} "
            f"{skipped(b, spec, length):>8.1%} {ratio:>7}")


if __name__ == "__main__":
  main()
