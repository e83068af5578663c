"""DiffusionVL-Qwen's image path on the host, against DiffusionVL's own LLaVA code restated here (PIL + NumPy):
`process_anyres_image` (crops), `select_best_resolution` (its (width, height) reading of the pinpoints), the
"(1x1),...,(6x6)" expansion and `unpad_image` (`int()` where transformers rounds first)."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

from dvl_jax.data.anyres import anyres_layout, bilinear_taps, crop_grid, unpad_box
from dvl_jax.data.llava_pixels import pixel_rows
from dvl_jax.models.diffusionvl_qwen.vision_config import GRID_1_TO_6, SiglipVisionConfig, pinpoints_from_llava
from dvl_jax.testing.tiny import tiny_siglip_config

V = tiny_siglip_config().vision
FULL = SiglipVisionConfig()


def llava_best_fit(w, h, pinpoints_wh):
  """LLaVA's `select_best_resolution` over (width, height) pixel pairs."""
  best, best_eff, best_waste = None, 0, float("inf")
  for pw, ph in pinpoints_wh:
    scale = min(pw / w, ph / h)
    eff = min(int(w * scale) * int(h * scale), w * h)
    waste = pw * ph - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (pw, ph), eff, waste
  return best


def llava_pinpoints(grid_string, s):
  """`get_anyres_image_grid_shape`'s expansion: (i, j) over the range, times the crop size, read as (w, h)."""
  pairs = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", grid_string)]
  return [(i * s, j * s) for i in range(pairs[0][0], pairs[-1][0] + 1) for j in range(pairs[0][1], pairs[-1][1] + 1)]


def llava_crops(image, s, pinpoints_wh):
  """`process_anyres_image` + SigLIP preprocessing: global resize, then the padded best fit's crops, row-major."""
  w, h = image.size
  bw, bh = llava_best_fit(w, h, pinpoints_wh)
  scale_w, scale_h = bw / w, bh / h  # in this order: 50 * (132 / 120) rounds up to 56, 50 * 132 / 120 is 55
  if scale_w < scale_h:
    nw, nh = bw, min(math.ceil(h * scale_w), bh)
  else:
    nw, nh = min(math.ceil(w * scale_h), bw), bh
  canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
  canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((bw - nw) // 2, (bh - nh) // 2))  # PIL's default filter
  views = [image.resize((s, s), Image.BICUBIC)]
  views += [canvas.crop((j, i, j + s, i + s)) for i in range(0, bh, s) for j in range(0, bw, s)]
  return np.stack([(np.asarray(v, np.float32) / 255 - 0.5) / 0.5 for v in views]).transpose(0, 3, 1, 2)


def rows_to_crops(rows, v):
  g, p, c = v.grid, v.patch_size, v.in_channels
  return rows.reshape(-1, g, g, c, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(-1, c, g * p, g * p)


def test_pinpoints_expand_as_llava_reads_them():
  want = llava_pinpoints("(1x1),...,(6x6)", 384)
  assert [(c * 384, r * 384) for r, c in GRID_1_TO_6] == want  # (rows, cols) = (height, width) / 384
  assert pinpoints_from_llava("(1x1),...,(6x6)", 384) == GRID_1_TO_6
  assert pinpoints_from_llava([[384, 768], [768, 384]], 384) == ((2, 1), (1, 2))
  with pytest.raises(ValueError, match="multiples of the 384-pixel crop"):
    pinpoints_from_llava([[300, 384]], 384)


@pytest.mark.parametrize("seed", range(3))
def test_best_fit_grid_matches_llava(seed):
  sizes = np.random.default_rng(seed).integers(20, 3000, (300, 2))
  want_wh = llava_pinpoints("(1x1),...,(6x6)", 384)
  for h, w in sizes.tolist() + [[384, 384], [768, 385], [1000, 1000]]:
    bw, bh = llava_best_fit(w, h, want_wh)
    assert crop_grid((h, w), FULL) == (bh // 384, bw // 384), (h, w)


@pytest.mark.parametrize("hw", [(30, 30), (50, 120), (130, 90), (97, 23), (44, 88)])
def test_anyres_crops_match_llava_process_anyres_image(hw):
  image = Image.fromarray(np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8))
  rows, sizes, crops = pixel_rows([image], V)
  s = V.image_size
  want = llava_crops(image, s, [(c * s, r * s) for r, c in V.grid_pinpoints])
  assert sizes.tolist() == [list(hw)] and crops.tolist() == [len(want)]
  kept = V.grid * V.patch_size  # the valid Conv2d never reads the last S % p pixels
  np.testing.assert_allclose(rows_to_crops(rows, V), want[:, :, :kept, :kept], atol=1e-6, rtol=0)


def test_square_stage1_is_one_plain_resize():
  v = dataclasses.replace(V, image_aspect_ratio="square", patch_merge_type="flat")
  image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (50, 120, 3), dtype=np.uint8))
  rows, _, crops = pixel_rows([image], v)
  want = (np.asarray(image.resize((v.image_size,) * 2, Image.BICUBIC), np.float32) / 255 - 0.5) / 0.5
  assert crops.tolist() == [1]
  kept = v.grid * v.patch_size
  np.testing.assert_allclose(rows_to_crops(rows, v)[0], want.transpose(2, 0, 1)[:, :kept, :kept], atol=1e-6)
  layout = anyres_layout([(50, 120)], v)  # flat: the crop's tokens in order, no newline
  assert not layout.newline.any() and layout.source[:, 0].tolist() == list(range(v.tokens_per_crop))


def test_unpad_truncates_like_diffusionvl_not_rounds_like_transformers():
  """A 1476x1640 image on a 4x5 grid of 27-patch crops: w * (108 / h) = 119.99999999999999."""
  (h, w), (big_h, big_w) = (1476, 1640), (108, 135)
  assert crop_grid((h, w), FULL) == (4, 5)
  keep_y, keep_x = unpad_box((big_h, big_w), (h, w))
  pad = (big_w - int(w * (big_h / h))) // 2  # DiffusionVL's llava_arch.unpad_image
  assert (keep_y, keep_x) == (slice(0, big_h), slice(pad, big_w - pad)) and keep_x.stop - keep_x.start == 119
  theirs = unpad_image(torch.zeros(1, big_h, big_w), (h, w))
  assert theirs.shape[-1] == 121  # transformers' round(., 7) keeps two more columns


@pytest.mark.parametrize("n_in,n_out", [(9, 6), (7, 5), (4, 9), (5, 5)])
def test_bilinear_taps_reproduce_torch_interpolate(n_in, n_out):
  x = np.random.default_rng(n_in).normal(size=(n_in, n_in)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(x)[None, None], [n_out, n_out], mode="bilinear")[0, 0].numpy()
  i0, i1, w = bilinear_taps(n_in, n_out)
  rows = x[i0] * w[:, :1] + x[i1] * w[:, 1:]
  got = rows[:, i0] * w[None, :, 0] + rows[:, i1] * w[None, :, 1]
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
