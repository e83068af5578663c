"""`attend(q, k, v, spec, backend)`: the one attention entry point of the model, loss and sampler.

Backends: `xla` (dense reference), `splash` (TPU Pallas), `pallas_gpu` (our Pallas/Triton kernel),
`cudnn` (GPU fallback). `auto` picks splash on TPU, pallas_gpu on GPU and xla elsewhere; the
`DVL_ATTENTION_BACKEND` environment variable overrides the model config's `attention_backend`. A
backend that cannot run the inputs (dtype, head dim, a KV-cache window on splash, wrong platform, a JAX
without Pallas' Triton backend) hands them on with one warning per backend and reason (the own GPU kernel to
cuDNN, anything else to `xla`) — never a silently different answer. A `CachePrefix` (decoding: keys
`[cache ; new]`) is read in place by a backend that can (`pallas_gpu`; on `splash`'s TPUs the decoding kernel of
`tpu_decode`) and concatenated for the others.
Forcing a Pallas backend on CPU runs it in the Pallas interpreter (tests).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple

import jax

from dvl_jax.attention import cudnn, pallas_gpu, shards, splash, tpu_decode
from dvl_jax.attention.cache_prefix import CachePrefix
from dvl_jax.attention.reference import attend_dense
from dvl_jax.attention.spec import AttentionSpec

ENV_VAR = "DVL_ATTENTION_BACKEND"


class _Backend(NamedTuple):
  attend: Callable[..., jax.Array]
  unsupported: Callable[..., str | None]
  attend_prefixed: Callable[..., jax.Array] | None = None  # reads a CachePrefix in place
  attend_prefixed_joint: Callable[..., jax.Array] | None = None  # and q, k, v from one array
  prefixed_unsupported: Callable[..., str | None] | None = None  # when another kernel reads the prefix
  reads_prefix: Callable[..., bool] | None = None  # (length, head_dim, cache dtype, query dtype): else concatenated

  def refuses(self, q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, prefix: CachePrefix | None
              ) -> str | None:
    """Why this backend cannot run these inputs, or None."""
    with_prefix = prefix is not None and self.prefixed_unsupported is not None
    return (self.prefixed_unsupported if with_prefix else self.unsupported)(q, k, v, spec)


_IMPLS = {
    "xla": _Backend(attend_dense, lambda *_: None),
    "splash": _Backend(splash.attend, splash.unsupported, tpu_decode.attend_prefixed,
                       prefixed_unsupported=tpu_decode.unsupported),
    "pallas_gpu": _Backend(pallas_gpu.attend, pallas_gpu.unsupported, pallas_gpu.attend_prefixed,
                           pallas_gpu.attend_prefixed_joint, reads_prefix=pallas_gpu.reads_prefix_in_place),
    "cudnn": _Backend(cudnn.attend, cudnn.unsupported),
}
BACKENDS = ("auto", *_IMPLS)
_AUTO = {"tpu": "splash", "gpu": "pallas_gpu"}
_NEXT = {"pallas_gpu": "cudnn"}  # who takes inputs a backend cannot run (else `xla`, which runs everything)
_WARNED: set[tuple[str, str]] = set()


def resolve_backend(backend: str = "auto") -> str:
  """The concrete backend: the environment variable wins over `backend`; `auto` picks by platform."""
  backend = os.environ.get(ENV_VAR) or backend
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
  return _AUTO.get(jax.default_backend(), "xla") if backend == "auto" else backend


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, prefix: CachePrefix | None
                  ) -> None:
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"attention wants q [B, Lq, Hq, D] and k = v [B, Lk, Hkv, D]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
  lp = 0 if prefix is None else prefix.length
  if prefix is not None and (prefix.keys.shape != prefix.values.shape or prefix.keys.ndim != 5
                             or (prefix.keys.shape[1], *prefix.keys.shape[3:]) != (k.shape[0], *k.shape[2:])):
    raise ValueError(f"a cache prefix must be [layers, B, Lp, Hkv, D] with k's B, Hkv, D ({k.shape}); got "
                     f"{prefix.keys.shape}, {prefix.values.shape}")
  want = (q.shape[:2], (k.shape[0], lp + k.shape[1]))
  if (spec.q_idx.shape, spec.kv_idx.shape) != want or (spec.q_seg.shape, spec.kv_seg.shape) != want:
    raise ValueError(f"spec arrays must be [B, Lq] / [B, Lk] = {want}; got {spec.q_idx.shape}, {spec.kv_idx.shape}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, backend: str = "auto",
           prefix: CachePrefix | None = None) -> jax.Array:
  """q `[B, Lq, Hq, D]`, k/v `[B, Lk, Hkv, D]` -> `[B, Lq, Hq, D]` under the mask `spec`.

  With a `prefix` the keys are `[prefix ; k]` (`spec`'s key arrays `[B, Lp + Lk]`; for decoding: read in place, the
  prefix is forward only).
  Rows with no allowed key (padding) are unspecified but finite: `xla` returns a uniform average,
  the Pallas kernels 0.
  """
  return _attend_with(_runnable(q, k, v, spec, backend, prefix), q, k, v, spec, prefix)


def attend_joint(qkv: jax.Array, num_heads: int, spec: AttentionSpec, backend: str = "auto",
                 prefix: CachePrefix | None = None) -> jax.Array:
  """`attend` for queries, keys and values as one array `[B, L, Hq + 2 Hkv, D]` (heads in that order), as a
  decoding step computes them in one fused epilogue: the own GPU kernel reads them from it when decoding (three
  arrays cut from it would be three copies, a kernel each); the other cases attend over the slices."""
  q, k, v = joint_parts(qkv, num_heads)
  impl = _runnable(q, k, v, spec, backend, prefix)
  if prefix is not None and impl.attend_prefixed_joint is not None:
    return impl.attend_prefixed_joint(qkv, num_heads, spec, prefix)
  return _attend_with(impl, q, k, v, spec, prefix)


def joint_parts(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q `[B, L, Hq, D]`, k, v `[B, L, Hkv, D]` of `attend_joint`'s one array."""
  hkv = (qkv.shape[2] - num_heads) // 2
  return qkv[:, :, :num_heads], qkv[:, :, num_heads:num_heads + hkv], qkv[:, :, num_heads + hkv:]


def reads_joint(backend: str, batch: int, kv_heads: int) -> bool:
  """Whether a decoding step should give `attend_joint` its q, k and v as one array: the backend reads them from
  it, and heads are not split over devices (q, k and v would then each need their own split: on a mesh with
  `tensor` the joint array costs collectives)."""
  split = shards.split(batch, kv_heads)
  return (_IMPLS[resolve_backend(backend)].attend_prefixed_joint is not None
          and (split is None or split.heads is None))


def reads_cache_in_place(backend: str, *, heads: int, kv_heads: int, head_dim: int, length: int, dtype: Any,
                         cache_dtype: Any) -> bool:
  """Whether decoding with `backend` reads a KV cache of `length` slots where it is, each row's live tiles only (the
  own GPU kernel; TPU's decoding kernel), for queries of `heads` x `head_dim` in `dtype`: attending to a shorter
  prefix of the cache then saves only dead tiles' checks. False where the kernel would refuse these inputs (another
  backend then attends over the concatenation) or concatenate the cache itself."""
  impl = _IMPLS[resolve_backend(backend)]
  if impl.attend_prefixed is None:
    return False
  q, k = (jax.ShapeDtypeStruct((1, 1, n, head_dim), dtype) for n in (heads, kv_heads))
  cache = jax.ShapeDtypeStruct((1, 1, length, kv_heads, head_dim), cache_dtype)
  if impl.refuses(q, k, k, None, CachePrefix(cache, cache, 0)) is not None:  # (the refusals read no mask)
    return False
  return impl.reads_prefix is None or impl.reads_prefix(length, head_dim, cache_dtype, dtype)


def _runnable(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, backend: str,
              prefix: CachePrefix | None) -> _Backend:
  """The backend that runs these inputs: the chosen one or the next that can (one warning per backend and
  reason)."""
  _check_shapes(q, k, v, spec, prefix)
  name = resolve_backend(backend)
  while (reason := _IMPLS[name].refuses(q, k, v, spec, prefix)) is not None:
    after = _NEXT.get(name, "xla")
    if (name, reason) not in _WARNED:
      _WARNED.add((name, reason))
      warnings.warn(f"attention backend {name!r} cannot run {reason}; falling back to {after!r}", stacklevel=3)
    name = after
  return _IMPLS[name]


def _attend_with(impl: _Backend, q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec,
                 prefix: CachePrefix | None) -> jax.Array:
  if prefix is not None:
    if impl.attend_prefixed is not None:
      return impl.attend_prefixed(q, k, v, spec, prefix)
    k, v = prefix.joined(k, v)
  return impl.attend(q, k, v, spec)
