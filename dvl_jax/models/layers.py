"""Building blocks shared by the vision tower and the decoder: norms, dense layers, embeddings, stacks.

Every parameter carries its logical axis names in the `axes` metadata field; `dvl_jax.parallel.rules`
maps them to mesh axes. A layer stack is either one module with stacked params (leading `layers` axis, run
under `lax.scan`: one layer traced, fast compiles, the training default) or an `nnx.List` of per-layer
modules (run unrolled). Inside a loop of forwards (the samplers') the per-layer form reads each weight
matrix in place, where XLA copies every layer's matrices out of the stacked arrays in every forward
(measured on CPU: ~40% of an AR step). Checkpoints always hold the stacked form
(`dvl_jax.models.layer_layout`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
# Backends on which a product of one row with a weight matrix runs as two rows (`matmul`). XLA:GPU's simplifier
# rewrites a vector x matrix `dot` into an elementwise product, written out whole, and a reduction: on an H200 a
# batch-1 AR forward of a 3B model took 3.9 ms this way against 2.6 ms at batch 2, where the products stay GEMMs
# (on a CPU one row is a matrix-vector product at memory speed and two rows cost twice that: left alone). AR
# decoding at batch 1 (`ar_sampler.least_rows`) avoids single rows altogether: it runs as batch 2 with a dead row.
ONE_ROW_AS_TWO = ("gpu",)


def dtypes(cfg: Any) -> tuple[Any, Any]:
  """(param dtype, compute dtype) of a `ModelConfig`."""
  return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)


def _init(rngs: nnx.Rngs, shape: Sequence[int], dtype: Any, std: float = 0.02) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  """Qwen RMSNorm: fp32 statistics, cast back to the input dtype, then scale (spec §10.4)."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any, axes: Axes = ("norm",)):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Dense(nnx.Module):
  """`y = x @ kernel + bias` with kernel stored `[in, out]` (PyTorch's `weight.T`)."""

  def __init__(self, din: int, dout: int, *, axes: Axes, use_bias: bool, param_dtype: Any,
               compute_dtype: Any, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.kernel = nnx.Param(_init(rngs, (din, dout), param_dtype), axes=axes)
    self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), axes=axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    return y


class SwiGLU(nnx.Module):
  """`down(silu(gate(x)) * up(x))`; the ViT's has biases, the decoder's does not."""

  def __init__(self, dim: int, hidden: int, *, axes: tuple[str, str], use_bias: bool, param_dtype: Any,
               compute_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    self.gate_proj = Dense(dim, hidden, axes=axes, **kw)
    self.up_proj = Dense(dim, hidden, axes=axes, **kw)
    self.down_proj = Dense(hidden, dim, axes=axes[::-1], **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embed(nnx.Module):
  """Token embedding table `[vocab, dim]`; `attend` is the tied lm_head product."""

  def __init__(self, vocab: int, dim: int, *, param_dtype: Any, compute_dtype: Any, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.embedding = nnx.Param(_init(rngs, (vocab, dim), param_dtype), axes=("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return matmul(x.astype(self.compute_dtype), self.embedding[...].astype(self.compute_dtype).T)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w`, `x` `[..., din]` and `w` `[din, dout]` -> `[..., dout]`; a single row of `x` (an AR step at batch
  1) goes through the product twice over on the `ONE_ROW_AS_TWO` backends (the same numbers as a GEMM row). The
  barrier keeps the simplifier from moving the broadcast past the product, which would make it one row again."""
  if x.size == x.shape[-1] and jax.default_backend() in ONE_ROW_AS_TWO:
    rows = jax.lax.optimization_barrier(jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1])))
    return jnp.dot(rows, w)[:1].reshape(*x.shape[:-1], w.shape[-1])
  return jnp.dot(x, w)


def stack_modules(factory: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, *,
                  stacked: bool = True) -> nnx.Module:
  """`n` copies of a module: one module whose params have a leading `layers` axis, or (`stacked=False`)
  an `nnx.List` of `n` modules holding the same values layer by layer."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(r: nnx.Rngs) -> nnx.Module:
    return factory(r)

  stack = make(rngs)
  for _, var in nnx.iter_graph(stack):
    if isinstance(var, nnx.Param):
      var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
  return stack if stacked else unstack(stack)


def unstack(stack: nnx.Module) -> nnx.List:
  """A stacked module's layers as separate modules (copies of the slices; the `layers` axis name dropped)."""
  graphdef, state = nnx.split(stack)
  n = jax.tree.leaves(state)[0].shape[0]
  layers = []
  for i in range(n):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    for _, var in nnx.iter_graph(layer):
      if isinstance(var, nnx.Param):
        var.set_metadata(axes=var.get_metadata()["axes"][1:])
    layers.append(layer)
  return nnx.List(layers)


_REMAT_POLICIES = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_stack(stack: nnx.Module, carry: Any, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
              xs: Any = None, *, remat_policy: str = "none") -> tuple[Any, Any]:
  """Runs `body(layer, carry, x) -> (carry, y)` over a layer stack (`stack_modules`), like `lax.scan`.

  Stacked params run under `lax.scan` (one layer traced); an `nnx.List` of layers runs as an unrolled
  loop (longer compiles, lets XLA schedule across layers, and reads each layer's weights in place).
  """
  if remat_policy != "none" and remat_policy not in _REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {remat_policy!r}; use one of {['none', *_REMAT_POLICIES]}")
  if not isinstance(stack, nnx.List):
    graphdef, state = nnx.split(stack)
    return jax.lax.scan(_layer_step(graphdef, body, remat_policy, prevent_cse=False), carry, (state, xs))
  ys = []
  for i, layer in enumerate(stack):
    graphdef, state = nnx.split(layer)
    step = _layer_step(graphdef, body, remat_policy, prevent_cse=True)
    carry, y = step(carry, (state, jax.tree.map(lambda a: a[i], xs)))
    ys.append(y)
  return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


def _layer_step(graphdef: Any, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], remat_policy: str,
                prevent_cse: bool) -> Callable[[Any, Any], tuple[Any, Any]]:
  """`body` as a function of (carry, (layer state, x)), rematerialised under `remat_policy`."""

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  if remat_policy == "none":
    return step
  return jax.checkpoint(step, policy=_REMAT_POLICIES[remat_policy], prevent_cse=prevent_cse)
