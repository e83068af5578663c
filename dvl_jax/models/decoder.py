"""Qwen2.5 text decoder (spec §3): GQA with q/k/v bias, RMSNorm, SwiGLU, stacked layers.

The stack reads an optional key/value prefix (the samplers' stacked KV cache, each layer its own slice, which
attention reads in place where it can) and can return each layer's new keys/values, so the samplers can keep the
cache as a pure pytree outside the module.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvl_jax.attention.cache_prefix import CachePrefix
from dvl_jax.attention.dispatch import attend, attend_joint, joint_parts, reads_joint
from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.config import ModelConfig
from dvl_jax.models.interface import KV
from dvl_jax.models.layers import Dense, Embed, RMSNorm, SwiGLU, dtypes, run_stack, stack_modules
from dvl_jax.models.rope import apply_rope
from dvl_jax.parallel.rules import constrain

ROWS = ("batch", None, None)  # the residual stream [B, L, H]: rows over the batch mesh axes


class Packing(NamedTuple):
  """Which of a `[rows, width]` layout's positions a packed decoder call computes: `index` `[P]`, flat positions
  in `rows * width`. The projections, the MLP and the norms run over those `P` positions alone (the residual
  stream is `[P, H]`); attention scatters them back to the padded `[rows, width]` layout, where the others are
  zeros (which the caller's spec must mark invalid)."""

  index: jax.Array
  rows: int
  width: int

  def pack(self, x: jax.Array) -> jax.Array:
    """`[rows, width, ...]` -> `[P, ...]`."""
    return x.reshape(self.rows * self.width, *x.shape[2:])[self.index]

  def unpack(self, x: jax.Array) -> jax.Array:
    """`[P, ...]` -> `[rows, width, ...]`, zeros at the positions not computed."""
    full = jnp.zeros((self.rows * self.width, *x.shape[1:]), x.dtype).at[self.index].set(x, unique_indices=True)
    return full.reshape(self.rows, self.width, *x.shape[1:])


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    t = cfg.text
    pd, cd = dtypes(cfg)
    dense = lambda din, dout, axes, bias: Dense(din, dout, axes=axes, use_bias=bias, param_dtype=pd,
                                                compute_dtype=cd, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
    self.backend = cfg.attention_backend
    self.q_proj = dense(t.hidden_size, t.num_heads * t.head_dim, ("embed", "heads"), True)
    self.k_proj = dense(t.hidden_size, t.num_kv_heads * t.head_dim, ("embed", "kv_heads"), True)
    self.v_proj = dense(t.hidden_size, t.num_kv_heads * t.head_dim, ("embed", "kv_heads"), True)
    self.o_proj = dense(t.num_heads * t.head_dim, t.hidden_size, ("heads", "embed"), False)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, spec: AttentionSpec,
               prefix: CachePrefix | None = None, packing: Packing | None = None) -> tuple[jax.Array, KV]:
    """x `[B, L, H]` (packed: `[P, H]`, cos / sin alike) -> (the same shape, this call's post-RoPE (k, v)
    `[B, L, kv_heads, head_dim]`); `prefix` keys come first."""
    lead, hq, hkv = x.shape[:-1], self.num_heads, self.num_kv_heads
    q = self.q_proj(x).reshape(*lead, hq, self.head_dim)
    k = self.k_proj(x).reshape(*lead, hkv, self.head_dim)
    v = self.v_proj(x).reshape(*lead, hkv, self.head_dim)
    if prefix is None or not reads_joint(self.backend, x.shape[0] if packing is None else packing.rows, hkv):
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      if packing is not None:
        q, k, v = packing.unpack(q), packing.unpack(k), packing.unpack(v)
      out = attend(q, k, v, spec, backend=self.backend, prefix=prefix)
    else:  # decoding: q, k, v as one array, rotated in one fused epilogue and read in place by the own GPU kernel
      qkv = apply_rope(jnp.concatenate([q, k, v], axis=-2), cos, sin, rotated_heads=hq + hkv)
      if packing is not None:
        qkv = packing.unpack(qkv)
      out = attend_joint(qkv, hq, spec, backend=self.backend, prefix=prefix)
      _, k, v = joint_parts(qkv, hq)
    b, n = out.shape[:2]
    out = out.reshape(b, n, -1)
    return self.o_proj(out if packing is None else packing.pack(out)), (k, v)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    t = cfg.text
    pd, cd = dtypes(cfg)
    self.input_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pd)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pd)
    self.mlp = SwiGLU(t.hidden_size, t.intermediate_size, axes=("embed", "mlp"), use_bias=False,
                      param_dtype=pd, compute_dtype=cd, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, spec: AttentionSpec,
               prefix: CachePrefix | None = None, packing: Packing | None = None) -> tuple[jax.Array, KV]:
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, spec, prefix, packing)
    h = x + attn
    return h + self.mlp(self.post_attention_layernorm(h)), kv


class TextModel(nnx.Module):
  """Embedding, stacked decoder layers and the final norm (the lm_head lives in the VLM)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    t = cfg.text
    pd, cd = dtypes(cfg)
    self.remat_policy = cfg.remat_policy
    self.embed_tokens = Embed(t.vocab_size, t.hidden_size, param_dtype=pd, compute_dtype=cd, rngs=rngs)
    self.layers = stack_modules(lambda r: DecoderLayer(cfg, rngs=r), t.num_layers, rngs,
                                 stacked=cfg.scan_layers)
    self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pd)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, spec: AttentionSpec,
               cache: KV | None = None, *, return_kv: bool = False, packing: Packing | None = None,
               fill: KV | None = None) -> tuple[jax.Array, KV | None]:
    """x `[B, L, H]` embeddings -> normed hidden `[B, L, H]` and, if asked, per-layer new K/V.

    `cache` is `(k, v)` each `[layers, B, Lc, kv_heads, head_dim]`, read (never written) as a prefix;
    returned K/V are `[layers, B, L, kv_heads, head_dim]`. `packing`: only its positions are computed (the
    others' hidden states and K/V are zeros); one device only (the packed stream mixes rows). `fill`: a cache
    `[layers, B, Lf >= L, ...]` each layer writes its K/V into at slots `[0, L)` as it runs, returned in place of
    the K/V (a prefill then never holds every layer's K/V beside the cache: as much memory again).
    """
    pin = lambda h: constrain(h, ROWS)  # noqa: E731
    if packing is not None:  # the packed stream has no rows to pin
      x, cos, sin = packing.pack(x), packing.pack(cos), packing.pack(sin)
      pin = lambda h: h  # noqa: E731

    def body(layer: DecoderLayer, carry: tuple[jax.Array, KV | None], index: jax.Array | None):
      h, filled = carry
      prefix = None if cache is None else CachePrefix(*cache, index)  # the whole cache: no per-layer copies
      h, kv = layer(pin(h), cos, sin, spec, prefix, packing)
      if filled is not None:
        filled = tuple(jax.lax.dynamic_update_slice(f, new[None].astype(f.dtype), (index, 0, 0, 0, 0))
                       for f, new in zip(filled, kv))
      return (pin(h), filled), (kv if return_kv and filled is None else None)

    indexed = cache if cache is not None else fill
    layers = None if indexed is None else np.arange(indexed[0].shape[0], dtype=np.int32)  # constants when unrolled
    (h, filled), kv = run_stack(self.layers, (x, fill), body, layers, remat_policy=self.remat_policy)
    kv = filled if fill is not None else kv
    h = self.norm(h)
    return (h if packing is None else packing.unpack(h)), kv
