"""Decoder pieces: RoPE modes, get_rope_index against transformers, scan/unroll/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import torch

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.models.qwen25vl.rope import get_rope_index
from dvl_jax.models.rope import apply_rope, text_rope
from dvl_jax.testing.tiny import tiny_model
from dvl_jax.testing.tiny import build_hf_model


def test_mrope_with_equal_rows_is_flat_rope():
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 9)))
  flat = text_rope(pos, 16, 1e6, (2, 3, 3), jnp.float32)
  mrope = text_rope(jnp.stack([pos] * 3), 16, 1e6, (2, 3, 3), jnp.float32)
  np.testing.assert_array_equal(flat[0], mrope[0])
  np.testing.assert_array_equal(flat[1], mrope[1])


def test_mrope_sections_take_their_component():
  pos = jnp.stack([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32) * 7, jnp.ones((1, 4), jnp.int32) * 9])
  cos, _ = text_rope(pos, 16, 1e4, (2, 3, 3), jnp.float32)
  # First 2 of each half come from the temporal row (0 -> cos 1), the rest from h/w rows (not all 1).
  np.testing.assert_array_equal(cos[0, 0, :2], 1.0)
  np.testing.assert_array_equal(cos[0, 0, 8:10], 1.0)
  assert not np.allclose(cos[0, 0, 2:8], 1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_over_queries_keys_and_values_as_one_array_rotates_q_and_k_alone_bit_for_bit(dtype):
  """A decoding step rotates q, k and v as one array (one fused epilogue): q and k exactly as apart, v untouched."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 3, 4 + 2 + 2, 16)), dtype)
  cos, sin = text_rope(jnp.asarray(rng.integers(0, 500, (2, 3))), 16, 1e6, None, dtype)
  joint = jax.jit(lambda x: apply_rope(x, cos, sin, rotated_heads=6))(x)
  np.testing.assert_array_equal(np.asarray(joint[:, :, :6], np.float32),
                                np.asarray(jax.jit(apply_rope)(x[:, :, :6], cos, sin), np.float32))
  np.testing.assert_array_equal(np.asarray(joint[:, :, 6:], np.float32), np.asarray(x[:, :, 6:], np.float32))


def test_get_rope_index_matches_transformers():
  cfg = tiny_config()
  hf = build_hf_model(cfg)
  rng = np.random.default_rng(1)
  grids = np.array([[1, 4, 6], [1, 8, 4], [1, 2, 2]])
  def image(g):
    return [cfg.vision_start_token_id] + [cfg.image_token_id] * int(g.prod() // 4) + [cfg.vision_end_token_id]
  row0 = list(rng.integers(3, 200, 3)) + image(grids[0]) + list(rng.integers(3, 200, 4)) + image(grids[1])
  row1 = list(rng.integers(3, 200, 5)) + image(grids[2]) + list(rng.integers(3, 200, 2))
  n = max(len(row0), len(row1)) + 2
  ids = np.zeros((2, n), np.int64)
  mask = np.zeros((2, n), np.int64)
  ids[0, :len(row0)], mask[0, :len(row0)] = row0, 1
  ids[1, :len(row1)], mask[1, :len(row1)] = row1, 1
  ref_pos, ref_delta = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(grids), None, None, torch.tensor(mask))
  pos, delta = get_rope_index(ids, grids, mask, image_token_id=cfg.image_token_id,
                              vision_start_token_id=cfg.vision_start_token_id, spatial_merge_size=2)
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy())
  # Text only: cumulative positions over the attention mask.
  ref_pos, _ = hf.model.get_rope_index(torch.tensor(ids), None, None, None, torch.tensor(mask))
  pos, _ = get_rope_index(ids, None, mask, image_token_id=cfg.image_token_id,
                          vision_start_token_id=cfg.vision_start_token_id, spatial_merge_size=2)
  np.testing.assert_array_equal(pos, ref_pos.numpy())


@pytest.mark.parametrize("tied", [False, True])
def test_scan_unroll_and_remat_agree(tied):
  base = tiny_config()
  base = base.replace(text=base.text.__class__(**{**base.text.__dict__, "tie_word_embeddings": tied}))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 11)))
  outs = []
  for scan, remat in ((True, "none"), (False, "none"), (True, "full"), (False, "dots_saveable")):
    model = tiny_model(base.replace(scan_layers=scan, remat_policy=remat))
    assert (model.lm_head is None) == tied
    outs.append(np.asarray(nnx.jit(lambda m, x: m(x, positions="flat"))(model, ids)))  # eager: op by op, slow
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=1e-5, rtol=0)


def test_kv_prefix_reproduces_full_causal_pass():
  """Decoding the second half against the first half's K/V equals one causal pass (cache contract)."""
  from dvl_jax.attention.spec import AttentionSpec

  model = tiny_model(seed=1)
  ids = jnp.asarray(np.random.default_rng(2).integers(3, 200, (1, 10)))
  pos = jnp.arange(10)[None]
  emb = model.embed(ids)
  full, kv = model.decode(emb, pos, AttentionSpec.self_attention(jnp.ones((1, 10))), return_kv=True)
  assert kv[0].shape == (2, 1, 10, 2, 16)
  prefix = jax.tree.map(lambda a: a[:, :, :6], kv)
  idx = jnp.arange(10, dtype=jnp.int32)[None]
  spec = AttentionSpec(q_idx=idx[:, 6:], kv_idx=idx, q_seg=jnp.ones((1, 4), jnp.int32),
                       kv_seg=jnp.ones((1, 10), jnp.int32), kind="causal")
  tail, _ = model.decode(emb[:, 6:], pos[:, 6:], spec, cache=prefix)
  np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 6:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [True, False])
def test_decode_fills_a_cache_layer_by_layer_with_the_k_v_it_would_return(scan):
  """`decode(fill=cache)` (the samplers' prefill): each layer's K/V land in the cache's first slots, the rest of the
  cache keeps its values, and the hidden states are those of the plain call."""
  from dvl_jax.attention.spec import AttentionSpec

  model = tiny_model(tiny_config(scan_layers=scan), seed=6)
  rng = np.random.default_rng(6)
  emb = model.embed(jnp.asarray(rng.integers(3, 200, (2, 5))))
  pos, spec = jnp.arange(5)[None].repeat(2, 0), AttentionSpec.self_attention(jnp.ones((2, 5)), kind="causal")
  hidden, kv = jax.jit(lambda e: model.decode(e, pos, spec, return_kv=True))(emb)
  cache = tuple(jnp.asarray(rng.normal(size=(a.shape[0], 2, 9, *a.shape[3:])), a.dtype) for a in kv)
  got_hidden, filled = jax.jit(lambda e, c: model.decode(e, pos, spec, fill=c))(emb, cache)
  np.testing.assert_array_equal(np.asarray(got_hidden), np.asarray(hidden))
  for got, new, old in zip(filled, kv, cache):
    np.testing.assert_array_equal(np.asarray(got[:, :, :5]), np.asarray(new))
    np.testing.assert_array_equal(np.asarray(got[:, :, 5:]), np.asarray(old[:, :, 5:]))


def test_the_model_call_takes_the_block_size_for_block_causal_from_the_config():
  """`mask_kind="block_causal"` used to fall back silently to plain causal attention (block size 1)."""
  from dvl_jax.attention.spec import AttentionSpec

  model = tiny_model(tiny_config(block_size=4))
  ids = jnp.asarray(np.random.default_rng(3).integers(3, 200, (1, 8)))
  block = np.asarray(model(ids, positions="flat", mask_kind="block_causal"))
  causal = np.asarray(model(ids, positions="flat", mask_kind="causal"))
  spec = AttentionSpec.self_attention(jnp.ones((1, 8), jnp.int32), kind="block_causal", block_size=4)
  hidden, _ = model.decode(model.embed(ids), jnp.arange(8)[None], spec)
  np.testing.assert_allclose(block, np.asarray(model.logits(hidden)), atol=1e-6)
  assert np.abs(block[:, :3] - causal[:, :3]).max() > 1e-3  # a block's first tokens now see the whole block


@pytest.mark.parametrize("scan", [True, False])
def test_a_packed_decode_equals_the_padded_one_at_its_positions(scan):
  """`decode(packed=...)` computes only the listed positions (those the spec leaves valid; the others are zeros in
  the hidden states and K/V): the same numbers as the padded call there, with a KV-cache prefix in front."""
  from dvl_jax.attention.spec import AttentionSpec

  model = tiny_model(tiny_config(scan_layers=scan), seed=4)
  b, n, m = 3, 6, 4
  rng = np.random.default_rng(5)
  emb = model.embed(jnp.asarray(rng.integers(3, 200, (b, n))))
  pos = m + jnp.broadcast_to(jnp.arange(n), (b, n))
  valid = np.ones((b, n), bool)
  valid[0, :3] = valid[2, 1:4] = False  # rows 0 and 2 leave out some of their window
  idx = jnp.arange(m + n, dtype=jnp.int32)[None].repeat(b, 0)
  cache = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                       model.decode(emb[:, :m], pos[:, :m], AttentionSpec.self_attention(jnp.ones((b, m))),
                                    return_kv=True)[1])
  spec = AttentionSpec(q_idx=idx[:, m:], kv_idx=idx, q_seg=jnp.asarray(valid, jnp.int32),
                       kv_seg=jnp.concatenate([jnp.ones((b, m), jnp.int32), jnp.asarray(valid, jnp.int32)], 1),
                       kind="block_causal", block_size=3)
  packed = jnp.asarray(np.flatnonzero(valid)[::-1].copy())  # any order
  decode = jax.jit(lambda e, p, packed: model.decode(e, pos, spec, cache, return_kv=True, packed=p if packed else None),
                   static_argnums=2)
  (full, full_kv), (got, got_kv) = decode(emb, packed, False), decode(emb, packed, True)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)
  assert not np.asarray(got)[~valid].any()
  for a, want in zip(got_kv, full_kv):
    np.testing.assert_allclose(np.asarray(a)[:, valid], np.asarray(want)[:, valid], atol=1e-5, rtol=0)
    assert not np.asarray(a)[:, ~valid].any()
  jaxpr = str(jax.make_jaxpr(lambda e: model.decode(e, pos, spec, cache, packed=packed))(emb))
  assert f"f32[{packed.size},{model.config.text.intermediate_size}]" in jaxpr  # the MLP runs over the packed rows
