"""BD3-LM and AR losses against an independent restatement of spec §5 (NumPy + transformers' decoder).

The oracle below builds `[x_t ; x_0]`, the three-part mask and the weights itself and runs the
PyTorch Qwen2.5-VL decoder with an explicit 4-D additive mask; it imports nothing from dvl_jax.diffusion.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dvl_jax as dvl
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.diffusion.loss import ar_loss, bd3_loss
from dvl_jax.diffusion.noise import block_times
from dvl_jax.core.vision_layout import vision_layout
from dvl_jax.testing.tiny import converted_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  cfg = tiny_config(block_size=4, position_mode="flat")
  root = tmp_path_factory.mktemp("loss")
  hf, converted = converted_checkpoint(str(root), cfg, seed=7)
  model = dvl.load(converted)
  return cfg, hf, model


def _oracle_bd3(hf, cfg, ids, labels, amask, pixels, grids, t, move):
  b, n = ids.shape
  bs = cfg.block_size
  lm = hf.model.language_model
  with torch.no_grad():
    emb = lm.embed_tokens(torch.tensor(ids))
    if pixels is not None:
      feats = torch.cat(list(hf.model.get_image_features(torch.tensor(pixels), torch.tensor(grids))))
      emb = emb.masked_scatter(torch.tensor(ids == cfg.image_token_id)[..., None].expand_as(emb), feats)
    emb = emb.numpy()
    mask_row = lm.embed_tokens.weight[cfg.mask_token_id].numpy()
  masked = move & (labels != -100)
  x = np.concatenate([np.where(masked[..., None], mask_row, emb), emb], axis=1)
  allowed = np.zeros((2 * n, 2 * n), bool)
  for q in range(2 * n):
    for k in range(2 * n):
      qc, kc = q >= n, k >= n
      qb, kb = (q - n * qc) // bs, (k - n * kc) // bs
      allowed[q, k] = ((qb == kb and qc == kc) or (not qc and kc and qb > kb) or (qc and kc and qb >= kb))
  a2 = np.concatenate([amask, amask], axis=1).astype(bool)
  allowed = allowed[None] & a2[:, :, None] & a2[:, None, :]
  additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
  pos = np.tile(np.concatenate([np.arange(n), np.arange(n)]), (b, 1))
  with torch.no_grad():
    h = lm(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(additive),
           position_ids=torch.tensor(pos)).last_hidden_state
    logits = hf.lm_head(h[:, :n]).double().numpy()
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  loss = 0.0
  for i in range(b):
    n_lab = max(1, int((labels[i] != -100).sum()))
    for j in range(n):
      if masked[i, j]:
        loss += -logp[i, j, labels[i, j]] / t[i, j] / n_lab
  return loss / b


def _batch(cfg, seed):
  """Three samples: one with an image, partially labelled blocks, and one right-padded row."""
  rng = np.random.default_rng(seed)
  n = 23
  ids = rng.integers(3, 200, (3, n))
  grid = np.array([[1, 4, 8]])
  ids[0, 2:2 + 8] = cfg.image_token_id
  labels = np.full((3, n), -100)
  labels[0, 12:] = ids[0, 12:]
  labels[1, 5:11] = ids[1, 5:11]  # starts and ends inside blocks of 4
  labels[2, 9:17] = ids[2, 9:17]
  amask = np.ones((3, n), np.int64)
  amask[2, 17:] = 0
  ids[2, 17:] = cfg.pad_token_id
  pixels = rng.normal(size=(int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32)
  t = np.repeat(rng.uniform(0.001, 1.0, (3, math.ceil(n / cfg.block_size))), cfg.block_size, axis=1)[:, :n]
  move = rng.uniform(size=(3, n)) <= t
  return ids, labels, amask, pixels, grid, t.astype(np.float32), move


@pytest.mark.parametrize("seed,chunk", [(0, 0), (1, 0), (1, 5)])  # 5: chunks of logits, the last one padded
def test_bd3_loss_matches_independent_oracle(models, seed, chunk):
  cfg, hf, model = models
  ids, labels, amask, pixels, grid, t, move = _batch(cfg, seed)
  expected = _oracle_bd3(hf, cfg, ids, labels, amask, pixels, grid, t, move)
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.asarray(amask),
           "pixel_values": jnp.asarray(pixels), "vision": vision_layout(grid, cfg.vision)}
  loss, metrics = bd3_loss(model, batch, jax.random.key(0), noise=(jnp.asarray(t), jnp.asarray(move)),
                           loss_chunk_size=chunk)
  assert abs(float(loss) - expected) <= 1e-5 * max(1.0, abs(expected)), (float(loss), expected)
  labelled = labels != -100
  np.testing.assert_allclose(float(metrics["masked_fraction"]), (move & labelled).sum() / labelled.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mean_t"]), t.mean(), rtol=1e-6)


def test_times_are_stratified_per_block_cell():
  b, n, bs = 3, 37, 8
  nb = math.ceil(n / bs)
  cells = b * nb
  for seed in range(20):
    t = np.asarray(block_times(jax.random.key(seed), b, n, bs))
    assert t.shape == (b, n) and t.min() >= 1e-3 and t.max() < 1.0
    per_block = t[:, ::bs]
    np.testing.assert_array_equal(np.repeat(per_block, bs, axis=1)[:, :n], t)  # blocks from position 0
    u = (per_block - 1e-3) / (1 - 1e-3)
    stratum = np.floor(u * cells + 1e-4).reshape(-1)
    np.testing.assert_array_equal(stratum, np.arange(cells))


def test_masked_tokens_follow_t_and_labels(models):
  cfg, _, model = models
  ids = np.random.default_rng(0).integers(3, 200, (4, 64))
  labels = ids.copy()
  labels[:, :16] = -100
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.ones((4, 64))}
  fractions = []
  for seed in range(6):
    _, m = jax.jit(lambda b, r: bd3_loss(model, b, r))(batch, jax.random.key(seed))
    fractions.append(float(m["masked_fraction"]))
  assert 0.3 < np.mean(fractions) < 0.7  # E[t] = 0.5005 under the stratified schedule


def test_gradients_are_finite_and_reach_the_mask_row(models):
  from flax import nnx

  cfg, _, model = models
  ids, labels, amask, pixels, grid, t, move = _batch(cfg, 3)
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.asarray(amask),
           "pixel_values": jnp.asarray(pixels), "vision": vision_layout(grid, cfg.vision)}
  graphdef, state = nnx.split(model)

  def loss_fn(state):
    return bd3_loss(nnx.merge(graphdef, state), batch, jax.random.key(0), noise=(jnp.asarray(t), jnp.asarray(move)))[0]

  grads = jax.jit(jax.grad(loss_fn))(state)  # compiled: eager, the model's ops dispatch one by one (~30 s)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  emb_grad = np.asarray(grads["text"]["embed_tokens"]["embedding"][...])
  assert np.abs(emb_grad[cfg.mask_token_id]).sum() > 0
  assert np.abs(np.asarray(grads["visual"]["patch_embed"]["kernel"][...])).sum() > 0


@pytest.mark.parametrize("chunk", [0, 4])
def test_ar_loss_matches_transformers_shifted_loss(models, chunk):
  cfg, hf, model = models
  ids, labels, amask, pixels, grid, _, _ = _batch(cfg, 4)
  labels = np.where(amask == 1, labels, -100)
  pos = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(amask), labels=torch.tensor(labels),
                  pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                  position_ids=torch.tensor(pos)).loss.item()
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.asarray(amask),
           "pixel_values": jnp.asarray(pixels), "vision": vision_layout(grid, cfg.vision)}
  loss, _ = ar_loss(model, batch, loss_chunk_size=chunk)
  assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected)
