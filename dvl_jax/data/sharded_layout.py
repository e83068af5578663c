"""ViT layout of a batch whose `pixel_values` are split into equal, zero-padded chunks, one per batch shard.

With the batch sharded over ('data', 'fsdp'), each process builds only its shards' pixels, so padding
sits at the end of every chunk rather than once at the end. The model splices image features in the
order the image tokens appear in the flattened batch (`Qwen25VL.embed`), so the layout's
`reverse_index` must bring exactly those tokens to the front: the used tokens of every image in batch
order, then the tokens cut off by truncation, then padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dvl_jax.config import VisionConfig
from dvl_jax.model.vision_layout import VisionLayout, vision_layout


def sharded_vision_layout(shard_grids: Sequence[np.ndarray], shard_used: Sequence[np.ndarray],
                          shard_patches: int, cfg: VisionConfig) -> VisionLayout:
  """Layout for `len(shard_grids) * shard_patches` pixel rows; shard k's chunk holds its images
  (`shard_grids[k]` `[n_k, 3]`, of which `shard_used[k]` `[n_k]` tokens are spliced) then zeros."""
  unit = cfg.merge_unit
  if shard_patches % unit:
    raise ValueError(f"shard_patches={shard_patches} must be a multiple of merge_unit={unit}")
  grids = [np.asarray(g, np.int64).reshape(-1, 3) for g in shard_grids]
  shard_tokens, total = shard_patches // unit, len(grids) * (shard_patches // unit)
  counts = [int(np.prod(g, axis=-1).sum()) // unit for g in grids]
  if max(counts, default=0) > shard_tokens:
    raise ValueError(f"a shard has {max(counts) * unit} patches, more than shard_patches={shard_patches}")
  all_grids = np.concatenate(grids)
  if not len(all_grids):
    zeros = np.zeros(total * unit, np.int32)
    return VisionLayout(np.arange(total, dtype=np.int32), np.arange(total, dtype=np.int32), zeros, zeros,
                        np.zeros((total * unit, 2), np.int32))
  real = vision_layout(all_grids, cfg)
  cell = np.concatenate([k * shard_tokens + np.arange(n) for k, n in enumerate(counts)])  # token -> chunk cell
  window_index = np.concatenate([cell[real.window_index], np.setdiff1d(np.arange(total), cell)])
  tokens = np.prod(all_grids, axis=-1) // unit
  used = np.concatenate([np.asarray(u, np.int64) for u in shard_used])
  spliced = np.arange(tokens.sum()) - np.repeat(np.cumsum(tokens) - tokens, tokens) < np.repeat(used, tokens)
  slot = real.reverse_index  # window slot of each real token
  reverse_index = np.concatenate([slot[spliced], slot[~spliced], np.arange(len(slot), total)])
  pad = total * unit - len(real.window_segments)
  return VisionLayout(
      window_index=window_index.astype(np.int32),
      reverse_index=reverse_index.astype(np.int32),
      window_segments=np.pad(real.window_segments, (0, pad)),
      image_segments=np.pad(real.image_segments, (0, pad)),
      hw=np.pad(real.hw, ((0, pad), (0, 0))),
  )
