"""LLaVA-OneVision's host-side images as DiffusionVL-Qwen takes them (the `diffusionvl_qwen` family's
`data.image_inputs` hook): crops from transformers' processors (`llava_pixels`), `image_grid_thw` = the
images' (height, width) `[n, 2]` (transformers' `image_sizes`), the anyres packing (`anyres`).

Training takes the images as the vision config says (stage 1 `square`: one plain resize; stage 2
`anyres_max_n`: the global view and the best-fit crops), so it pads nothing to a square by default."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dvl_jax.data import llava_pixels
from dvl_jax.data.anyres import (AnyresLayout, anyres_layout, crops_per_image, image_token_counts,
                                 sharded_anyres_layout)
from dvl_jax.data.image_inputs import ImageInputs, ImageShape

TRAINING_SQUARE_PAD = False  # DiffusionVL-Qwen's stages use `square` / `anyres_max_4`, not `pad` (spec §7.2)
sharded_layout = sharded_anyres_layout  # a training batch's packing, per-shard chunks of crops


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


def image_shape(processor: Any, width: int, height: int, vision: Any) -> ImageShape:
  """(height, width), the tokens of its packing and its crops' patch rows; the processor's output size is fixed."""
  del processor
  if width < 1 or height < 1:
    raise ValueError(f"an image of {width}x{height} pixels is empty")
  hw = (height, width)
  return ImageShape(hw, int(image_token_counts([hw], vision)[0]), crops_per_image(hw, vision) * vision.tokens_per_crop)


def counts(image_grid_thw: Any, vision: Any) -> tuple[np.ndarray, int]:
  """Image tokens per image `[n]` and the pixel rows (crops' patches) of images of these (height, width)."""
  sizes = np.asarray(image_grid_thw).reshape(-1, 2).tolist()
  return image_token_counts(sizes, vision), sum(crops_per_image(hw, vision) * vision.tokens_per_crop for hw in sizes)


def size_bounds(processor: Any) -> None:
  """Crops have the vision config's size: nothing to record."""
  del processor


def layout(pixel_values: np.ndarray, image_grid_thw: Any, vision: Any, bucket: int, *, few_shapes: bool = False
           ) -> tuple[np.ndarray, AnyresLayout]:
  """The rows as they are (the tower runs whole crops: a padded crop would cost a crop's forward) and the packing
  of images of (height, width) `image_grid_thw`; `bucket` and `few_shapes` are for patch-row towers."""
  del bucket, few_shapes
  return pixel_values, anyres_layout(np.asarray(image_grid_thw).reshape(-1, 2).tolist(), vision)
