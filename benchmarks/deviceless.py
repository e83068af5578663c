"""Compiling for an accelerator this machine does not have (JAX's deviceless compilation): the TPU or GPU
topology, and what this project's code needs to trace for it.

A topology comes from the platform's compiler, installed without the hardware: libtpu (`jax[tpu]`'s) for a Cloud
TPU slice, JAX's CUDA plugin for a GPU. Programs lowered for its devices compile with XLA:TPU / XLA:GPU as on the
real thing (fusions, Pallas kernels through Mosaic / Triton, the per-device memory plan); nothing runs. Three
things differ from a run on the hardware, and `target` handles them: the code's own platform choices ask
`jax.default_backend()` (attention backend, argmax, single-row products), the Pallas lowerings ask the abstract
mesh's device for the chip, and splash attention builds its mask tables as concrete arrays while tracing, which
cannot live on devices that do not exist (`prebuilt_splash_kernels`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
from typing import Any, Callable, Iterator

import jax

from dvl_jax.attention import splash
from dvl_jax.parallel.mesh import AXES

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # a CUDA plugin without a driver: nothing to check
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lockfile guards a TPU, which these lack


# GPU targets: the device description XLA:GPU compiles for (data sheets: SMs, shared memory, HBM, capability).
GPUS = {"h200": dict(kind="NVIDIA H200", bandwidth=4_800_000_000_000, memory=150_754_820_096, sms=132,
                     smem_sm=233472, smem_block=232448, l2=52428800, major=9),
        "h100": dict(kind="NVIDIA H100 80GB HBM3", bandwidth=3_352_320_000_000, memory=84_929_347_584, sms=132,
                     smem_sm=233472, smem_block=232448, l2=52428800, major=9),
        "a100": dict(kind="NVIDIA A100-SXM4-80GB", bandwidth=2_039_000_000_000, memory=85_899_345_920, sms=108,
                     smem_sm=167936, smem_block=166912, l2=41943040, major=8)}
_GPU_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_sm} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: 1.98 device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_block} cuda_compute_capability {{ major: {major} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: {cuda} minor: 0 }}
device_description_str: "{kind}"
"""


def gpu_topology(target: str, topology: str = "1x1x1") -> Any:
  """`target` GPUs (`GPUS`) as `partitions x hosts x GPUs per host`, e.g. `1x4x8` (JAX's CUDA plugin must be
  importable; no GPU or driver is needed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  plugins = [hit for folder in sys.path if os.path.isdir(folder)
             for hit in glob.glob(os.path.join(folder, "jax_plugins", "xla_cuda*"))]
  if not plugins:
    raise SystemExit("no JAX CUDA plugin importable: pip install --no-deps --target .gpu-aot "
                     f"jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__} and run with "
                     "PYTHONPATH=.gpu-aot")
  cuda = int(re.search(r"xla_cuda(\d+)", plugins[0]).group(1))
  config = _GPU_CONFIG.format(cuda=cuda, **GPUS[target])
  return topologies.get_topology_desc(platform="cuda", target_config=config, topology=topology)


def tpu_topology(name: str) -> Any:
  """A Cloud TPU slice by its topology name, e.g. `v5e:4x4`, `v5p:2x2x4`, `v6e:8x8` (libtpu must be installed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as error:  # no libtpu, or a name it does not know
    raise SystemExit(f"cannot make TPU topology {name!r} ({str(error).splitlines()[0]}): install libtpu "
                     "(pip install --no-deps --target .tpu-aot libtpu==<jax[tpu]'s>, PYTHONPATH=.tpu-aot) and name "
                     "a slice as GEN:AxB[xC], e.g. v5e:4x4") from None


@contextlib.contextmanager
def target(device: Any) -> Iterator[None]:
  """Traces in this context are for `device`'s platform and chip: `jax.default_backend()` answers its platform
  (restored after) and the Pallas lowerings see an abstract mesh of that chip. That one-chip mesh suits one-device
  programs and training (whose `jax.set_mesh` replaces it); a sampler over several devices splits its kernels with
  `shard_map` over its own mesh, which must then be the context's (`jax.sharding.use_abstract_mesh(mesh.
  abstract_mesh)` instead of this context, with the decoder's `constrain` a no-op as in a real sampler)."""
  platform = "gpu" if device.platform in ("cuda", "rocm", "gpu") else device.platform
  chip = jax.sharding.AbstractDevice(device_kind=device.device_kind, num_cores=getattr(device, "num_cores", None),
                                     platform=platform)
  mesh = jax.sharding.AbstractMesh((1,) * len(AXES), AXES, (jax.sharding.AxisType.Auto,) * len(AXES),
                                   abstract_device=chip)
  default_backend = jax.default_backend
  jax.default_backend = lambda: platform
  try:
    with jax.sharding.use_abstract_mesh(mesh):
      yield
  finally:
    jax.default_backend = default_backend


def prebuilt_splash_kernels(lower: Callable[[], Any]) -> Any:
  """`lower()` with every splash kernel it asks for built beforehand: a first trace records them (with a stand-in
  kernel), they are built outside any trace, and the second trace finds them in `splash._kernel`'s cache."""
  real, wanted = splash._kernel, set()  # pylint: disable=protected-access

  def record(*key):
    wanted.add(key)
    return lambda q, k, v, segment_ids: q

  splash._kernel = record  # pylint: disable=protected-access
  try:
    lower()
  finally:
    splash._kernel = real  # pylint: disable=protected-access
  for key in wanted:  # outside the step's trace and its mesh of devices that do not exist
    real(*key)
  return lower()
