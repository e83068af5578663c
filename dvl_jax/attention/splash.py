"""TPU attention: Pallas splash attention with the spec's mask computed in-kernel, under shard_map.

Every mask kind of `masks.py` is one splash `_ComputableMask` (`KindMask`): the kernel evaluates
`masks.allowed` on block-local iotas, and splash's host-side MaskInfo (built once per shape, cached)
skips the blocks that the kind makes empty and skips masking for the full ones. Segment ids carry
padding, windows and images; a query in segment 0 gets segment -1 so that padding matches nothing.
Splash has no batch dimension (vmapped), does not scale q (we do), and needs kv blocks that are
multiples of 128: the sequence is padded to a multiple of 128 (segment 0) and the block size follows
from the padded length (`block_for`). GQA runs natively (query head h reads kv head h // group).
Under a mesh context (`jax.set_mesh`) with axes `(data, fsdp, tensor)`, batch is split over
`data`x`fsdp` and heads over `tensor` with `shard_map` (each replicated where the mesh does not divide it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sa_mask
from jax.sharding import PartitionSpec as P

from dvl_jax.attention import masks, shards
from dvl_jax.attention.spec import AttentionSpec

DTYPES = (jnp.float32, jnp.bfloat16)
LANES = 128


class KindMask(sa_mask._ComputableMask):  # pylint: disable=protected-access
  """A `masks.KINDS` mask over `[length, length]` positions, computed inside the kernel."""

  def __init__(self, length: int, kind: str, block_size: int, half_len: int):
    self.key = (length, kind, block_size, half_len)
    fn = functools.partial(masks.allowed, kind, block_size=block_size, half_len=half_len)
    super().__init__(shape=(length, length), mask_function=fn)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, KindMask) and self.key == other.key

  def __hash__(self) -> int:
    return hash((KindMask, self.key))


def block_for(length: int) -> int:
  """q and kv block size for `length` (a multiple of 128): the largest of 512 / 256 dividing it into at
  least 8 blocks (coarser blocks skip less of a structured mask), else 128."""
  return next((b for b in (512, 256) if length % b == 0 and length >= 8 * b), LANES)


@functools.lru_cache(maxsize=64)
def _kernel(length: int, kind: str, block_size: int, half_len: int, heads: int, interpret: bool):
  """Splash kernel (forward + fused backward) for one mask and head count; the MaskInfo is host work.

  Built as concrete arrays even when first called inside a trace, so the cache never holds tracers.
  """
  block = block_for(length)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
  mask = sa.MultiHeadMask([KindMask(length, kind, block_size, half_len)] * heads)
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def unsupported(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> str | None:
  """Why this backend cannot run these inputs here, or None."""
  if jax.default_backend() == "gpu":
    return "splash is a TPU kernel (pallas_gpu is the GPU kernel)"
  if not spec.positional:
    return "a non-positional spec (a KV-cache window): splash masks are static functions of positions"
  if q.dtype not in DTYPES:
    return f"dtype {q.dtype} (supported: float32, bfloat16)"
  return None


def _sharded(fn, batch: int, kv_heads: int):
  """`fn` over `[B, H, L, D]` x3 and `[B, L]` x2 per device under a mesh context (`shards`)."""
  where = shards.split(batch, kv_heads)
  if where is None:
    return fn
  x, s = P(where.rows, where.heads, None, None), where.per_row()
  return where.map(fn, (x, x, x, s, s), x)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, *,
           interpret: bool | None = None) -> jax.Array:
  """q `[B, L, Hq, D]`, k/v `[B, L, Hkv, D]` -> `[B, L, Hq, D]` for a positional spec.

  `interpret`: run in the Pallas interpreter (default: unless the platform is a TPU).
  """
  n, d = q.shape[1], q.shape[-1]
  length = -(-n // LANES) * LANES
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  scaled = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
  heads_major = lambda x: jnp.pad(x, ((0, 0), (0, length - n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  pad = lambda s: jnp.pad(s, ((0, 0), (0, length - n)))
  q_seg = jnp.where(pad(spec.q_seg) == 0, -1, pad(spec.q_seg))

  def local(q, k, v, q_seg, kv_seg):
    kernel = _kernel(length, spec.kind, spec.block_size, spec.half_len, q.shape[1], interpret)
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(q=qs, kv=ks))
    return jax.vmap(one)(q, k, v, q_seg, kv_seg)

  out = _sharded(local, q.shape[0], k.shape[2])(heads_major(scaled), heads_major(k), heads_major(v), q_seg,
                                                 pad(spec.kv_seg))
  return out.transpose(0, 2, 1, 3)[:, :n]
