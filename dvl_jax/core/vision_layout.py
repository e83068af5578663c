"""Host-side (NumPy) window layout of the Qwen2.5-VL ViT (spec §2.3, §2.4).

Which patch attends to which depends on the image sizes, which are data: it is computed once on the
host and handed to the jitted tower as int32 arrays. Windows and images become segment ids, so window
attention is exact segment masking; padding to a fixed `pad_patches` keeps jit shapes static.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct

from dvl_jax.core.config import VisionConfig


@struct.dataclass
class VisionLayout:
  """Index arrays for one `pixel_values` batch; rows are patches in WINDOW order unless noted.

  `window_index` `[M]`: merged-token id (processor order) at each window-order slot (HF
    `get_window_index`); padded slots map to themselves.
  `reverse_index` `[M]`: `argsort(window_index)`, back to processor order after the merger.
  `window_segments` `[N]`: 1 + window number (empty windows skipped), 0 for padding.
  `image_segments` `[N]`: 1 + frame number (HF `cu_seqlens`: one segment per `gh*gw` frame), 0 for padding.
  `hw` `[N, 2]`: (row, col) patch coordinates for the 2-D rotary embedding, 0 for padding.
  `M = N / merge_unit`.
  `chunks` (static): the rows split into this many equal chunks (one per batch shard) that no window,
    image or `window_index` entry crosses, so the tower reorders and attends inside each chunk and a
    device never touches another shard's patches.
  """

  window_index: jax.Array
  reverse_index: jax.Array
  window_segments: jax.Array
  image_segments: jax.Array
  hw: jax.Array
  chunks: int = struct.field(pytree_node=False, default=1)


def num_patches(grid_thw: np.ndarray) -> int:
  """Rows of `pixel_values` for these images: sum of `t * gh * gw`."""
  return int(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=-1).sum())


def tokens_per_image(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
  """Merged tokens (LLM tokens) per image `[n_images]`: `t * gh * gw / merge_unit`."""
  return np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=-1) // cfg.merge_unit


def patch_rows(n: int, bucket: int, unit: int) -> int:
  """Rows `n` patches are padded to under jit: the next power of two (at least `unit`) below `bucket`, a multiple
  of `bucket` above it. Few shapes (few compiles), and a single small image is not padded to a whole bucket: the
  tower's attention grows with the square of its rows."""
  if n >= bucket:
    return -(-n // bucket) * bucket
  return max(unit, 1 << max(n - 1, 0).bit_length())


def aligned_chunks(grid_thw: np.ndarray, rows: int, unit: int) -> int:
  """The most equal chunks (a power of two, each a multiple of `unit` rows) that `rows` padded patch rows of
  images `grid_thw` split into with no image across a chunk boundary (`VisionLayout.chunks`). A power of two
  keeps the compiled variants few; batches of equal images get one chunk per image."""
  ends = set(np.cumsum(np.prod(np.asarray(grid_thw).reshape(-1, 3), axis=-1)).tolist())
  real = max(ends, default=0)
  chunks = 1
  while rows % (2 * chunks * unit) == 0:
    size = rows // (2 * chunks)
    if not all(edge >= real or edge in ends for edge in range(size, rows, size)):
      break
    chunks *= 2
  return chunks


def vision_layout(grid_thw: np.ndarray, cfg: VisionConfig, pad_patches: int | None = None) -> VisionLayout:
  """Window order, segments and rotary coordinates for images `grid_thw` `[n_images, 3]` (t, gh, gw)."""
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  m, unit = cfg.spatial_merge_size, cfg.merge_unit
  win = cfg.window_size // m // cfg.patch_size
  index, windows, frames, hw = [], [], [], []
  token_offset = window_offset = frame_offset = 0
  for t, gh, gw in grid:
    if gh % m or gw % m:
      raise ValueError(f"image grid {(t, gh, gw)} is not divisible by spatial_merge_size={m}")
    mh, mw = gh // m, gw // m
    ids = np.arange(t * mh * mw).reshape(t, mh, mw)
    # HF pads each side by `win - n % win`: a whole empty window when n is a multiple of win.
    padded = np.pad(ids, ((0, 0), (0, win - mh % win), (0, win - mw % win)), constant_values=-1)
    nh, nw = padded.shape[1] // win, padded.shape[2] // win
    cells = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(-1, win * win)
    keep = cells >= 0
    order = cells[keep]
    window_of = np.repeat(np.arange(len(cells)), keep.sum(axis=1))
    dense_window = np.unique(window_of, return_inverse=True)[1]  # drops empty windows
    frame, rem = np.divmod(order, mh * mw)
    hb, wb = np.divmod(rem, mw)
    sub_h, sub_w = np.divmod(np.arange(unit), m)
    index.append(order + token_offset)
    windows.append(1 + window_offset + dense_window)
    frames.append(1 + frame_offset + frame)
    hw.append(np.stack([(m * hb[:, None] + sub_h).ravel(), (m * wb[:, None] + sub_w).ravel()], axis=-1))
    token_offset += len(order)
    window_offset += int(dense_window.max()) + 1
    frame_offset += int(t)
  window_index = np.concatenate(index)
  window_segments = np.repeat(np.concatenate(windows), unit)
  image_segments = np.repeat(np.concatenate(frames), unit)
  hw_all = np.concatenate(hw)
  n = len(window_segments)
  if pad_patches is not None:
    if pad_patches < n or pad_patches % unit:
      raise ValueError(f"pad_patches={pad_patches} must be a multiple of {unit} and at least {n}")
    extra = pad_patches - n
    window_index = np.concatenate([window_index, np.arange(n // unit, pad_patches // unit)])
    window_segments, image_segments, hw_all = (np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])
                                               for a in (window_segments, image_segments, hw_all))
  return VisionLayout(
      window_index=window_index.astype(np.int32),
      reverse_index=np.argsort(window_index).astype(np.int32),
      window_segments=window_segments.astype(np.int32),
      image_segments=image_segments.astype(np.int32),
      hw=hw_all.astype(np.int32),
  )
