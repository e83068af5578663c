"""The one host-side image hook of a model family: images -> model inputs, image metadata -> layout.

`dvl.Processor`, `Prompts.bucketed` (so `dvl.generate` and the server) and the training data pipeline
(`data.samples`, `data.host_batch`) reach a family's image handling only through this: each family's registry
entry (`models.families.Family.images`) names a module with the members below, so the callers never know
whether an image is Qwen's grid of patches or LLaVA's crops.

* `image_processor(ckpt_dir, vision, *, min_pixels=None, max_pixels=None)`: the transformers image processor
  of a converted checkpoint (bounds: the caller's overrides, `None` = the checkpoint's).
* `preprocess(processor, images, vision) -> ImageInputs`.
* `layout(pixel_values, image_grid_thw, vision, bucket, *, few_shapes=False) -> (pixel_values, layout)`: the rows
  padded where the tower allows (by `bucket` rows) and the precomputed layout the model's `image_features` takes;
  `few_shapes` (the server, where a compile stalls every request): as few distinct shapes as the tower allows.
* `image_shape(processor, width, height, vision) -> ImageShape`: what `preprocess` makes of an image of that
  size, known from its header alone (training batches are planned before any pixel is decoded).
* `sharded_layout(shard_grids, shard_used, shard_rows, vision)`: the layout of a training batch whose pixel rows
  are K zero-padded chunks of `shard_rows` rows, chunk k holding the images `shard_grids[k]` (`image_grid_thw`
  rows) of batch shard k, of which the first `shard_used[k]` tokens each are spliced (truncation may cut an
  image); its size depends on `shard_rows` and K only (static shapes).
* `counts(image_grid_thw, vision) -> (tokens per image, pixel rows)`: what a prompt's image tokens and
  `pixel_values` must add up to for these images (`Prompts.bucketed` checks inputs built by hand against it).
* `size_bounds(processor) -> (min_pixels, max_pixels) | None`: the image-size bounds a trained model records
  with its weights (`checkpoints.saving`), None if the family's images have a fixed size.
* `TRAINING_SQUARE_PAD`: whether training pads images to a square first by default (`DataConfig.square_pad`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


# The hooks take PIL images, which transformers turns into [height, width, channels] arrays; told so, it does not
# guess the channel axis from the shape (it took an image 1 or 3 pixels tall for channels-first: a 60x3 image came
# out as a 3x60 one, a 60x1 one failed).
CHANNELS_LAST = "channels_last"


class ImageInputs(NamedTuple):
  """One batch of images as the model takes them."""

  pixel_values: np.ndarray  # [N_rows, patch_dim] float32
  image_grid_thw: np.ndarray  # [n_images, k] what the layout is built from (Qwen: (t, h, w) patches; LLaVA: (h, w) px)
  tokens: np.ndarray  # [n_images] image tokens each image's `<image>` marker becomes


class ImageShape(NamedTuple):
  """What one image becomes, before its pixels are read."""

  grid: tuple[int, ...]  # its `image_grid_thw` row
  tokens: int  # image tokens its `<image>` marker becomes
  rows: int  # pixel rows (`pixel_values`) it takes
