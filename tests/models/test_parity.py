"""The converted model against transformers' PyTorch Qwen2.5-VL (fp32, highest matmul precision).

Every case goes through the real path: `save_pretrained` -> `dvl.convert` -> `dvl.load`.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dvl_jax as dvl
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.testing.tiny import converted_checkpoint

LOGITS_TOL = 1e-4
VISION_TOL = 1e-5


@pytest.fixture(scope="module", params=["untied", "tied"])
def models(request, tmp_path_factory):
  cfg = tiny_config()
  if request.param == "tied":
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=True))
  root = tmp_path_factory.mktemp(request.param)
  hf, converted = converted_checkpoint(str(root), cfg, seed=3)
  return cfg, hf, dvl.load(converted)


def _image_tokens(cfg, grid):
  return [cfg.vision_start_token_id] + [cfg.image_token_id] * int(np.prod(grid) // 4) + [cfg.vision_end_token_id]


def _batch(cfg, rows, grids, seed=0):
  """Right-padded ids/mask from token lists, and random pixel rows for the images."""
  rng = np.random.default_rng(seed)
  n = max(len(r) for r in rows)
  ids = np.full((len(rows), n), cfg.pad_token_id, np.int64)
  mask = np.zeros((len(rows), n), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  if len(grids) == 0:
    return ids, mask, None, None
  grids = np.asarray(grids)
  pixels = rng.normal(size=(int(grids.prod(axis=1).sum()), cfg.vision.patch_dim)).astype(np.float32)
  return ids, mask, pixels, grids


def _words(n, seed):
  return list(np.random.default_rng(seed).integers(3, 200, n))


def _compare(cfg, hf, model, ids, mask, pixels, grids, positions):
  kwargs = {}
  if pixels is not None:
    kwargs = dict(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
  if positions == "flat":
    kwargs["position_ids"] = torch.tensor(np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy())
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()
  ours = np.asarray(model(jnp.asarray(ids), None if pixels is None else jnp.asarray(pixels), grids,
                          positions=positions, attention_mask=jnp.asarray(mask)))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  diff = np.abs(ours - ref)[mask == 1].max()
  assert diff <= LOGITS_TOL, f"max |Δ logits| = {diff:.2e} (logits up to {np.abs(ref).max():.1f})"


CASES = {
    "text_only": lambda cfg: ([_words(17, 0), _words(17, 1)], []),
    "one_image": lambda cfg: ([_words(3, 2) + _image_tokens(cfg, (1, 4, 4)) + _words(5, 3)], [(1, 4, 4)]),
    # Non-square images needing window padding, several windows per side, two images in one row.
    "several_images": lambda cfg: ([_words(2, 4) + _image_tokens(cfg, (1, 12, 20)) + _words(3, 5)
                                    + _image_tokens(cfg, (1, 16, 8)) + _words(4, 6)], [(1, 12, 20), (1, 16, 8)]),
    "padded_batch": lambda cfg: ([_words(4, 7) + _image_tokens(cfg, (1, 8, 12)) + _words(9, 8),
                                  _words(6, 9) + _image_tokens(cfg, (1, 4, 6)) + _words(2, 10),
                                  _words(5, 11)], [(1, 8, 12), (1, 4, 6)]),
}


@pytest.mark.parametrize("positions", ["mrope", "flat"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_pytorch(models, case, positions):
  cfg, hf, model = models
  rows, grids = CASES[case](cfg)
  _compare(cfg, hf, model, *_batch(cfg, rows, grids), positions)


def test_vision_features_match_pytorch(models):
  cfg, hf, model = models
  grids = np.array([(1, 12, 20), (1, 16, 8), (1, 4, 4)])
  _, _, pixels, grids = _batch(cfg, [[0]], grids, seed=5)
  with torch.no_grad():
    ref = hf.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids)).numpy()
  from dvl_jax.core.vision_layout import vision_layout

  ours = np.asarray(model.image_features(jnp.asarray(pixels), vision_layout(grids, cfg.vision)))
  assert np.abs(ours - ref).max() <= VISION_TOL
