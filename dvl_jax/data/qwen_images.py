"""Qwen2.5-VL's host-side images (the `qwen2_5_vl` family's `data.image_inputs` hook): transformers' slow PIL
`Qwen2VLImageProcessor` with the checkpoint's pixel bounds (spec §2.1), `image_grid_thw` `[n, 3]` patch grids,
one token per merged patch, and the ViT's window layout."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from dvl_jax.core.config import VisionConfig
from dvl_jax.core.vision_layout import VisionLayout, aligned_chunks, patch_rows, tokens_per_image, vision_layout
from dvl_jax.data.image_inputs import CHANNELS_LAST, ImageInputs, ImageShape
from dvl_jax.data.processor import pixel_bounds
from dvl_jax.data.sharded_layout import sharded_vision_layout

TRAINING_SQUARE_PAD = True  # DiffusionVL-QwenVL trains with `image_aspect_ratio pad` (spec §7.1)
sharded_layout = sharded_vision_layout  # a training batch's window layout, per-shard chunks


def image_processor(ckpt_dir: str, vision: VisionConfig, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> Any:
  from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

  min_pixels, max_pixels = pixel_bounds(ckpt_dir, min_pixels=min_pixels, max_pixels=max_pixels)
  return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision.patch_size,
                               temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)


def preprocess(processor: Any, images: Sequence[Any], vision: VisionConfig) -> ImageInputs:
  out = processor(images=list(images), return_tensors="np", input_data_format=CHANNELS_LAST)
  grids = out["image_grid_thw"].astype(np.int64)
  return ImageInputs(out["pixel_values"].astype(np.float32), grids, tokens_per_image(grids, vision))


def image_shape(processor: Any, width: int, height: int, vision: VisionConfig) -> ImageShape:
  """The `(1, gh, gw)` patch grid `smart_resize` gives (ValueError for an image it refuses)."""
  h, w = smart_resize(height, width, factor=processor.patch_size * processor.merge_size,
                      min_pixels=processor.size["shortest_edge"], max_pixels=processor.size["longest_edge"])
  gh, gw = h // processor.patch_size, w // processor.patch_size
  return ImageShape((1, gh, gw), gh * gw // vision.merge_unit, gh * gw)


def counts(image_grid_thw: Any, vision: VisionConfig) -> tuple[np.ndarray, int]:
  """Image tokens per image `[n]` and the pixel rows of these `(t, gh, gw)` grids."""
  grids = np.asarray(image_grid_thw).reshape(-1, 3)
  return tokens_per_image(grids, vision), int(np.prod(grids, axis=-1).sum())


def size_bounds(processor: Any) -> tuple[int, int]:
  return processor.min_pixels, processor.max_pixels


def layout(pixel_values: np.ndarray, image_grid_thw: Any, vision: VisionConfig, bucket: int, *,
           few_shapes: bool = False) -> tuple[np.ndarray, VisionLayout]:
  """Patch rows zero-padded to `patch_rows(n, bucket, merge unit)`, their window layout in the most equal
  chunks no image crosses (`aligned_chunks`): the tower attends inside each chunk, so a batch of small images
  costs their own attention, not that of all the rows at once. `few_shapes`: whole buckets in one chunk, so
  images of any size up to a bucket share one compile."""
  grid, n = np.asarray(image_grid_thw), pixel_values.shape[0]
  rows = -(-n // bucket) * bucket if few_shapes else patch_rows(n, bucket, vision.merge_unit)
  if rows > n:
    pixel_values = np.concatenate([pixel_values, np.zeros((rows - n, pixel_values.shape[1]), pixel_values.dtype)])
  window_layout = vision_layout(grid, vision, pad_patches=rows)
  return pixel_values, window_layout.replace(chunks=1 if few_shapes else aligned_chunks(grid, rows, vision.merge_unit))
