"""XLA's memory plan of a real-size train step, before any array exists: what `loss_chunk_size` saves.

The step (stage 2: BD3-LM over `[x_t ; x_0]`, everything trainable; or stage 1 / ar) of a Qwen2.5-VL
preset is compiled for abstract params FSDP-sharded over `--devices` devices (fake CPU devices on a
CPU host) and a batch of `--batch` rows of `--length` tokens (one image each) per device; `memory_analysis()`
reports the per-device bytes of the arguments (params, Adam state, batch) and of the temporaries
(activations, logits, gradients). No step runs, so a 3B / 7B model compiles on a laptop. The numbers
are the plan of the backend it runs on: on CPU, dense XLA attention keeps `[B, H, 2L, 2L]` scores of
a layer alive (splash attention on TPU has none), so long rows are dominated by them there.

`--tpu v5e:4x4` compiles for that Cloud TPU slice instead, on this machine (deviceless: libtpu installed, no
TPU; `benchmarks/deviceless.py`): XLA:TPU's own plan with splash attention compiled through Mosaic, over the
slice's chips (`--devices` defaults to all of them), and a step that needs more than a chip's HBM is reported
as not fitting rather than compiled. `--gpu h100:1x4x8` does the same for GPUs (JAX's CUDA plugin installed;
the own Pallas attention kernel).

    python benchmarks/train_memory.py [--preset qwen2.5-vl-3b] [--devices 16] [--length 2048] [--chunks 0 1024 256]
    PYTHONPATH=.tpu-aot python benchmarks/train_memory.py --tpu v5e:4x4 --preset qwen2.5-vl-3b --chunks 1024
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _devices_flag() -> None:
  """Fake CPU devices must be asked for before jax is imported."""
  if "--devices" in sys.argv and not {"--tpu", "--gpu"} & set(sys.argv) and "jax" not in sys.modules:
    count = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


_devices_flag()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import deviceless  # noqa: E402
from dvl_jax.core.config import PRESETS  # noqa: E402
from dvl_jax.data.sharded_layout import sharded_vision_layout  # noqa: E402
from dvl_jax.models.families import abstract_model  # noqa: E402
from dvl_jax.parallel.mesh import make_mesh  # noqa: E402
from dvl_jax.parallel.rules import abstract_arrays  # noqa: E402
from dvl_jax.training.optimizer import OptimizerConfig  # noqa: E402
from dvl_jax.training.state import stage  # noqa: E402
from dvl_jax.training.step import TrainStep  # noqa: E402


def abstract_batch(cfg, shards: int, rows: int, length: int, image_px: int) -> dict:
  """One micro-batch of `shards * rows` rows; with `image_px`, one square image per row (patch rows
  per shard as the data pipeline lays them out)."""
  ids = jax.ShapeDtypeStruct((1, shards * rows, length), jnp.int32)
  batch = {"input_ids": ids, "labels": ids, "attention_mask": ids}
  if image_px:
    side = image_px // cfg.vision.patch_size
    grids = np.array([[1, side, side]] * rows)
    tokens = np.full(rows, side * side // cfg.vision.merge_unit)
    layout = sharded_vision_layout([grids] * shards, [tokens] * shards, rows * side * side, cfg.vision)
    batch["pixel_values"] = jax.ShapeDtypeStruct((1, shards * rows * side * side, cfg.vision.patch_dim), jnp.float32)
    batch["vision"] = jax.tree.map(lambda x: x[None], layout)
  return batch


def sharded_abstract_model(cfg, mesh):
  """The model with `ShapeDtypeStruct` params that carry their logical-rule shardings over `mesh`."""
  graphdef, state = nnx.split(abstract_model(cfg))
  return nnx.merge(graphdef, abstract_arrays(state, mesh))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-vl-3b")
  parser.add_argument("--stage", default="stage2", help="stage1 | stage2 | ar (default: stage2)")
  parser.add_argument("--devices", type=int, help="FSDP devices (default: 1, or all of --tpu's)")
  elsewhere = parser.add_mutually_exclusive_group()
  elsewhere.add_argument("--tpu", metavar="TOPOLOGY", help="compile for this Cloud TPU slice, e.g. v5e:4x4 or "
                      "v5p:2x2x4, without one (libtpu importable; default: this machine's backend)")
  elsewhere.add_argument("--gpu", metavar="GPU:TOPOLOGY", help="compile for these GPUs, e.g. h100:1x4x8 (4 hosts of 8), "
                      f"one of {', '.join(deviceless.GPUS)}, without them (JAX's CUDA plugin importable)")
  parser.add_argument("--batch", type=int, default=1, help="rows per device in a micro-batch (default: 1)")
  parser.add_argument("--length", type=int, default=2048, help="tokens per row (default: 2048)")
  parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256],
                      help="loss_chunk_size values to compare; 0 = all logits at once (default: 0 1024 256)")
  parser.add_argument("--image-px", type=int, default=448,
                      help="side of one square image per row, in pixels; 0 = text only (default: 448, 256 tokens)")
  parser.add_argument("--remat", default="full", help="remat_policy (default: full, as configs/)")
  args = parser.parse_args()

  aside = args.tpu or args.gpu  # compiled for devices this machine lacks
  if args.tpu:
    devices = deviceless.tpu_topology(args.tpu).devices
  elif args.gpu:
    devices = deviceless.gpu_topology(*args.gpu.split(":", 1)).devices
  else:
    devices = jax.devices()
  args.devices = args.devices or (len(devices) if aside else 1)
  # On an accelerator target attention is its kernel's ("auto"); here the dense XLA path, as the step runs here.
  cfg = PRESETS[args.preset].replace(compute_dtype="bfloat16", remat_policy=args.remat,
                                     attention_backend="auto" if aside else "xla")
  mesh = make_mesh((1, args.devices, 1), devices[:args.devices])
  model = sharded_abstract_model(cfg, mesh)
  target = (lambda: deviceless.target(devices[0])) if aside else contextlib.nullcontext
  backend = f"{devices[0].device_kind} (compiled without one)" if aside else jax.default_backend()
  rng = jax.eval_shape(lambda: jax.random.key(0)) if aside else jax.random.key(0)  # no array on a device aside
  print(f"backend: {backend}, {args.preset}, {args.stage}, FSDP over {args.devices} devices, "
        f"{args.batch} x {args.length} tokens per device, {args.image_px or 'no'} px images, bf16 compute, remat {args.remat}, "
        f"vocab {cfg.text.vocab_size}; bytes per device")
  print("| loss_chunk_size | arguments GB | temporaries GB | fp32 logits of the rows GB | compile s |")
  print("|---|---|---|---|---|")
  logits_gb = args.batch * args.length * cfg.text.vocab_size * 4 / 2**30
  for chunk in args.chunks:
    trainer = TrainStep(model, stage(args.stage), OptimizerConfig(), total_steps=1000, mesh=mesh,
                        loss_chunk_size=chunk)
    batch = abstract_batch(cfg, args.devices, args.batch, args.length, args.image_px)
    tic = time.perf_counter()
    with target():
      lower = lambda: trainer.lower(trainer.abstract_state(model), batch, rng)  # noqa: E731
      lowered = deviceless.prebuilt_splash_kernels(lower) if args.tpu else lower()
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # XLA refuses a plan past the chip's memory
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      print(f"| {chunk or 'all'} | does not fit: {str(error).splitlines()[0]} | | | {time.perf_counter() - tic:.0f} |")
      continue
    seconds = time.perf_counter() - tic
    memory = compiled.memory_analysis()
    print(f"| {chunk or 'all'} | {memory.argument_size_in_bytes / 2**30:.2f} | "
          f"{memory.temp_size_in_bytes / 2**30:.2f} | {logits_gb:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
  main()
