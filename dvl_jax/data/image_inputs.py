"""The one host-side image hook of a model family: images -> model inputs, image metadata -> layout.

`dvl.Processor`, `Prompts.bucketed` (so `dvl.generate` and the server) reach a family's image handling only
through this: each family's registry entry (`models.families.Family.images`) names a module with the three
functions below, so the callers never know whether an image is Qwen's grid of patches or LLaVA's crops.

* `image_processor(ckpt_dir, vision, *, min_pixels=None, max_pixels=None)`: the transformers image processor
  of a converted checkpoint (bounds: the caller's overrides, `None` = the checkpoint's).
* `preprocess(processor, images, vision) -> ImageInputs`.
* `layout(pixel_values, image_grid_thw, vision, bucket) -> (pixel_values, layout)`: the rows padded where the
  tower allows (to a multiple of `bucket` rows) and the precomputed layout the model's `image_features` takes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ImageInputs(NamedTuple):
  """One batch of images as the model takes them."""

  pixel_values: np.ndarray  # [N_rows, patch_dim] float32
  image_grid_thw: np.ndarray  # [n_images, k] what the layout is built from (Qwen: (t, h, w) patches; LLaVA: (h, w) px)
  tokens: np.ndarray  # [n_images] image tokens each image's `<image>` marker becomes
