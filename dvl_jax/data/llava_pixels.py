"""Pixels of the DiffusionVL-Qwen family: transformers' image processors set up as DiffusionVL's `process_images`.

Stage 2 (`anyres_max_n`): `LlavaOnevisionImageProcessor` with the model's pinpoints makes, per image, the global
resize then the best-fit grid's crops (resize keeping the aspect, black padding, row-major crops), as
LLaVA's `process_anyres_image` does; every image is processed on its own so that each one is patched
(transformers pads a multi-image sample to a square instead). Stage 1 (`square`): `SiglipImageProcessor`, a
plain bicubic resize. Both: x/255, mean = std = 0.5. The model takes the crops as patch rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from transformers import LlavaOnevisionImageProcessor, SiglipImageProcessor
from transformers.image_utils import PILImageResampling

from dvl_jax.data.anyres import crops_per_image
from dvl_jax.data.image_inputs import CHANNELS_LAST


def image_processor(vision: Any) -> Any:
  """The transformers processor that makes DiffusionVL's crops for this vision config."""
  s = vision.image_size
  common = dict(size={"height": s, "width": s}, resample=PILImageResampling.BICUBIC, image_mean=[0.5] * 3,
                image_std=[0.5] * 3, do_convert_rgb=True)
  if not vision.anyres:
    return SiglipImageProcessor(**common)
  return LlavaOnevisionImageProcessor(image_grid_pinpoints=[[r * s, c * s] for r, c in vision.grid_pinpoints],
                                      do_pad=True, **common)


def crops_to_patch_rows(crops: np.ndarray, patch_size: int) -> np.ndarray:
  """`[n, C, S, S]` crops -> `[n * g**2, C*p*p]` patch rows (`g = S // p`; like SigLIP's valid Conv2d, the last
  `S % p` pixels are dropped), patches row-major, each in Conv2d (C, y, x) order."""
  n, c, s, _ = crops.shape
  g = s // patch_size
  x = crops[:, :, :g * patch_size, :g * patch_size]
  x = x.reshape(n, c, g, patch_size, g, patch_size).transpose(0, 2, 4, 1, 3, 5)
  return np.ascontiguousarray(x.reshape(n * g * g, c * patch_size**2), dtype=np.float32)


def pixel_rows(images: Sequence[Any], vision: Any, processor: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PIL images -> (`pixel_values` patch rows `[N, C*p*p]` float32, `image_sizes` `[n, 2]` (height, width),
  crops per image `[n]`), the inputs of `anyres.anyres_layout` and the model; `processor` defaults to
  `image_processor(vision)`."""
  processor = image_processor(vision) if processor is None else processor
  crops, sizes, counts = [], [], []
  for image in images:
    out = processor(image, return_tensors="np", input_data_format=CHANNELS_LAST)
    hw = (image.height, image.width)
    n = crops_per_image(hw, vision)
    pixels = out["pixel_values"].reshape(-1, vision.in_channels, vision.image_size, vision.image_size)
    if pixels.shape[0] != n:
      raise ValueError(f"the image processor made {pixels.shape[0]} crops of a {hw} image; the layout expects {n}")
    crops.append(crops_to_patch_rows(pixels, vision.patch_size))
    sizes.append(hw)
    counts.append(n)
  return np.concatenate(crops), np.asarray(sizes, np.int64).reshape(-1, 2), np.asarray(counts, np.int64)
