"""Image placeholders: the LLaVA convention (one `-200` per image, spec §4.3) -> the HF convention.

The model takes HF-style ids where each image is its image-token id repeated once per merged patch;
DiffusionVL's data and prompts carry a single placeholder per image, expanded here on the host.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX


def expand_image_placeholders(input_ids: Sequence[int], grid_thw: np.ndarray | None, *, image_token_id: int,
                              merge_unit: int = 4, placeholder: int = IMAGE_PLACEHOLDER) -> np.ndarray:
  """Replaces the i-th `placeholder` by `image_token_id` repeated `t*h*w / merge_unit` times for image i."""
  ids = np.asarray(input_ids, dtype=np.int64)
  where = np.flatnonzero(ids == placeholder)
  grids = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64).reshape(-1, 3)
  if len(where) != len(grids):
    raise ValueError(f"{len(where)} image placeholders but {len(grids)} images (image_grid_thw rows); "
                     "give one image per placeholder")
  pieces, start = [], 0
  for pos, grid in zip(where, grids):
    pieces += [ids[start:pos], np.full(int(grid.prod()) // merge_unit, image_token_id, np.int64)]
    start = pos + 1
  pieces.append(ids[start:])
  return np.concatenate(pieces)
