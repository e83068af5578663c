"""Training losses as pure functions of (model, batch): BD3-LM (stage 2) and next-token CE (stage 1).

The batch format is `dvl_jax.core.batch`; the model is reached only through `dvl_jax.models.interface`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dvl_jax.attention.spec import AttentionSpec
from dvl_jax.core.batch import IGNORE
from dvl_jax.diffusion.noise import sample_noise
from dvl_jax.diffusion.token_ce import token_cross_entropy

Batch = dict[str, Any]


def _clean_embeddings(model, batch: Batch) -> jax.Array:
  features = None
  if batch.get("pixel_values") is not None:
    features = model.image_features(batch["pixel_values"], batch["vision"])
  return model.embed(batch["input_ids"], features)


def bd3_loss(model, batch: Batch, rng: jax.Array, noise: tuple[jax.Array, jax.Array] | None = None,
             *, antithetic: bool = True, loss_chunk_size: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BD3-LM loss of spec §5: mask labelled tokens with per-block prob `t`, denoise with `[x_t ; x_0]`.

  `noise=(t, move_mask)` (`[B, L]` float, `[B, L]` bool) replaces the random draw so results can be
  compared across implementations; only labelled positions of `move_mask` are masked.
  `loss_chunk_size > 0` computes the vocabulary logits that many positions at a time (same loss, far
  less memory for a 152k vocabulary; see `token_ce`).
  Returns `(loss, {"loss", "mean_t", "masked_fraction"})`.
  """
  cfg = model.config
  labels = batch["labels"]
  b, n = labels.shape
  amask = batch["attention_mask"].astype(jnp.int32)
  t, move = sample_noise(rng, b, n, cfg.block_size, antithetic=antithetic) if noise is None else noise
  labelled = labels != IGNORE
  masked = move & labelled

  clean = _clean_embeddings(model, batch)
  mask_embedding = model.embed(jnp.full((1, 1), cfg.mask_token_id, jnp.int32))[0, 0]  # trainable row
  noised = jnp.where(masked[..., None], mask_embedding.astype(clean.dtype), clean)
  x = jnp.concatenate([noised, clean], axis=1)
  spec = AttentionSpec.self_attention(jnp.concatenate([amask, amask], axis=1), kind="bd3_train",
                                      block_size=cfg.block_size, half_len=n)
  positions = jnp.concatenate([spec.q_idx[:, :n], spec.q_idx[:, :n]], axis=1)  # same for both halves
  hidden, _ = model.decode(x, positions, spec)
  ce = token_cross_entropy(model.logits, hidden[:, :n], labels, loss_chunk_size)

  per_sample_labels = jnp.maximum(1, labelled.sum(axis=1)).astype(jnp.float32)
  weighted = jnp.where(masked, ce / t, 0.0) / per_sample_labels[:, None]
  loss = weighted.sum() / b
  metrics = {
      "loss": loss,
      "mean_t": t.mean(),
      "masked_fraction": masked.sum() / jnp.maximum(1, labelled.sum()),
  }
  return loss, metrics


def ar_loss(model, batch: Batch, positions: jax.Array | None = None, *,
            loss_chunk_size: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token CE averaged over labelled targets of the whole batch (HF's shifted-label loss).

  Used for connector alignment (stage 1). `positions` defaults to flat `arange` positions; pass
  M-RoPE positions (`[3, B, L]`) for a Qwen2.5-VL source model. `loss_chunk_size` as in `bd3_loss`.
  """
  labels = batch["labels"]
  b, n = labels.shape
  amask = batch["attention_mask"].astype(jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  hidden, _ = model.decode(_clean_embeddings(model, batch), positions, AttentionSpec.self_attention(amask))
  targets = labels[:, 1:]
  ce = token_cross_entropy(model.logits, hidden[:, :-1], targets, loss_chunk_size)
  count = jnp.maximum(1, (targets != IGNORE).sum())
  loss = ce.sum() / count
  return loss, {"loss": loss, "tokens": count}
