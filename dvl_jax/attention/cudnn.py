"""GPU fallback: cuDNN flash attention (`jax.nn.dot_product_attention`) under the spec's dense mask.

cuDNN takes the mask as a dense `[B, 1, Lq, Lk]` array (no tile skipping) and GQA natively. Off a GPU
the same call runs jax's XLA implementation, so the wrapper is tested on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dvl_jax.attention.spec import AttentionSpec

DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> str | None:
  """Why this backend cannot run these inputs here, or None."""
  platform = jax.default_backend()
  if platform == "tpu":
    return "cuDNN needs a GPU"
  if platform == "gpu" and q.dtype not in DTYPES:
    return f"dtype {q.dtype} (cuDNN attention takes bfloat16 or float16)"
  d = q.shape[-1]
  if platform == "gpu" and (d > MAX_HEAD_DIM or d % 8):
    return f"head_dim {d} (cuDNN needs a multiple of 8 up to {MAX_HEAD_DIM})"
  return None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
  """q `[B, Lq, Hq, D]`, k/v `[B, Lk, Hkv, D]` -> `[B, Lq, Hq, D]`."""
  implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
  return jax.nn.dot_product_attention(q, k, v, mask=spec.dense()[:, None], scale=q.shape[-1] ** -0.5,
                                      implementation=implementation)
