"""The environment of a process started the way a user starts one: one CPU device, this checkout importable."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA CPU flags that make compiles several times cheaper without changing the program (the HLO): LLVM's cheap
# pipeline, and XLA's loop emitters instead of its MLIR fusion emitters (which halves the backend compile time at
# that pipeline: 60 -> 30 s for `tests/diffusion/test_sampler.py`). The test processes and the user-like processes
# they start both use them. The cheap pipeline's values differ from XLA's default build by float rounding (a tiny
# model's logits up to 3e-5 apart, its greedy and sampled tokens the same); the loop emitters alone give the
# default build's bits (the same model's logits, gradients and tokens).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def user_env(fast_compile: bool = True) -> dict[str, str]:
  """This process's environment with conftest's 8 fake CPU devices dropped from `XLA_FLAGS` (they are for the
  sharding tests; a user's CPU process has one device), and the repo root on `PYTHONPATH`. `fast_compile=False`
  keeps XLA's default (optimised) code, for a process that runs more than it compiles (the demo's training)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if fast_compile:
    env["XLA_FLAGS"] = FAST_COMPILE
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return env
