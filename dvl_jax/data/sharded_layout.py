"""ViT layout of a batch whose `pixel_values` are split into equal, zero-padded chunks, one per batch shard.

With the batch sharded over ('data', 'fsdp'), each process builds only its shards' pixels, so padding
sits at the end of every chunk rather than once at the end. The model splices image features in the
order the image tokens appear in the flattened batch (`Qwen25VL.embed`), so the layout's
`reverse_index` must bring exactly those tokens to the front: the used tokens of every image in batch
order, then the tokens cut off by truncation, then padding. Each chunk is in window order on its own
(`VisionLayout.chunks`): the tower then reorders and attends inside every shard's chunk, so a device
works on its own shard's patches only, however many devices there are.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dvl_jax.core.config import VisionConfig
from dvl_jax.core.vision_layout import VisionLayout, vision_layout


def sharded_vision_layout(shard_grids: Sequence[np.ndarray], shard_used: Sequence[np.ndarray],
                          shard_patches: int, cfg: VisionConfig) -> VisionLayout:
  """Layout for `len(shard_grids) * shard_patches` pixel rows; shard k's chunk holds its images
  (`shard_grids[k]` `[n_k, 3]`, of which `shard_used[k]` `[n_k]` tokens are spliced) then zeros.

  Each chunk is laid out in window order on its own (`chunks = len(shard_grids)`); segment ids stay
  distinct across chunks, so the layout also reads right as one sequence.
  """
  unit = cfg.merge_unit
  if shard_patches % unit:
    raise ValueError(f"shard_patches={shard_patches} must be a multiple of merge_unit={unit}")
  grids = [np.asarray(g, np.int64).reshape(-1, 3) for g in shard_grids]
  shard_tokens = shard_patches // unit
  counts = [int(np.prod(g, axis=-1).sum()) // unit for g in grids]
  if max(counts, default=0) > shard_tokens:
    raise ValueError(f"a shard has {max(counts) * unit} patches, more than shard_patches={shard_patches}")
  parts, windows, frames, spliced, cut = [], 0, 0, [], []
  for k, (g, used) in enumerate(zip(grids, shard_used)):
    offset = k * shard_tokens
    if not len(g):
      empty = np.zeros(shard_patches, np.int64)
      parts.append((offset + np.arange(shard_tokens), empty, empty, np.zeros((shard_patches, 2), np.int64)))
      continue
    lay = vision_layout(g, cfg, pad_patches=shard_patches)
    parts.append((lay.window_index + offset,
                  np.where(lay.window_segments > 0, lay.window_segments + windows, 0),
                  np.where(lay.image_segments > 0, lay.image_segments + frames, 0), lay.hw))
    windows += int(lay.window_segments.max(initial=0))
    frames += int(lay.image_segments.max(initial=0))
    tokens = np.prod(g, axis=-1) // unit
    start = offset + np.cumsum(tokens) - tokens
    for first, n, u in zip(start, tokens, np.asarray(used, np.int64)):
      spliced.append(np.arange(first, first + u))
      cut.append(np.arange(first + u, first + n))
  window_index, window_segments, image_segments, hw = (np.concatenate(x) for x in zip(*parts))
  real = np.concatenate([*spliced, *cut]).astype(np.int64)
  token_order = np.concatenate([real, np.setdiff1d(np.arange(len(grids) * shard_tokens), real)])
  return VisionLayout(
      window_index=window_index.astype(np.int32),
      reverse_index=np.argsort(window_index)[token_order].astype(np.int32),
      window_segments=window_segments.astype(np.int32),
      image_segments=image_segments.astype(np.int32),
      hw=hw.astype(np.int32),
      chunks=len(grids),
  )
