"""Qwen2.5-VL's position schemes: the ViT's 2-D RoPE and the decoder's 3-D M-RoPE index.

`get_rope_index` is host-side NumPy: it depends on where image tokens sit, which is data, not shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dvl_jax.models.rope import inv_frequencies


def vision_rope(hw: jax.Array, head_dim: int, theta: float = 10000.0,
                table_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[N, head_dim]` in fp32 for patch coordinates `hw` `[N, 2]` (row, col).

  `table_dtype` reproduces the DiffusionVL quirk where the angle table is built in the tower's
  dtype (bf16 in training, fp16 at eval; spec §2.3); HF Qwen2.5-VL keeps fp32.
  """
  rotary_dim = head_dim // 2
  inv = inv_frequencies(rotary_dim, theta, table_dtype)
  angles = hw.astype(table_dtype)[..., None] * inv  # [N, 2, rotary_dim/2]
  theta_hw = angles.reshape(hw.shape[0], -1)
  emb = jnp.concatenate([theta_hw, theta_hw], axis=-1)
  return jnp.cos(emb).astype(jnp.float32), jnp.sin(emb).astype(jnp.float32)


def get_rope_index(input_ids: np.ndarray, image_grid_thw: np.ndarray | None, attention_mask: np.ndarray | None,
                   *, image_token_id: int, vision_start_token_id: int, spatial_merge_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Qwen2.5-VL's 3-D M-RoPE positions `[3, B, L]` and per-row deltas `[B, 1]` (host, NumPy).

  Text tokens advance all three rows together; an image of merged grid `(t, h, w)` takes
  `(0, h_idx, w_idx) + offset`, and the text after it continues from the max position + 1.
  Images are counted by `vision_start` tokens followed by the image token, as in transformers.
  Padding (attention_mask 0) gets position 1 like transformers.
  """
  input_ids = np.asarray(input_ids)
  b, n = input_ids.shape
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if image_grid_thw is None:
    pos = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
    deltas = pos.max(axis=-1, keepdims=True) + 1 - n
    return np.broadcast_to(pos, (3, b, n)).copy(), deltas
  grids = np.asarray(image_grid_thw)
  positions = np.ones((3, b, n), dtype=np.int64)
  deltas = np.zeros((b, 1), dtype=np.int64)
  image_i = 0
  for row in range(b):
    tokens = input_ids[row][mask[row] == 1]
    starts = np.flatnonzero(tokens[:-1] == vision_start_token_id)
    n_images = int(np.sum(tokens[starts + 1] == image_token_id))
    pieces, st = [], 0
    for _ in range(n_images):
      ed = int(np.flatnonzero(tokens[st:] == image_token_id)[0]) + st
      t, h, w = (int(x) for x in grids[image_i])
      image_i += 1
      gh, gw = h // spatial_merge_size, w // spatial_merge_size
      base = pieces[-1].max() + 1 if pieces else 0
      pieces.append(np.broadcast_to(np.arange(ed - st), (3, ed - st)) + base)
      grid = np.stack(np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1)
      grid[0] = 0  # images have no time: transformers scales the frame index by 0 seconds per grid
      pieces.append(grid + (ed - st) + base)
      st = ed + t * gh * gw
    if st < len(tokens):
      base = pieces[-1].max() + 1 if pieces else 0
      pieces.append(np.broadcast_to(np.arange(len(tokens) - st), (3, len(tokens) - st)) + base)
    llm_pos = np.concatenate(pieces, axis=1)
    positions[:, row, mask[row] == 1] = llm_pos
    deltas[row, 0] = llm_pos.max() + 1 - n
  return positions, deltas
