"""The samplers' GPU programs compiled on a machine without a GPU: the kernels each decoding step runs.

Most sessions have no GPU, and on one a decoding step of a 3B model is bound by how many kernels it runs more than
by its weight bytes (on an H200 an AR step of the batch-2 program took 2.56 ms for 1.29 ms of weight reads, and
launching its kernels as one CUDA graph or not made no difference), so the kernel count of a step is the number
to watch between GPU runs. JAX compiles for a target GPU without one (deviceless: its CUDA plugin, no driver);
XLA's thunk sequence (`--xla_dump_to`) lists the kernels of the compiled program, and its optimised HLO shows
the single-row rewrite `layers.ONE_ROW_AS_TWO` works around (a vector x matrix product turned into an
elementwise product written out at the weight's shape, then summed).

Prints one row per (setting, batch) on the accelerator bench's 3B-shaped model (`--tiny`: its tiny one): kernels
per decoding step (a step that branches runs one branch: the fewest and the most), of them the own Pallas
attention kernels, kernels outside the loop (prefill, outputs), elementwise products at a weight's shape
(should be 0), per-layer copies of the KV cache in the program (should be 0), compile seconds.

Needs JAX's CUDA plugin importable, not installed in the project's venv (without a driver it would make every
JAX start try CUDA first): `pip install --no-deps --target .gpu-aot jax-cuda12-plugin==0.10.2
jax-cuda12-pjrt==0.10.2`, then `PYTHONPATH=.gpu-aot .venv/bin/python benchmarks/gpu_programs.py` (a JAX 0.11
venv takes jax-cuda13-plugin / jax-cuda13-pjrt 0.11.x the same way).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import deviceless  # noqa: E402  (first: it lets a CUDA plugin start without a driver)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import dvl_jax as dvl  # noqa: E402
from benchmarks import accelerator, sampling  # noqa: E402
from dvl_jax.diffusion import sampler  # noqa: E402
from dvl_jax.models import layers  # noqa: E402
from dvl_jax.models.families import abstract_model  # noqa: E402

_IGNORED = {"kCommandBuffer", "kWhile", "kConditional", "kSequential", "kWaitForStreams"}
_THUNK = re.compile(r"^( *)\d+: (k\w+)\s*\[[^\]]*\]\s*(\S*)")
_SECTION = re.compile(r"^( *)(\w+):\s*$")


# ---- reading XLA's thunk sequence ------------------------------------------------------------------------------

@dataclasses.dataclass
class Thunk:
  """One line of a thunk sequence: its kind, kernel name, and nested sections (a while's condition and body, a
  conditional's branches; a command buffer's kernels are its `""` section)."""

  kind: str
  name: str = ""
  sections: dict[str, list["Thunk"]] = dataclasses.field(default_factory=dict)

  @property
  def branches(self) -> list[list["Thunk"]]:
    """A conditional's branches."""
    return [thunks for name, thunks in self.sections.items() if name]


def parse_thunks(text: str) -> list[Thunk]:
  """`*.thunk_sequence_after_thunk_passes.txt` -> its top-level thunks, nested by indentation (a while's
  `condition:` may sit at the while's own indentation)."""
  top: list[Thunk] = []
  stack: list[tuple[int, list[Thunk], Thunk | None]] = [(-1, top, None)]  # (indent, where thunks go, its thunk)
  for line in text.splitlines():
    if section := _SECTION.match(line):
      indent = len(section.group(1))
      while stack[-1][2] is None or stack[-1][2].kind not in ("kWhile", "kConditional") or stack[-1][0] > indent:
        if len(stack) == 1:
          raise ValueError(f"a section outside a while or conditional: {line.strip()!r}")
        stack.pop()
      owner = stack[-1][2]
      stack.append((indent, owner.sections.setdefault(section.group(2), []), None))
    elif thunk := _THUNK.match(line):
      indent = len(thunk.group(1))
      while stack[-1][0] >= indent:
        stack.pop()
      node = Thunk(thunk.group(2), thunk.group(3))
      stack[-1][1].append(node)
      stack.append((indent, node.sections.setdefault("", []), node))
  return top


def kernels(thunks: list[Thunk], with_loops: bool = False) -> tuple[int, int]:
  """(fewest, most) kernels `thunks` run once; a conditional runs one branch; a while loop counts as its
  condition and body once `with_loops`, else not at all."""
  low = high = 0
  for t in thunks:
    if t.kind == "kConditional":
      counts = [kernels(branch, with_loops) for branch in t.branches]
      low, high = low + min(c[0] for c in counts), high + max(c[1] for c in counts)
    elif t.kind == "kWhile":
      if with_loops:
        counts = [kernels(t.sections.get(s, []), with_loops) for s in ("condition", "body")]
        low, high = low + sum(c[0] for c in counts), high + sum(c[1] for c in counts)
    elif t.kind == "kCommandBuffer":
      inner = kernels(t.sections.get("", []), with_loops)
      low, high = low + inner[0], high + inner[1]
    elif t.kind not in _IGNORED:
      low, high = low + 1, high + 1
  return low, high


def loops(thunks: list[Thunk]) -> list[Thunk]:
  """Every while loop in `thunks`, outermost first."""
  found = []
  for t in thunks:
    found += [t] if t.kind == "kWhile" else []
    for section in t.sections.values():
      found += loops(section)
  return found


def named(thunks: list[Thunk], prefix: str) -> int:
  """Kernels whose name starts with `prefix`, a loop's counted once, a conditional's in its largest branch."""
  total = 0
  for t in thunks:
    if t.kind == "kConditional":
      total += max(named(branch, prefix) for branch in t.branches)
    else:
      total += t.name.startswith(prefix) + sum(named(s, prefix) for s in t.sections.values())
  return total


def cache_copies(hlo: str, cache_len: int, kv_heads: int, head_dim: int) -> int:
  """Fusions or copies writing a `[B, L >= cache_len, kv_heads, head_dim]` array: a layer's KV cache copied (the
  new keys appended, padded) rather than read in place; 0 since 3716a5c, two a layer before."""
  found = re.findall(r"= \w+\[(\d+),(\d+),(\d+),(\d+)\]\{[\d,]*\} (?:fusion|copy)\(", hlo)
  return sum(int(length) >= cache_len and (int(h), int(d)) == (kv_heads, head_dim) for _, length, h, d in found)


def weight_shaped_products(hlo: str, shapes: set[tuple[int, ...]]) -> int:
  """Elementwise fusions whose output has a weight matrix's shape: XLA's rewrite of a single row's product."""
  found = re.findall(r"= \w+\[(\d+),(\d+)\]\{1,0\} fusion\([^\n]*kind=kLoop", hlo)
  return sum((int(a), int(b)) in shapes for a, b in found)


# ---- compiling for the target ----------------------------------------------------------------------------------

def compiled_program(model: Any, prompts: Any, config: Any, device: Any) -> tuple[str, list[Thunk], float]:
  """(optimised HLO, thunk sequence, compile seconds) of `dvl.generate`'s program for these shapes on `device`."""
  start = time.perf_counter()
  with deviceless.target(device):
    lowered = sampler.lower(model, prompts, config)
  dump = tempfile.mkdtemp(prefix="dvl-gpu-programs-")  # XLA's dumps, ~25 MB a program
  try:
    compiled = lowered.compile({"xla_dump_to": dump})
    seconds = time.perf_counter() - start
    [path] = glob.glob(os.path.join(dump, "*.thunk_sequence_after_thunk_passes.txt"))
    with open(path, encoding="utf-8") as f:
      return compiled.as_text(), parse_thunks(f.read()), seconds
  finally:
    shutil.rmtree(dump, ignore_errors=True)


def placed_model(cfg: Any, device: Any) -> Any:
  """The model's params as shapes on the target device: nothing is allocated."""
  graphdef, state = nnx.split(abstract_model(cfg))
  place = jax.sharding.SingleDeviceSharding(device)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), state))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", choices=sorted(deviceless.GPUS), default="h200", help="the GPU to compile "
                      "for (default h200)")
  parser.add_argument("--settings", nargs="+", choices=list(sampling.SETTINGS), metavar="SETTING",
                      default=["AR greedy", "dynamic t0.85 fused"], help="sampler settings (default: AR greedy, "
                      "dynamic t0.85 fused)")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8], help="(default: 1 2 8)")
  parser.add_argument("--plain-one-row-products", action="store_true", help="no `layers.ONE_ROW_AS_TWO` "
                      "workaround, as accelerator.py's flag")
  parser.add_argument("--tiny", action="store_true", help="the accelerator bench's tiny model (seconds)")
  args = parser.parse_args(argv)
  topo = deviceless.gpu_topology(args.target)
  if args.plain_one_row_products:
    layers.ONE_ROW_AS_TWO = ()
  s = accelerator.shapes(args.tiny)
  model = placed_model(s.sampler, topo.devices[0])
  weights = {tuple(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim == 2}
  print(f"{topo.devices[0].device_kind} (compiled without one, JAX {jax.__version__}); {s.name} sampler model; "
        f"single rows as two on: {', '.join(layers.ONE_ROW_AS_TWO) or 'no backend'}")
  print("| setting | batch | kernels per step | Pallas kernels per step | kernels outside the loop "
        "| weight-shaped products | KV-cache copies | compile s |\n|---|---|---|---|---|---|---|---|")
  rows = []
  for name in args.settings:
    for batch in args.batches:
      ids = np.random.default_rng(batch).integers(3, 1000, s.prompt + 3 * batch)
      prompts = dvl.Prompts.from_lists([ids[:s.prompt + 3 * i].tolist() for i in range(batch)])
      config = dvl.SamplingConfig(gen_length=s.gen, **sampling.SETTINGS[name])
      hlo, thunks, seconds = compiled_program(model, prompts, config, topo.devices[0])
      loop = max(loops(thunks), key=lambda t: kernels([t], with_loops=True)[1])
      step = kernels([loop], with_loops=True)
      cache_len = config.resolve(s.sampler).cache_len(prompts.bucketed(config, s.sampler).ids.shape[1])
      t = s.sampler.text
      row = {"setting": name, "batch": batch, "step": step, "pallas": named([loop], "dvl_"),
             "outside": kernels(thunks), "weight_shaped": weight_shaped_products(hlo, weights),
             "cache_copies": cache_copies(hlo, cache_len, t.num_kv_heads, t.head_dim), "compile_s": seconds}
      span = lambda c: str(c[0]) if c[0] == c[1] else f"{c[0]}-{c[1]}"  # noqa: E731
      print(f"| {name} | {batch} | {span(step)} | {row['pallas']} | {span(row['outside'])} | "
            f"{row['weight_shaped']} | {row['cache_copies']} | {seconds:.1f} |", flush=True)
      rows.append(row)
  return rows


if __name__ == "__main__":
  main()
