"""LLaVA-OneVision's image packing as DiffusionVL does it, laid out on the host (spec §7.2, §11).

An image becomes crops (`anyres_max_n`: a global 384 view then the best-fit grid of crops, or one crop);
each crop gives `grid**2` projected features. DiffusionVL then keeps the global view as is, puts the grid's
features back on one map, cuts the padding off (`unpad_image`, its `int()` rounding), shrinks the map
bilinearly when it exceeds ~1.1x (linear) `n` crops, and ends every row with `image_newline`. All of it depends
only on the image sizes, so it is computed here once as a gather: each image token is a bilinear blend of
at most four projected features (a plain copy has weights 1, 0) or the newline. The model applies it with
static shapes. PyTorch's bilinear taps (align_corners=False) are computed in float32 as it does.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import struct
from transformers.image_processing_utils import select_best_resolution


@struct.dataclass
class AnyresLayout:
  """Image token `m` (row-major over the batch's images) = `wy[m] . (wx[m] . features[source[m]])`, or the
  newline where `newline[m]`; `source` `[M, 4]` holds rows (y0x0, y0x1, y1x0, y1x1) of the projected crop
  features `[n_crops * grid**2, H]`; `wy`, `wx` `[M, 2]` float32. Padding rows have zero weights."""

  source: jax.Array
  wy: jax.Array
  wx: jax.Array
  newline: jax.Array


def crop_grid(image_hw: Sequence[int], vision: Any) -> tuple[int, int]:
  """(rows, cols) of crops of the best-fit pinpoint for an image of (height, width) pixels."""
  s = vision.image_size
  h, w = select_best_resolution(tuple(int(x) for x in image_hw), [(r * s, c * s) for r, c in vision.grid_pinpoints])
  return h // s, w // s


def crops_per_image(image_hw: Sequence[int], vision: Any) -> int:
  """Crops the processor makes: the global view plus the grid (anyres), or one (square)."""
  if not vision.anyres:
    return 1
  rows, cols = crop_grid(image_hw, vision)
  return 1 + rows * cols


def unpad_box(map_hw: tuple[int, int], image_hw: Sequence[int]) -> tuple[slice, slice]:
  """The rows and columns of a padded feature map that show the image (DiffusionVL's `unpad_image`, `int()`
  truncation: transformers rounds to 7 decimals first, which differs when the product lands just below an
  integer)."""
  big_h, big_w = map_hw
  h, w = (int(x) for x in image_hw)
  if w / h > big_w / big_h:
    pad = (big_h - int(h * (big_w / w))) // 2
    return slice(pad, big_h - pad), slice(0, big_w)
  pad = (big_w - int(w * (big_h / h))) // 2
  return slice(0, big_h), slice(pad, big_w - pad)


def downscaled(map_hw: tuple[int, int], vision: Any) -> tuple[int, int]:
  """The map's size after DiffusionVL's bilinear downscale (unchanged unless ~1.1x over `max_crops` crops)."""
  h, w = map_hw
  times = math.sqrt(h * w / (vision.max_crops * vision.grid**2))
  return (int(h // times), int(w // times)) if times > 1.1 else (h, w)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PyTorch's linear taps for one axis (align_corners=False): first / second source index and their weights."""
  if n_in == n_out:
    i = np.arange(n_in)
    return i, i, np.stack([np.ones(n_in, np.float32), np.zeros(n_in, np.float32)], axis=-1)
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
  i1 = i0 + (i0 < n_in - 1)
  return i0, i1, np.stack([np.float32(1) - lam, lam], axis=-1).astype(np.float32)


def _copy_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  one = np.tile(np.array([[1.0, 0.0]], np.float32), (len(rows), 1))
  return np.repeat(rows[:, None], 4, axis=1), one, one


def _grid_rows(first_crop: int, image_hw: Sequence[int], crops: tuple[int, int], vision: Any):
  """Source rows and weights of the unpadded, downscaled grid map, a newline after each row."""
  g, t = vision.grid, vision.tokens_per_crop
  rows, cols = crops
  y, x = np.meshgrid(np.arange(rows * g), np.arange(cols * g), indexing="ij")
  feature = (first_crop + (y // g) * cols + x // g) * t + (y % g) * g + x % g  # [rows*g, cols*g]
  keep_y, keep_x = unpad_box(feature.shape, image_hw)
  feature = feature[keep_y, keep_x]
  out_h, out_w = downscaled(feature.shape, vision)
  y0, y1, wy = bilinear_taps(feature.shape[0], out_h)
  x0, x1, wx = bilinear_taps(feature.shape[1], out_w)
  source = np.stack([feature[y0][:, x0], feature[y0][:, x1], feature[y1][:, x0], feature[y1][:, x1]], axis=-1)
  wy = np.broadcast_to(wy[:, None], (out_h, out_w, 2))
  wx = np.broadcast_to(wx[None], (out_h, out_w, 2))
  extra = 1 if vision.newline else 0
  pad = lambda a: np.pad(a, ((0, 0), (0, extra), (0, 0))).reshape(-1, a.shape[-1])  # noqa: E731
  newline = np.zeros((out_h, out_w + extra), bool)
  newline[:, out_w:] = True
  return pad(source), pad(wy), pad(wx), newline.reshape(-1)


def anyres_layout(image_sizes: Sequence[Sequence[int]], vision: Any, crops: Sequence[int] | None = None,
                  pad_tokens: int | None = None) -> AnyresLayout:
  """The packing of images of (height, width) `image_sizes`, crops concatenated in image order.

  `crops[i]` is image i's crop count (default `crops_per_image`): more than one is the anyres path (global
  view + grid), one is a single view with one trailing newline if the merge type adds newlines (DiffusionVL's
  "pad" evaluation of several images, and stage 1's square crops, where "flat" adds none).
  `pad_tokens` pads the layout to that many tokens (zero features) for static shapes.
  """
  crops = [crops_per_image(hw, vision) for hw in image_sizes] if crops is None else list(crops)
  if len(crops) != len(image_sizes):
    raise ValueError(f"{len(crops)} crop counts for {len(image_sizes)} images")
  t = vision.tokens_per_crop
  parts, first = [], 0
  for hw, n in zip(image_sizes, crops):
    base = _copy_rows(np.arange(first * t, (first + 1) * t))
    if n > 1:
      grid = crop_grid(hw, vision)
      if n != 1 + grid[0] * grid[1]:
        raise ValueError(f"image of size {tuple(hw)} has {n} crops; anyres makes 1 + {grid[0]}x{grid[1]}")
      parts.append((*base, np.zeros(t, bool)))
      parts.append(_grid_rows(first + 1, hw, grid, vision))
    else:
      extra = int(vision.newline)
      parts.append((*(np.pad(a, ((0, extra), (0, 0))) for a in base), np.arange(t + extra) >= t))
    first += n
  source, wy, wx, newline = (np.concatenate([p[k] for p in parts]) for k in range(4))
  if pad_tokens is not None:
    if pad_tokens < len(newline):
      raise ValueError(f"pad_tokens={pad_tokens} is below the {len(newline)} image tokens")
    extra = pad_tokens - len(newline)
    source, wy, wx = (np.pad(a, ((0, extra), (0, 0))) for a in (source, wy, wx))
    newline = np.pad(newline, (0, extra))
  return AnyresLayout(source=source.astype(np.int32), wy=wy.astype(np.float32), wx=wx.astype(np.float32),
                      newline=newline)


def image_token_counts(image_sizes: Sequence[Sequence[int]], vision: Any,
                       crops: Sequence[int] | None = None) -> np.ndarray:
  """Image tokens per image `[n_images]`: what the processor expands each placeholder to."""
  crops = [None] * len(image_sizes) if crops is None else list(crops)
  return np.array([len(anyres_layout([hw], vision, None if c is None else [c]).newline)
                   for hw, c in zip(image_sizes, crops)], np.int64)


def sharded_anyres_layout(shard_sizes: Sequence[np.ndarray], shard_used: Sequence[np.ndarray], shard_rows: int,
                          vision: Any) -> AnyresLayout:
  """The packing of a training batch whose patch rows are `len(shard_sizes)` chunks of `shard_rows` rows, chunk k
  holding the crops of the images of (height, width) `shard_sizes[k]` `[n_k, 2]` then zeros; image i of shard k
  keeps its first `shard_used[k][i]` tokens (truncation). Tokens in batch order, padded to a size fixed by
  `shard_rows` and the chunk count: an image of n crops has at most `n * (grid**2 + grid)` tokens (the grid map
  is at most its crops' features, with at most `grid` newlines per crop row)."""
  t = vision.tokens_per_crop
  if shard_rows % t:
    raise ValueError(f"shard_rows={shard_rows} must be a multiple of the {t} patch rows of a crop")
  parts = []
  for k, (sizes, used) in enumerate(zip(shard_sizes, shard_used)):
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2).tolist()
    first = k * shard_rows
    for hw, n in zip(sizes, np.asarray(used, np.int64).reshape(-1)):
      one = anyres_layout([hw], vision)
      parts.append((one.source[:n] + first, one.wy[:n], one.wx[:n], one.newline[:n]))
      first += crops_per_image(hw, vision) * t
    if first > (k + 1) * shard_rows:
      raise ValueError(f"shard {k}'s crops take {first - k * shard_rows} rows, more than shard_rows={shard_rows}")
  size = len(shard_sizes) * (shard_rows + shard_rows // vision.grid)
  empty = (np.zeros((0, 4), np.int32), np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, bool))
  source, wy, wx, newline = (np.concatenate([e, *(p[i] for p in parts)]) for i, e in enumerate(empty))
  pad = size - len(newline)
  return AnyresLayout(source=np.pad(source, ((0, pad), (0, 0))).astype(np.int32),
                      wy=np.pad(wy, ((0, pad), (0, 0))), wx=np.pad(wx, ((0, pad), (0, 0))),
                      newline=np.pad(newline, (0, pad)))
