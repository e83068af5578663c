"""Sampling speed: AR decoding vs block diffusion (static / dynamic / threshold, reference vs fused), on one
device or over `('data', 'fsdp', 'tensor')` meshes.

A random ~56M-parameter Qwen2.5 text model (hidden 512, 8 layers, GQA 8/2, 32k vocabulary; `--vocab full`: the
151,680 rows of the real checkpoints, 179M parameters, most of them in the embedding and the lm_head) decodes
`--gen` tokens for `--batch` prompts of different lengths. Its lm_head is scaled so confidences spread
over (0, 1) as in a trained model (at the default init every position has confidence ~1/vocab and
dynamic / threshold decoding would fix one token per pass); the EOS logit is pinned to 0, so the
model never emits it and every setting decodes all tokens. Settings alternate inside each repeat (timings drift).

`--layers` compares the layer layouts on the same weights: `stacked` (`scan_layers=True`, `lax.scan` over the
stacked params, which XLA copies a layer's matrices out of in every forward) and `per-layer` (`scan_layers=False`:
an unrolled loop reading each layer's weights in place; longer compiles).

Columns: layers, mesh (`data,fsdp,tensor`, "1" for one device), tokens/s (decoded tokens per wall second, best
repeat), tokens per CPU second of this process (steadier than wall time on a shared machine), tokens per
forward, NFE (model forwards per row, prefill included), the NFE of the original algorithm for the same
output (a separate commit pass per block, `mode="reference"`: the reference setting's NFE, "-" when it is not
run), speed-up in NFE over the original eval
setting (static, steps 8, reference), compile seconds, XLA's peak buffer estimate per device (arguments +
outputs + temporaries), and the params' and the KV cache's bytes on one device.

`--split` profiles one more run of each setting and splits its CPU time per forward (best repeat) into decoder /
lm_head / proposal / other, in the shares the decoding loop's XLA ops take by named scope (the prefill is left
out), next to the time one full read of the decoder's and the lm_head's weights takes (a forward cannot be
faster than reading them). CPU time, not wall time: on a shared machine it is the steadier of the two.

`--settings` picks among the greedy settings (the default) and three that sample (temperature 0.7, top-p 0.95,
key 0: AR, static and dynamic block diffusion), which show what the sampled path's filters and noise cost.

`--mesh` takes shapes (`2,1,4`), `auto` (`suggest_mesh` for the largest batch) or `1` (one device). On
CPU, fake devices must exist before jax starts; they share the host's cores, so their tokens/s measure
the sharded program's overhead, not a speed-up (memory per device is real):

    python benchmarks/sampling.py [--batch 1 8] [--gen 256] [--repeats 2] [--small] [--vocab full] [--split]
                                  [--layers stacked per-layer]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sampling.py --mesh 1 1,1,8 2,1,4
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.profiler import ProfileData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dvl_jax.testing.tiny import tiny_config  # noqa: E402
from dvl_jax.diffusion import sampler  # noqa: E402
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig  # noqa: E402
from dvl_jax.models.interface import path_names  # noqa: E402
from dvl_jax.models.families import build_model  # noqa: E402
from dvl_jax.parallel.mesh import make_mesh  # noqa: E402
from dvl_jax.parallel.rules import shard_model  # noqa: E402
from dvl_jax.diffusion.sampling_mesh import suggest_mesh  # noqa: E402

SETTINGS = {
    "AR greedy": dict(algorithm="autoregressive"),
    "static s8 reference (original)": dict(mode="reference"),
    "static s8 fused": dict(mode="fused"),
    "static s8 fused, every commit fused": dict(mode="fused", fused_window_share=0.0),
    "dynamic t0.85 reference": dict(mode="reference", remasking_strategy="low_confidence_dynamic"),
    "dynamic t0.85 fused": dict(mode="fused", remasking_strategy="low_confidence_dynamic"),
    "dynamic t0.85 fused, every commit fused": dict(mode="fused", remasking_strategy="low_confidence_dynamic",
                                                    fused_window_share=0.0),
    "dynamic t0.85 fused, commits packed": dict(mode="fused", remasking_strategy="low_confidence_dynamic",
                                                packed_commit_share=0.25),
    "threshold t0.9 reference": dict(mode="reference", remasking_strategy="threshold", confidence_threshold=0.9),
    "threshold t0.9 fused": dict(mode="fused", remasking_strategy="threshold", confidence_threshold=0.9),
    "AR sampled T0.7 p0.95": dict(algorithm="autoregressive", temperature=0.7, top_p=0.95),
    "static s8 fused, sampled T0.7 p0.95": dict(mode="fused", temperature=0.7, top_p=0.95),
    "dynamic t0.85 fused, sampled T0.7 p0.95": dict(mode="fused", remasking_strategy="low_confidence_dynamic",
                                                     temperature=0.7, top_p=0.95),
}


FULL_VOCAB = 151_680  # Qwen2.5-VL's embedding rows
LAYOUTS = ("stacked", "per-layer")  # scan_layers True (lax.scan over stacked params) / False (an nnx.List)
SCOPES = ("decoder", "lm_head", "proposal")  # named scopes of the models' and samplers' ops; the rest is "other"


def bench_model(small: bool, lm_head_scale: float, vocab: int | None = None, layers: str = "stacked", seed: int = 0,
                **config: Any) -> Any:
  """The random model of the module docstring (params from `seed`); `config`: `ModelConfig` fields that override
  its own."""
  cfg = tiny_config()
  vocab = vocab or (4096 if small else 32768)
  hidden = 256 if small else 512
  text = dataclasses.replace(cfg.text, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_layers=4 if small else 8, num_heads=8, num_kv_heads=2, rope_theta=1e6,
                             mrope_section=(4, 6, 6) if small else (8, 12, 12))  # sums to head_dim / 2
  cfg = cfg.replace(**{**dict(text=text, mask_token_id=vocab - 1, eos_token_id=vocab - 2, position_mode="flat",
                               scan_layers=layers == "stacked"), **config})
  model = build_model(cfg, nnx.Rngs(seed))
  kernel = model.lm_head.kernel[...] * lm_head_scale
  model.lm_head.kernel[...] = kernel.at[:, cfg.eos_token_id].set(0.0)  # logit 0, far below the max: no EOS
  return model


def peak_bytes(lowered: jax.stages.Lowered) -> tuple[float, int]:
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  return seconds, m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def loop_scopes(hlo: str) -> dict[str, str]:
  """Instruction name -> scope of the compiled program's decoding-loop ops. XLA passes drop the name of some
  ops (dots among them): such an op takes that of its first named user (inside a fusion: of the fused parameter
  it feeds). Control flow is left out (its events span the
  ops inside)."""
  named, users, calls, params, ops = {}, collections.defaultdict(list), {}, {}, []
  computation = ""
  for line in hlo.splitlines():
    start = re.match(r"(?:ENTRY )?%?([\w.-]+) \(", line)
    if start:
      computation = start.group(1)
    head = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = .*? ([a-z][\w-]*)\((.*)", line)
    if not head:
      continue
    name, opcode, rest = head.groups()
    if opcode == "parameter":
      params[computation, int(rest.split(")")[0])] = name
    op_name = re.search(r'op_name="([^"]*)"', rest)
    if op_name:
      named[name] = op_name.group(1)
    callee = re.search(r"calls=%([\w.-]+)", rest)
    calls[name] = callee and callee.group(1)
    for i, operand in enumerate(re.findall(r"%([\w.-]+)", rest.split("), ")[0])):
      users[operand].append((name, i))
    if opcode not in ("while", "conditional", "call", "parameter", "get-tuple-element", "tuple", "bitcast"):
      ops.append(name)

  def op_name(name: str, depth: int = 0) -> str:
    if name in named or depth > 8:
      return named.get(name, "")
    for user, i in users[name]:
      found = op_name(params.get((calls[user], i), user), depth + 1)
      if found:
        return found
    return ""

  scopes = {}
  for name in ops:
    full = op_name(name)
    if "decode_loop" in full:
      scopes[name] = next((s for s in SCOPES if f"/{s}/" in full), "other")
  return scopes


def split(model: Any, prompts: Prompts, config: SamplingConfig) -> dict[str, float]:
  """Each scope's share of the decoding loop's op time in a profile of one `generate`."""
  scopes = loop_scopes(sampler.lower(model, prompts, config).compile().as_text())
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    sampler.generate(model, prompts, config)
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
  spent = collections.Counter()
  for line in (line for plane in data.planes for line in plane.lines):
    for event in line.events:
      op = dict(event.stats).get("hlo_op")
      spent[scopes.get(op, "")] += event.duration_ns if op in scopes else 0
  total = sum(spent.values()) or 1
  return {scope: spent[scope] / total for scope in (*SCOPES, "other")}


def read_ms(tree: Any, repeats: int = 5) -> tuple[float, float]:
  """Wall and CPU milliseconds one pass over every array of `tree` takes (a max-reduction: one read of each
  byte)."""
  read = jax.jit(lambda t: [jnp.max(a) for a in jax.tree.leaves(t)])
  jax.block_until_ready(read(tree))
  best, best_cpu = np.inf, np.inf
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(read(tree))
    best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
  return best * 1e3, best_cpu * 1e3


def placed(model: Any, choice: str, batch: int) -> tuple[str, Any]:
  """(label, the model with its params on the mesh `choice`: "1" (one device), "auto" or "data,fsdp,tensor")."""
  if choice == "1":
    return "1", model
  shape = suggest_mesh(model.config, batch=batch) if choice == "auto" else tuple(int(n) for n in choice.split(","))
  devices = int(np.prod(shape))
  if devices > jax.device_count():
    raise SystemExit(f"mesh {shape} needs {devices} devices, {jax.device_count()} exist (on CPU set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N before starting)")
  mesh = make_mesh(shape, jax.devices()[:devices])
  label = ("auto=" if choice == "auto" else "") + ",".join(map(str, shape))
  return label, shard_model(model, mesh)


def mib_per_device(tree: object) -> float:
  """Bytes that one device (the first) holds of the arrays in `tree`, in MiB."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards if s.device == device) / 2**20


def bench(models: dict[str, Any], mesh: str, batch: int, args: argparse.Namespace
          ) -> tuple[list[tuple], list[tuple]]:
  """One table row per (layer layout, setting) for `batch` prompts (the same on every mesh) on the devices of
  `models` (one per layout, the same weights), and one row of its per-forward split if `args.split`."""
  rng = np.random.default_rng(batch)
  model = next(iter(models.values()))
  lengths = [40 + 3 * i for i in range(batch)]  # different prompt lengths: per-row offsets
  prompts = Prompts.from_lists([rng.integers(3, 1000, n).tolist() for n in lengths])
  configs = {(layers, name): SamplingConfig(gen_length=args.gen, compact_rows=args.compact_rows, **SETTINGS[name])
             for name in args.settings for layers in models}
  compile_s, peak = {}, {}
  for key, config in configs.items():
    compile_s[key], peak[key] = peak_bytes(sampler.lower(models[key[0]], prompts, config))
  wall = {key: np.inf for key in configs}
  cpu = dict(wall)
  outs = {}
  for repeat in range(args.repeats + 1):  # round 0 warms up
    for key, config in configs.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      outs[key] = sampler.generate(models[key[0]], prompts, config)
      if repeat:
        wall[key] = min(wall[key], time.perf_counter() - start)
        cpu[key] = min(cpu[key], time.process_time() - start_cpu)
  params = mib_per_device(nnx.state(model))
  rows, splits = [], []
  for (layers, name), out in outs.items():
    key = (layers, name)
    if args.split:
      per_forward, cpu_per_forward = wall[key] / out.forwards * 1e3, cpu[key] / out.forwards * 1e3
      shares = split(models[layers], prompts, configs[key])
      splits.append((name, layers, mesh, batch, f"{per_forward:.1f}", f"{cpu_per_forward:.1f}",
                     *(f"{cpu_per_forward * x:.1f}" for x in shares.values())))
    decoded = float(out.tokens_per_forward @ out.nfe)
    twin = outs.get((layers, reference_twin(name)))
    orig_nfe = "-" if twin is None else f"{np.mean(twin.nfe):.1f}"
    original = outs.get((layers, "static s8 reference (original)"))
    gain = "-" if original is None else f"{np.mean(original.nfe) / np.mean(out.nfe):.2f}x"
    rows.append((name, layers, mesh, batch, f"{decoded / wall[key]:.1f}", f"{decoded / cpu[key]:.1f}",
                 f"{np.mean(out.tokens_per_forward):.2f}", f"{np.mean(out.nfe):.1f}", orig_nfe,
                 gain, f"{compile_s[key]:.1f}", f"{peak[key] / 2**20:.0f}", f"{params:.1f}",
                 f"{mib_per_device(out.cache):.1f}"))
  return rows, splits


def reference_twin(name: str) -> str | None:
  """The setting that decodes the same tokens as `name` with the original's separate commit passes (its NFE is
  the original's for that output), if there is one."""
  twin = {k: v for k, v in SETTINGS[name].items() if k not in ("fused_window_share", "packed_commit_share")}
  if twin.get("algorithm") != "autoregressive":
    twin["mode"] = "reference"
  return next((n for n, setting in SETTINGS.items() if setting == twin), None)


def table(header: tuple[str, ...], rows: list[tuple]) -> None:
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--gen", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--small", action="store_true", help="a ~3M model for a quick check")
  parser.add_argument("--vocab", default=None, help=f'vocabulary rows: a number or "full" ({FULL_VOCAB:,}); '
                      "default 32768 (4096 with --small)")
  parser.add_argument("--split", action="store_true", help="profile each setting: ms per forward in decoder / "
                      "lm_head / proposal / other")
  parser.add_argument("--lm-head-scale", type=float, default=40.0)
  parser.add_argument("--compact-rows", action="store_true", help="finished rows leave the batch (SamplingConfig."
                      "compact_rows: same tokens, longer compiles)")
  parser.add_argument("--settings", nargs="+", default=[name for name in SETTINGS if "sampled" not in name],
                      choices=list(SETTINGS), help="default: the greedy ones")
  parser.add_argument("--mesh", nargs="+", default=["1"], help='"1" (one device), "auto" or data,fsdp,tensor')
  parser.add_argument("--layers", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
                      help="layer layouts to compare (scan_layers True / False; the same weights)")
  args = parser.parse_args()

  vocab = FULL_VOCAB if args.vocab == "full" else args.vocab and int(args.vocab)
  models = {layers: bench_model(args.small, args.lm_head_scale, vocab, layers) for layers in args.layers}
  model = next(iter(models.values()))
  params = sum(x.size for path, x in jax.tree.leaves_with_path(nnx.state(model))
               if model.param_group(path_names(path)) == "language")
  print(f"text model {params / 1e6:.1f}M params, gen {args.gen}, block {model.config.block_size}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
  rows, splits = [], []
  for mesh in args.mesh:
    placements = {layers: placed(m, mesh, max(args.batch)) for layers, m in models.items()}
    label = next(iter(placements.values()))[0]
    for batch in args.batch:
      new_rows, new_splits = bench({k: m for k, (_, m) in placements.items()}, label, batch, args)
      rows, splits = rows + new_rows, splits + new_splits
  table(("setting", "layers", "mesh", "batch", "tokens/s", "tokens/CPU-s", "tok/fwd", "NFE/row", "orig NFE", "NFE gain",
         "compile s", "peak MiB", "params MiB/dev", "cache MiB/dev"), rows)
  if args.split:
    reads = {name: read_ms(nnx.state(part)) for name, part in (("decoder layers", model.text.layers),
                                                                ("lm_head", model.lm_head))}
    print("\none read of the weights (wall / CPU ms): " + ", ".join(f"{k} {w:.1f} / {c:.1f}" for k, (w, c) in
                                                                   reads.items()))
    table(("setting", "layers", "mesh", "batch", "ms/forward", "CPU ms/forward", *(f"{s} CPU ms" for s in SCOPES),
           "other CPU ms"), splits)


if __name__ == "__main__":
  main()
