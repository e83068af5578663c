"""BD3-LM noise: log-linear schedule with per-block, stratified ("antithetic") times (spec §5.1-§5.3).

With the log-linear schedule the mask probability is `t` itself and the ELBO weight is `1/t`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EPS_MIN, EPS_MAX = 1e-3, 1.0


def block_times(rng: jax.Array, batch: int, length: int, block_size: int, *, antithetic: bool = True,
                eps_min: float = EPS_MIN, eps_max: float = EPS_MAX) -> jax.Array:
  """Per-token times `[B, L]`, constant inside each block of `block_size` counted from position 0.

  Antithetic sampling stratifies one uniform draw per (sample, block) cell over all `B * nb`
  cells: cell `c` (row-major) lands in `[c / M, (c + 1) / M)`, then `t -> t (eps_max - eps_min) + eps_min`.
  """
  nb = math.ceil(length / block_size)
  u = jax.random.uniform(rng, (batch, nb), jnp.float32)
  if antithetic:
    cells = batch * nb
    u = jnp.mod(u / cells + jnp.arange(cells, dtype=jnp.float32).reshape(batch, nb) / cells, 1.0)
  t = jnp.repeat(u, block_size, axis=1)[:, :length]
  return t * (eps_max - eps_min) + eps_min


def sample_noise(rng: jax.Array, batch: int, length: int, block_size: int, **kwargs) -> tuple[jax.Array, jax.Array]:
  """`(t, move_mask)`: times `[B, L]` and `move_mask = r <= t` `[B, L]` before restricting to labels."""
  k_t, k_r = jax.random.split(rng)
  t = block_times(k_t, batch, length, block_size, **kwargs)
  return t, jax.random.uniform(k_r, (batch, length), jnp.float32) <= t
