"""`AttentionSpec`: the small static-plus-arrays description every attention backend understands."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dvl_jax.attention import masks


@struct.dataclass
class AttentionSpec:
  """What may attend to what.

  Arrays (`[B, Lq]` / `[B, Lk]` int32): `q_idx`/`kv_idx` are token indices fed to the mask function;
  `q_seg`/`kv_seg` are segment ids (0 = padding; attention only inside equal segments).
  Static: `kind` (see `masks.KINDS`), `block_size`, `half_len` (L of the `[x_t ; x_0]` input), and
  `positional`: `q_idx = kv_idx = arange(L)` in every row, so which tiles can attend is known at trace
  time (the Pallas kernels' block structure); `self_attention` sets it. A cache window (keys
  `[cache ; window]`) is not.
  """

  q_idx: jax.Array
  kv_idx: jax.Array
  q_seg: jax.Array
  kv_seg: jax.Array
  kind: str = struct.field(pytree_node=False, default="causal")
  block_size: int | None = struct.field(pytree_node=False, default=None)  # needed by the block kinds
  half_len: int = struct.field(pytree_node=False, default=0)
  positional: bool = struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    if self.kind not in masks.KINDS:
      raise ValueError(f"unknown attention mask kind {self.kind!r}; use one of {masks.KINDS}")
    if self.kind in masks.BLOCK_KINDS and self.block_size is None:
      raise ValueError(f"attention kind {self.kind!r} needs block_size (e.g. the model config's block_size); "
                       "without it the mask would silently be another one")

  @classmethod
  def self_attention(cls, segment_ids: jax.Array, kind: str = "causal", **static) -> "AttentionSpec":
    """Queries and keys are the same `[B, L]` sequence; `segment_ids` 0 marks padding."""
    b, n = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    seg = segment_ids.astype(jnp.int32)
    return cls(q_idx=idx, kv_idx=idx, q_seg=seg, kv_seg=seg, kind=kind, positional=True, **static)

  def dense(self) -> jax.Array:
    """`[B, Lq, Lk]` boolean mask."""
    return masks.dense_mask(self.kind, self.q_idx, self.kv_idx, self.q_seg, self.kv_seg,
                            block_size=self.block_size, half_len=self.half_len)
