"""What one device can do at best: HBM bandwidth and peak dense bf16 FLOP/s, the denominators of
`benchmarks/accelerator.py`'s "of bound" and MFU columns.

Published per-device figures (vendor data sheets; TPU: Cloud TPU system-architecture pages, per chip, which
JAX shows as one device from v4 on), keyed by a pattern on `jax.devices()[0].device_kind`. A device not in the
table (a CPU, a new chip) gets measured figures instead: a large on-device copy (bytes read + written per
second) and a large matmul; either can be overridden (`--bandwidth-gbs`, `--peak-tflops`). The source of each
figure goes into the report, so a measured or overridden one is never mistaken for the data sheet's.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# (pattern on device_kind, full match, case-insensitive; HBM GB/s; dense bf16 TFLOP/s). First match wins, so
# a more specific name comes before a shorter one that would also match it (H100 PCIe before H100).
KNOWN = (
    (r"NVIDIA B200.*", 8000.0, 2250.0),
    (r"NVIDIA GH200.*", 4000.0, 989.0),  # the 96 GB HBM3 part; the 144 GB HBM3e one reads 4900 GB/s
    (r"NVIDIA H200.*", 4800.0, 989.0),
    (r"NVIDIA H100 NVL.*", 3900.0, 835.0),
    (r"NVIDIA H100 PCIe.*", 2000.0, 756.0),
    (r"NVIDIA H100.*", 3350.0, 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"NVIDIA A100.*40GB.*", 1555.0, 312.0),
    (r"NVIDIA A100.*PCIe.*", 1935.0, 312.0),
    (r"NVIDIA A100.*", 2039.0, 312.0),  # SXM4 80GB
    (r"NVIDIA L40S.*", 864.0, 362.0),
    (r"NVIDIA L4", 300.0, 121.0),
    (r"TPU v4", 1200.0, 275.0),
    (r"TPU v5 ?lite|TPU v5e", 819.0, 197.0),
    (r"TPU v5p?", 2765.0, 459.0),
    (r"TPU v6 ?lite|TPU v6e", 1640.0, 918.0),
)


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
  """One device's best case; `*_source` says where each figure came from."""

  kind: str
  platform: str
  bandwidth_gbs: float
  bandwidth_source: str
  peak_tflops: float
  peak_source: str

  @property
  def bandwidth(self) -> float:
    """Bytes per second."""
    return self.bandwidth_gbs * 1e9

  @property
  def peak(self) -> float:
    """FLOP per second."""
    return self.peak_tflops * 1e12


def known(kind: str) -> tuple[float, float] | None:
  """(HBM GB/s, peak bf16 TFLOP/s) of a device kind in `KNOWN`, else None."""
  for pattern, gbs, tflops in KNOWN:
    if re.fullmatch(pattern, kind.strip(), re.IGNORECASE):
      return gbs, tflops
  return None


def best_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
  """The fastest of `repeats` calls of `fn` after a first (compiling) one, each waited for."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measured_bandwidth_gbs(nbytes: int) -> float:
  """GB/s of an on-device copy of `nbytes` (read once, written once)."""
  x, copy = jnp.zeros((nbytes // 4,), jnp.float32), jax.jit(lambda a: a + 1.0)
  return 2 * x.nbytes / best_seconds(lambda: copy(x)) / 1e9


def measured_peak_tflops(n: int, dtype: jnp.dtype) -> float:
  """TFLOP/s of an `n x n` by `n x n` matmul in `dtype`."""
  a, matmul = jnp.ones((n, n), dtype), jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / best_seconds(lambda: matmul(a)) / 1e12


def limits(bandwidth_gbs: float | None, peak_tflops: float | None, *, copy_bytes: int, matmul_n: int
           ) -> DeviceLimits:
  """The first device's limits: an override if given, else the table, else a measurement."""
  device = jax.devices()[0]
  table = known(device.device_kind)
  dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16

  def pick(override, index, measure, what):
    if override is not None:
      return override, "given"
    if table is not None:
      return table[index], "device table"
    return measure(), f"measured ({what})"

  gbs, gbs_from = pick(bandwidth_gbs, 0, lambda: measured_bandwidth_gbs(copy_bytes),
                       f"copy of {copy_bytes / 2**20:.0f} MiB")
  tflops, tflops_from = pick(peak_tflops, 1, lambda: measured_peak_tflops(matmul_n, dtype),
                             f"{matmul_n}^2 {jnp.dtype(dtype).name} matmul")
  return DeviceLimits(device.device_kind, device.platform, gbs, gbs_from, tflops, tflops_from)
