"""The DiffusionVL-Qwen family (SigLIP + mlp2x_gelu + anyres packing + Qwen2.5) against transformers'
`LlavaOnevisionForConditionalGeneration` (fp32, highest matmul precision), and DiffusionVL's own choices
where they differ from it (anyres_max_4, the dropped last SigLIP layer, `int()` unpadding, pinpoint order).

Every model goes through the real path: a random transformers model -> `save_pretrained` -> `dvl.convert`
-> `dvl.load`. Images are real PIL images made into crops by `data.llava_pixels`; transformers gets the same
crops as `[n, C, S, S]` tensors with the images' sizes.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import dvl_jax as dvl
from dvl_jax.data.anyres import anyres_layout, image_token_counts
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.testing.tiny import converted_checkpoint, tiny_siglip_config

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
  ours = np.asarray(model.image_features(jnp.asarray(rows), anyres_layout(sizes.tolist(), V)))
  want = hf_packed(hf, rows, sizes.tolist())
  assert ours.shape == want.shape == (int(image_token_counts(sizes.tolist(), V).sum()), CFG.text.hidden_size)
  np.testing.assert_allclose(ours, want, atol=VISION_TOL, rtol=0)
  # anyres_max_4 (DiffusionVL) downscales the tall image's 9x7 map to 6x5; transformers' default (9) does not.
  tall_rows, tall_sizes, _ = pixel_rows(images(["tall"]), V)
  assert len(hf_packed(hf, tall_rows, tall_sizes.tolist(), "anyres_max_9")) == V.tokens_per_crop + 9 * (7 + 1)
  assert image_token_counts(tall_sizes.tolist(), V).tolist() == [V.tokens_per_crop + 6 * (5 + 1)]


def test_padded_layout_gives_zero_rows_after_the_image_tokens(converted):
  _, model, _ = converted
  rows, sizes, _ = pixel_rows(images(["wide"]), V)
  n = int(image_token_counts(sizes.tolist(), V)[0])
  full = np.asarray(model.image_features(jnp.asarray(rows), anyres_layout(sizes.tolist(), V, pad_tokens=n + 5)))
  np.testing.assert_array_equal(full[:n], np.asarray(model.image_features(jnp.asarray(rows),
                                                                          anyres_layout(sizes.tolist(), V))))
  assert not full[n:].any()
  with pytest.raises(ValueError, match="below the"):
    anyres_layout(sizes.tolist(), V, pad_tokens=n - 1)


def _words(n, seed):
  return list(np.random.default_rng(seed).integers(3, 200, n))


def _image_tokens(name):
  return [CFG.image_token_id] * int(image_token_counts([SIZES[name]], V)[0])


CASES = {
    "text_only": [(_words(17, 0), []), (_words(11, 1), [])],
    "one_image": [(_words(3, 2) + _image_tokens("tall") + _words(5, 3), ["tall"])],
    # two images of different aspect ratios in one row: several crops, unpadding, a downscale, newlines
    "several_images": [(_words(2, 4) + _image_tokens("wide") + _words(3, 5) + _image_tokens("narrow")
                        + _words(4, 6), ["wide", "narrow"])],
    "padded_batch": [(_words(4, 7) + _image_tokens("big") + _words(9, 8), ["big"]),
                     (_words(6, 9) + _image_tokens("small") + _words(2, 10), ["small"]),
                     (_words(5, 11), [])],
}


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
  kwargs, pixels, sizes = {}, None, None
  if names:
    rows, sizes, _ = pixel_rows(images(names, seed=2), V)
    kwargs = dict(pixel_values=rows_to_crops(rows), image_sizes=torch.tensor(sizes))
    pixels = jnp.asarray(rows)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()
  ours = np.asarray(model(jnp.asarray(ids), pixels, sizes, attention_mask=jnp.asarray(mask)))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  diff = np.abs(ours - ref)[mask == 1].max()
  assert diff <= LOGITS_TOL, f"max |Δ logits| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})"
