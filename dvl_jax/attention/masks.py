"""Attention masks as elementwise functions of token indices, usable with NumPy and jax.numpy.

One definition serves the dense reference, the kernels (which evaluate them per tile) and the tests.
Indices are positions in the attended sequence (not RoPE positions). Kinds:

* `causal`       — token-causal (the autoregressive Qwen2.5-VL model);
* `full`         — bidirectional (vision windows/images, separated by segment ids);
* `block_causal` — bidirectional inside a block of `block_size`, causal across blocks (spec §6.2);
* `bd3_train`    — the three-part BD3-LM mask over `[x_t ; x_0]` of length `2 * half_len` (spec §5.4).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ("causal", "full", "block_causal", "bd3_train")
BLOCK_KINDS = ("block_causal", "bd3_train")  # the kinds whose mask depends on a block size


def allowed(kind: str, q_idx: Any, kv_idx: Any, *, block_size: int = 1, half_len: int = 0) -> Any:
  """Boolean mask broadcast from `q_idx[..., :, None]`-style inputs; works for np and jnp arrays."""
  if kind == "causal":
    return kv_idx <= q_idx
  if kind == "full":
    return (q_idx >= 0) & (kv_idx >= 0)
  if kind == "block_causal":
    return kv_idx // block_size <= q_idx // block_size
  if kind == "bd3_train":
    q_clean, k_clean = q_idx >= half_len, kv_idx >= half_len
    q_blk = (q_idx - half_len * q_clean) // block_size
    k_blk = (kv_idx - half_len * k_clean) // block_size
    diagonal = (q_blk == k_blk) & (q_clean == k_clean)
    offset = ~q_clean & k_clean & (q_blk > k_blk)
    clean_causal = q_clean & k_clean & (q_blk >= k_blk)
    return diagonal | offset | clean_causal
  raise ValueError(f"unknown attention mask kind {kind!r}; use one of {KINDS}")


def segment_allowed(q_seg: Any, kv_seg: Any) -> Any:
  """Same non-zero segment; segment 0 marks padding and is never attended."""
  return (q_seg == kv_seg) & (kv_seg != 0)


def dense_mask(kind: str, q_idx: np.ndarray, kv_idx: np.ndarray, q_seg: np.ndarray, kv_seg: np.ndarray,
               *, block_size: int = 1, half_len: int = 0) -> np.ndarray:
  """`[B, Lq, Lk]` boolean mask from `[B, L]` index and segment arrays (np or jnp)."""
  m = allowed(kind, q_idx[:, :, None], kv_idx[:, None, :], block_size=block_size, half_len=half_len)
  return m & segment_allowed(q_seg[:, :, None], kv_seg[:, None, :])
