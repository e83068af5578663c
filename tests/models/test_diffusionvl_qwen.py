"""The DiffusionVL-Qwen family (SigLIP + mlp2x_gelu + anyres packing + Qwen2.5) against transformers'
`LlavaOnevisionForConditionalGeneration` (fp32, highest matmul precision), and DiffusionVL's own choices
where they differ from it (anyres_max_4, the dropped last SigLIP layer, `int()` unpadding, pinpoint order).

Every model goes through the real path: a random transformers model -> `save_pretrained` -> `dvl.convert`
-> `dvl.load`. Images are real PIL images made into crops by `data.llava_pixels`; transformers gets the same
crops as `[n, C, S, S]` tensors with the images' sizes.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import dvl_jax as dvl
from dvl_jax.data.anyres import anyres_layout, image_token_counts
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.diffusion.loss import ar_loss, bd3_loss
from dvl_jax.testing.tiny import converted_checkpoint, tiny_model, tiny_siglip_config
from tests.diffusion import test_sampler as sampler_oracle
from tests.diffusion.test_loss import _oracle_bd3

CFG = tiny_siglip_config()
V = CFG.vision
LOGITS_TOL = 1e-4
VISION_TOL = 1e-5
# (height, width): a 1x1 grid; a 2x3 grid unpadded to 4 of 6 rows; a 3x3 grid unpadded to 7 of 9 columns then
# downscaled to 6x5 (anyres_max_4; transformers' default anyres_max_9 keeps it); a 3x1 grid; a 2x3 grid
# downscaled without unpadding.
SIZES = {"small": (30, 30), "wide": (50, 120), "tall": (130, 90), "narrow": (100, 40), "big": (84, 126)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("diffusionvl_qwen")
  hf, dst = converted_checkpoint(str(root), CFG, seed=3)
  return hf, dvl.load(dst), root


def images(names, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (*SIZES[n], 3), dtype=np.uint8)) for n in names]


def rows_to_crops(rows):
  """Patch rows back to `[n, C, g*p, g*p]` crops (transformers' valid Conv2d ignores the pixels dropped)."""
  g, p, c = V.grid, V.patch_size, V.in_channels
  x = rows.reshape(-1, g, g, c, p, p).transpose(0, 3, 1, 4, 2, 5)
  return torch.tensor(np.ascontiguousarray(x.reshape(-1, c, g * p, g * p)))


def hf_packed(hf, rows, sizes, aspect="anyres_max_4"):
  """transformers' projected, unpadded, downscaled, newline-terminated image features, images concatenated."""
  with torch.no_grad():
    feats = hf.model.get_image_features(rows_to_crops(rows), torch.tensor(sizes), vision_aspect_ratio=aspect)
  return torch.cat(feats).numpy()


def test_crop_features_are_the_last_kept_layer_without_post_layernorm(converted):
  hf, model, _ = converted
  rows, _, _ = pixel_rows(images(["tall"]), V)
  with torch.no_grad():
    out = hf.model.vision_tower(rows_to_crops(rows), output_hidden_states=True)
  ours = np.asarray(model.vision_tower(jnp.asarray(rows)))
  assert len(out.hidden_states) == V.depth + 1
  np.testing.assert_allclose(ours, out.hidden_states[-1].numpy(), atol=VISION_TOL, rtol=0)
  assert np.abs(ours - out.last_hidden_state.numpy()).max() > 100 * VISION_TOL  # post_layernorm not applied


def test_image_features_match_transformers_packing(converted):
  hf, model, _ = converted
  names = ["small", "wide", "tall", "narrow", "big"]
  rows, sizes, crops = pixel_rows(images(names, seed=1), V)
  assert crops.tolist() == [2, 7, 10, 4, 7]
  n = int(image_token_counts(sizes.tolist(), V).sum())
  padded = anyres_layout(sizes.tolist(), V, pad_tokens=n + 5)  # static shapes: zero features after the tokens
  ours = np.asarray(nnx.jit(type(model).image_features)(model, jnp.asarray(rows), padded))
  want = hf_packed(hf, rows, sizes.tolist())
  assert want.shape == (n, CFG.text.hidden_size) and ours.shape == (n + 5, CFG.text.hidden_size)
  np.testing.assert_allclose(ours[:n], want, atol=VISION_TOL, rtol=0)
  assert not ours[n:].any()
  with pytest.raises(ValueError, match="below the"):
    anyres_layout(sizes.tolist(), V, pad_tokens=n - 1)
  # anyres_max_4 (DiffusionVL) downscales the tall image's 9x7 map to 6x5; transformers' default (9) does not.
  tall_rows, tall_sizes, _ = pixel_rows(images(["tall"]), V)
  assert len(hf_packed(hf, tall_rows, tall_sizes.tolist(), "anyres_max_9")) == V.tokens_per_crop + 9 * (7 + 1)
  assert image_token_counts(tall_sizes.tolist(), V).tolist() == [V.tokens_per_crop + 6 * (5 + 1)]


def _words(n, seed):
  return list(np.random.default_rng(seed).integers(3, 200, n))


def _image_tokens(name):
  return [CFG.image_token_id] * int(image_token_counts([SIZES[name]], V)[0])


CASES = {
    "text_only": [(_words(17, 0), []), (_words(11, 1), [])],
    # one image in a row; two images of different aspect ratios in another (several crops, unpadding, a
    # downscale, newlines); a shorter text-only row padded on the right
    "images_padded_batch": [(_words(3, 2) + _image_tokens("tall") + _words(5, 3), ["tall"]),
                            (_words(2, 4) + _image_tokens("wide") + _words(3, 5) + _image_tokens("narrow")
                             + _words(4, 6), ["wide", "narrow"]),
                            (_words(5, 11), [])],
}


@nnx.jit
def _logits(model, ids, pixels, layout, mask):
  return model(ids, pixels, vision=layout, attention_mask=mask)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(converted, case):
  hf, model, _ = converted
  rows_in = CASES[case]
  n = max(len(r) for r, _ in rows_in)
  ids = np.full((len(rows_in), n), CFG.pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for i, (r, _) in enumerate(rows_in):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  names = [name for _, row_images in rows_in for name in row_images]
  kwargs, pixels, layout = {}, None, None
  if names:
    rows, sizes, _ = pixel_rows(images(names, seed=2), V)
    kwargs = dict(pixel_values=rows_to_crops(rows), image_sizes=torch.tensor(sizes))
    pixels, layout = jnp.asarray(rows), anyres_layout(sizes.tolist(), V)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()
  ours = np.asarray(_logits(model, jnp.asarray(ids), pixels, layout, jnp.asarray(mask)))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  diff = np.abs(ours - ref)[mask == 1].max()
  assert diff <= LOGITS_TOL, f"max |Δ logits| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})"


def test_model_call_needs_the_image_sizes_or_a_layout(converted):
  _, model, _ = converted
  rows, _, _ = pixel_rows(images(["narrow"]), V)
  with pytest.raises(ValueError, match=r"\(height, width\) sizes \(image_grid_thw=\)"):
    model(jnp.asarray([_words(4, 20)]), jnp.asarray(rows))


# ---- the losses and the block sampler run on this family unchanged ------------------------------------------

def _train_batch(seed):
  """Three rows: one with the wide image (2x3 crops, unpadded), partly labelled blocks, one right-padded."""
  rng = np.random.default_rng(seed)
  rows, sizes, _ = pixel_rows(images(["wide"], seed=seed), V)
  n_img = int(image_token_counts(sizes.tolist(), V)[0])
  n = n_img + 14
  ids = rng.integers(3, 200, (3, n))
  ids[0, 2:2 + n_img] = CFG.image_token_id
  labels = np.full((3, n), -100)
  labels[0, 2 + n_img:] = ids[0, 2 + n_img:]
  labels[1, 5:30] = ids[1, 5:30]
  labels[2, 9:40] = ids[2, 9:40]
  amask = np.ones((3, n), np.int64)
  amask[2, 40:] = 0
  ids[2, 40:] = CFG.pad_token_id
  t = np.repeat(rng.uniform(0.001, 1.0, (3, -(-n // CFG.block_size))), CFG.block_size, axis=1)[:, :n]
  move = rng.uniform(size=(3, n)) <= t
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.asarray(amask),
           "pixel_values": jnp.asarray(rows), "vision": anyres_layout(sizes.tolist(), V)}
  return batch, rows, sizes, t.astype(np.float32), move


def test_bd3_loss_matches_the_independent_oracle(converted):
  """tests/diffusion's spec §5 oracle, its embeddings from transformers' LLaVA-OneVision features."""
  hf, model, _ = converted
  batch, rows, sizes, t, move = _train_batch(0)
  reference = SimpleNamespace(lm_head=hf.lm_head, model=SimpleNamespace(
      language_model=hf.model.language_model,
      get_image_features=lambda pixels, image_sizes: hf.model.get_image_features(
          pixels, image_sizes, vision_aspect_ratio=V.image_aspect_ratio)))
  ids, labels, amask = (np.asarray(batch[k]) for k in ("input_ids", "labels", "attention_mask"))
  expected = _oracle_bd3(reference, CFG, ids, labels, amask, rows_to_crops(rows).numpy(), sizes, t, move)
  loss, metrics = nnx.jit(bd3_loss)(model, batch, jax.random.key(0), noise=(jnp.asarray(t), jnp.asarray(move)))
  assert float(metrics["masked_fraction"]) > 0
  assert abs(float(loss) - expected) <= 1e-5 * max(1.0, abs(expected)), (float(loss), expected)


def test_ar_loss_matches_transformers(converted):
  hf, model, _ = converted
  batch, rows, sizes, _, _ = _train_batch(1)
  ids, amask, labels = (torch.tensor(np.asarray(batch[k], np.int64)) for k in ("input_ids", "attention_mask", "labels"))
  with torch.no_grad():
    expected = hf(input_ids=ids, pixel_values=rows_to_crops(rows), image_sizes=torch.tensor(sizes),
                  attention_mask=amask, labels=labels).loss.item()
  loss, _ = nnx.jit(ar_loss)(model, batch)
  assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected), (float(loss), expected)


@pytest.mark.parametrize("strategy,tau,steps", [("low_confidence_static", 0.85, 4), ("threshold", 0.5, 8)])
def test_block_diffusion_matches_the_sampler_oracle(monkeypatch, strategy, tau, steps):
  """tests/diffusion's cache-free spec §6 oracle, with this family's layout in place of Qwen's window layout."""
  model = tiny_model(CFG, spread=True)
  rows, sizes, _ = pixel_rows(images(["small"], seed=3), V)
  monkeypatch.setattr(sampler_oracle, "vision_layout", lambda grid, _: anyres_layout(np.asarray(grid).tolist(), V))
  prompts = [_words(3, 12) + _image_tokens("small") + _words(4, 13), _words(13, 14)]
  _, outs = sampler_oracle.check_against_oracle(
      model, prompts, 21, steps, strategy, tau, pixel_values=rows, image_grid_thw=sizes,
      vision=anyres_layout(sizes.tolist(), V), modes=("fused",))
  assert len(set(np.asarray(outs["fused"].tokens).ravel().tolist())) > 3  # real answers, not one repeated id
