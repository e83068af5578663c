"""`attend(q, k, v, spec, backend)`: the one attention entry point of the model, loss and sampler."""

from __future__ import annotations

import os

import jax

from dvl_jax.attention.reference import attend_dense
from dvl_jax.attention.spec import AttentionSpec

BACKENDS = ("auto", "xla")
ENV_VAR = "DVL_ATTENTION_BACKEND"


def resolve_backend(backend: str = "auto") -> str:
  """`DVL_ATTENTION_BACKEND` overrides the config; `auto` picks by platform (only `xla` exists yet)."""
  backend = os.environ.get(ENV_VAR, backend)
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
  return "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, backend: str = "auto") -> jax.Array:
  """q `[B, Lq, Hq, D]`, k/v `[B, Lk, Hkv, D]` -> `[B, Lq, Hq, D]` under the mask `spec`."""
  resolve_backend(backend)
  return attend_dense(q, k, v, spec)
