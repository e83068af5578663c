"""The samplers' TPU programs compiled on a machine without a TPU: what each decoding step does with the KV cache.

A decoding step of a 3B model at batch 8 and 2k-token contexts reads ~6 GB of weights and ~1 GB of cache; a copy of
the whole cache costs a read and a write of it, and XLA:TPU makes one whenever the layout it picks for the loop's
cache differs from what an op inside wants (the decoding kernel's operand, a scatter's windows) or when an
in-place write could clobber a value still to be read. Such copies hid in these programs until they were counted
(`benchmarks/RESULTS.md`, "TPU decoding programs compiled without a TPU"): this script counts them.

Prints one row per (setting, mesh): in the decoding loop (per forward, a branching step's every branch summed) and
outside it (per call), the ops that write a whole cache's worth of elements (one device's share: any view of it,
with the single kv head dropped or flattened), split into copies (a `copy`, or a fusion holding a copy or transpose
of that size: a relayout) and in-place updates (scatters, dynamic-update-slices); then the program's temporaries
per chip and the compile seconds. Copies should be 0 everywhere.

Needs libtpu importable, installed aside (`pip install --no-deps --target .tpu-aot libtpu==0.0.42.1`, the build
`jax[tpu]==0.10.2` takes), then `PYTHONPATH=.tpu-aot .venv/bin/python benchmarks/tpu_programs.py`. Meshes are
`data,fsdp,tensor` with `data` 1 (the model sharded, the batch whole on every chip), or `1` for one chip.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import deviceless  # noqa: E402  (first: it lets libtpu load beside another process's)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import dvl_jax as dvl  # noqa: E402
from benchmarks import accelerator, gpu_programs, sampling, train_memory  # noqa: E402
from dvl_jax.diffusion import sampler, sampler_common  # noqa: E402
from dvl_jax.models import decoder  # noqa: E402
from dvl_jax.parallel.mesh import make_mesh  # noqa: E402

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(")
_CALLED = re.compile(r"\b(?:condition|body|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_LOOP_PARTS = re.compile(r"\b(?:body|condition)=%?([\w.\-]+)")
_IN_PLACE = {"scatter", "dynamic-update-slice"}
_SKIPPED = {"parameter", "get-tuple-element", "bitcast", "tuple", "custom-call", "copy-done"}


def cache_ops(hlo: str, cache_elements: int) -> collections.Counter:
  """Ops of an optimised HLO module that write `cache_elements` elements -> counts by ("loop" or "call", "copy" or
  "in place"). "loop": inside a while loop (its body, condition or anything they call); a fusion counts as a copy
  when it holds a copy or transpose of that size."""
  computations: dict[str, list[str]] = {}
  lines: list[str] = []
  for line in hlo.splitlines():
    if not line.startswith(" ") and (m := _COMPUTATION.match(line)):
      lines = computations.setdefault(m.group(1), [])
    else:
      lines.append(line)
  texts = {name: "\n".join(body) for name, body in computations.items()}
  calls = {name: set(_CALLED.findall(text)) |
           {b.strip().lstrip("%") for group in _BRANCHES.findall(text) for b in group.split(",")}
           for name, text in texts.items()}
  in_loop: set[str] = set()
  pending = [part for text in texts.values() for part in _LOOP_PARTS.findall(text)]
  while pending:
    name = pending.pop()
    if name not in in_loop:
      in_loop.add(name)
      pending += calls.get(name, ())

  def whole(shape: str) -> bool:
    return math.prod(int(d) for d in shape.split(",") if d) == cache_elements

  def relayouts(fused: str) -> bool:
    return any((m := _OP.match(line)) and whole(m.group(2)) and m.group(3) in ("copy", "transpose")
               for line in computations.get(fused, ()))

  found: collections.Counter = collections.Counter()
  for name, body in computations.items():
    if name.startswith("fused") or name.startswith("wrapped"):  # a fusion's inside: counted at its fusion op
      continue
    for line in body:
      m = _OP.match(line)
      if not m or not whole(m.group(2)) or m.group(3) in _SKIPPED:
        continue
      kind = m.group(3)
      if kind == "fusion":
        fused = _CALLED.search(line)
        copied = fused is not None and relayouts(fused.group(1))
      else:
        copied = kind not in _IN_PLACE
      found[("loop" if name in in_loop else "call", "copy" if copied else "in place")] += 1
  return found


# ---- compiling for the target ----------------------------------------------------------------------------------

def compiled(setting: str, mesh_shape: tuple[int, ...], topology: str, batch: int, prompt: int, gen: int
             ) -> tuple[Any, int, float]:
  """(compiled program, one device's cache elements, compile seconds) of `dvl.generate` for the accelerator bench's
  3B-shaped model, batch `batch` of ~`prompt`-token prompts, on one chip or a `data,fsdp,tensor` mesh."""
  cfg = accelerator.shapes(False).sampler
  topo = deviceless.tpu_topology(topology)
  ids = np.random.default_rng(0).integers(3, 1000, prompt + 3 * batch)
  prompts = dvl.Prompts.from_lists([ids[:prompt + 3 * i].tolist() for i in range(batch)])
  config = dvl.SamplingConfig(gen_length=gen, **sampling.SETTINGS[setting])
  start = time.perf_counter()
  if mesh_shape == (1,):
    model = gpu_programs.placed_model(cfg, topo.devices[0])
    with deviceless.target(topo.devices[0]):
      lowered = deviceless.prebuilt_splash_kernels(lambda: sampler.lower(model, prompts, config))
  else:
    if mesh_shape[0] != 1:
      raise SystemExit(f"mesh {mesh_shape}: data must be 1 here (the batch's rows would need placed arguments)")
    mesh = make_mesh(mesh_shape, topo.devices[:math.prod(mesh_shape)])
    model = train_memory.sharded_abstract_model(cfg, mesh)
    lowered = _lowered_on_mesh(model, prompts, config, mesh)
  program = lowered.compile()
  seconds = time.perf_counter() - start
  # The program's parameters are one device's shares: the cache's `[layers, B, L, kv_heads, head_dim]` is the one
  # 5-dimensional array among them.
  cache = re.search(r"bf16\[(\d+),(\d+),(\d+),(\d+),(\d+)\]", program.as_text().splitlines()[0])
  if cache is None:
    raise ValueError("no [layers, B, L, kv_heads, head_dim] cache among the program's parameters")
  return program, math.prod(int(d) for d in cache.groups()), seconds


def _lowered_on_mesh(model: Any, prompts: Any, config: Any, mesh: Any) -> Any:
  """The sampler lowered over `mesh`'s chips: traced in its abstract mesh (the kernels split per device), the
  decoder's row constraints off as in a sampler, the platform answered as a TPU's."""
  real_constrain, real_backend = decoder.constrain, jax.default_backend
  decoder.constrain, jax.default_backend = (lambda x, axes: x), (lambda: "tpu")
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      resolved = config.resolve(model.config)
      run, args, _ = sampler_common._arguments(  # pylint: disable=protected-access
          sampler.algorithm_of(resolved), model, prompts, resolved, None, None, allocate=False)
      args = args[:2] + tuple(jax.tree.map(_shaped, a) for a in args[2:])
      return deviceless.prebuilt_splash_kernels(lambda: run.lower(*args))
  finally:
    decoder.constrain, jax.default_backend = real_constrain, real_backend


def _shaped(x: Any) -> Any:
  """An array argument as its shape, dtype and sharding (nothing on the chips that do not exist)."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="v5e:2x2", help="the slice to compile for (default: v5e:2x2)")
  parser.add_argument("--meshes", nargs="+", default=["1", "1,2,2"],
                      help="1 (one chip) or data,fsdp,tensor with data 1 (default: 1 1,2,2)")
  parser.add_argument("--settings", nargs="+", choices=list(sampling.SETTINGS), metavar="SETTING",
                      default=["AR greedy", "dynamic t0.85 fused"], help="sampling settings (`benchmarks/sampling.py`)")
  parser.add_argument("--batch", type=int, default=8, help="(default: 8)")
  parser.add_argument("--prompt", type=int, default=1800, help="prompt tokens (default: 1800)")
  parser.add_argument("--gen", type=int, default=256, help="tokens to generate (default: 256)")
  args = parser.parse_args(argv)
  rows = []
  print(f"{args.topology} (compiled without one, JAX {jax.__version__}); 3B-shaped model, bf16, batch {args.batch}, "
        f"{args.prompt}-token prompts, {args.gen} new tokens")
  print("| setting | mesh | cache copies per forward | per call | in-place cache writes per forward | per call "
        "| temporaries GiB per chip | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for setting in args.settings:
    for text in args.meshes:
      mesh_shape = tuple(int(x) for x in text.split(","))
      program, elements, seconds = compiled(setting, mesh_shape, args.topology, args.batch, args.prompt, args.gen)
      ops = cache_ops(program.as_text(), elements)
      row = dict(setting=setting, mesh=text, loop_copies=ops[("loop", "copy")], call_copies=ops[("call", "copy")],
                 loop_writes=ops[("loop", "in place")], call_writes=ops[("call", "in place")],
                 temp_gib=program.memory_analysis().temp_size_in_bytes / 2 ** 30, compile_s=seconds)
      rows.append(row)
      print(f"| {setting} | {text} | {row['loop_copies']} | {row['call_copies']} | {row['loop_writes']} | "
            f"{row['call_writes']} | {row['temp_gib']:.2f} | {seconds:.1f} |", flush=True)
  return rows


if __name__ == "__main__":
  main()
