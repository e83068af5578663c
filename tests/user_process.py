"""The environment of a process started the way a user starts one: one CPU device, this checkout importable."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA CPU flags that make compiles several times cheaper (LLVM's cheap pipeline) without changing the program
# or its numbers; the test processes and the user-like processes they start both use them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def user_env(fast_compile: bool = True) -> dict[str, str]:
  """This process's environment with conftest's 8 fake CPU devices dropped from `XLA_FLAGS` (they are for the
  sharding tests; a user's CPU process has one device), and the repo root on `PYTHONPATH`. `fast_compile=False`
  keeps XLA's default (optimised) code, for a process that runs more than it compiles (the demo's training)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if fast_compile:
    env["XLA_FLAGS"] = FAST_COMPILE
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return env
