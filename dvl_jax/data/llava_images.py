"""LLaVA-OneVision's host-side images as DiffusionVL-Qwen takes them (the `diffusionvl_qwen` family's
`data.image_inputs` hook): crops from transformers' processors (`llava_pixels`), `image_grid_thw` = the
images' (height, width) `[n, 2]` (transformers' `image_sizes`), the anyres packing (`anyres`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dvl_jax.data import llava_pixels
from dvl_jax.data.anyres import AnyresLayout, anyres_layout, image_token_counts
from dvl_jax.data.image_inputs import ImageInputs


def image_processor(ckpt_dir: str, vision: Any, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> Any:
  """The checkpoint's processor is its vision config's (`ckpt_dir` holds nothing more for it)."""
  if min_pixels is not None or max_pixels is not None:
    raise ValueError(f"min_pixels / max_pixels bound Qwen2.5-VL's image resize; this model takes {vision.image_size}"
                     f"-px crops ({vision.image_aspect_ratio}): leave them out")
  return llava_pixels.image_processor(vision)


def preprocess(processor: Any, images: Sequence[Any], vision: Any) -> ImageInputs:
  rows, sizes, crops = llava_pixels.pixel_rows(images, vision, processor)
  return ImageInputs(rows, sizes, image_token_counts(sizes.tolist(), vision, crops.tolist()))


def layout(pixel_values: np.ndarray, image_grid_thw: Any, vision: Any, bucket: int) -> tuple[np.ndarray, AnyresLayout]:
  """The rows as they are (the tower runs whole crops: a padded crop would cost a crop's forward) and the packing
  of images of (height, width) `image_grid_thw`; `bucket` is for patch-row towers."""
  del bucket
  return pixel_values, anyres_layout(np.asarray(image_grid_thw).reshape(-1, 2).tolist(), vision)
