"""The environment of a process started the way a user starts one: one CPU device, this checkout importable."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_env() -> dict[str, str]:
  """This process's environment minus conftest's `XLA_FLAGS` (8 fake CPU devices are for the sharding
  tests; a user's CPU process has one), with the repo root on `PYTHONPATH`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return env
