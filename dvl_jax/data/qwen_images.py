"""Qwen2.5-VL's host-side images (the `qwen2_5_vl` family's `data.image_inputs` hook): transformers' slow PIL
`Qwen2VLImageProcessor` with the checkpoint's pixel bounds (spec §2.1), `image_grid_thw` `[n, 3]` patch grids,
one token per merged patch, and the ViT's window layout."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dvl_jax.core.config import VisionConfig
from dvl_jax.core.vision_layout import VisionLayout, tokens_per_image, vision_layout
from dvl_jax.data.image_inputs import ImageInputs
from dvl_jax.data.processor import pixel_bounds


def image_processor(ckpt_dir: str, vision: VisionConfig, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> Any:
  from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

  min_pixels, max_pixels = pixel_bounds(ckpt_dir, min_pixels=min_pixels, max_pixels=max_pixels)
  return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision.patch_size,
                               temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)


def preprocess(processor: Any, images: Sequence[Any], vision: VisionConfig) -> ImageInputs:
  out = processor(images=list(images), return_tensors="np")
  grids = out["image_grid_thw"].astype(np.int64)
  return ImageInputs(out["pixel_values"].astype(np.float32), grids, tokens_per_image(grids, vision))


def layout(pixel_values: np.ndarray, image_grid_thw: Any, vision: VisionConfig, bucket: int
           ) -> tuple[np.ndarray, VisionLayout]:
  """Patch rows zero-padded to a multiple of `bucket` (a multiple of the merge unit), their window layout."""
  rows = -(-pixel_values.shape[0] // bucket) * bucket
  pixel_values = np.pad(pixel_values, ((0, rows - pixel_values.shape[0]), (0, 0)))
  return pixel_values, vision_layout(np.asarray(image_grid_thw), vision, pad_patches=rows)
