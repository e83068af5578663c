"""`dvl.Processor`: prompts with `<image>` markers + images -> padded model inputs.

Tokenizer and image processor are transformers' own (never re-implemented): the slow PIL
`Qwen2VLImageProcessor` with DiffusionVL's pixel bounds (spec §2.1). Prompts use the LLaVA convention
of one `<image>` per image; each marker becomes the image-token id repeated once per merged patch
(the HF convention the model takes), exactly as the repo's `tokenizer_image_token` splits and joins
text chunks around `-200` (spec §9.2).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from dvl_jax.core import storage
from dvl_jax.core.config import ModelConfig
from dvl_jax.data.image_tokens import IMAGE_PLACEHOLDER, expand_image_placeholders

IMAGE_MARKER = "<image>"
MIN_PIXELS, MAX_PIXELS = 384 * 384, 512 * 512  # DiffusionVL's ModelArguments defaults


class Processor:
  """Tokenizes prompts, preprocesses images and pads a batch (right padding, pad id from the config)."""

  def __init__(self, tokenizer: Any, image_processor: Any, config: ModelConfig):
    self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config

  @classmethod
  def from_pretrained(cls, ckpt_dir: str, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
                      ) -> "Processor":
    """Loads the tokenizer files `dvl convert` copied next to the params, and the model config;
    `ckpt_dir` may be a `gs://` URL (its side files are cached locally)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    ckpt_dir = storage.local_side_files(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")):
      raise FileNotFoundError(f"{ckpt_dir} has no tokenizer.json; convert a checkpoint that ships its tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt_dir)
    config = ModelConfig.load(os.path.join(ckpt_dir, "config.json"))
    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=config.vision.patch_size,
        temporal_patch_size=config.vision.temporal_patch_size, merge_size=config.vision.spatial_merge_size)
    return cls(tokenizer, image_processor, config)

  def encode(self, prompt: str, num_images: int) -> np.ndarray:
    """Token ids with one `IMAGE_PLACEHOLDER` per `<image>` (chunks tokenized separately)."""
    chunks = prompt.split(IMAGE_MARKER)
    if len(chunks) - 1 != num_images:
      raise ValueError(f"prompt has {len(chunks) - 1} {IMAGE_MARKER} markers but {num_images} images were given")
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
      if i:
        ids.append(IMAGE_PLACEHOLDER)
      ids += self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, np.int64)

  def preprocess_images(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Images -> `pixel_values` `[N_patches, patch_dim]` float32 and `image_grid_thw` `[N_images, 3]`."""
    out = self.image_processor(images=list(images), return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)

  def __call__(self, prompts: str | Sequence[str], images: Sequence[Sequence[Any]] | None = None,
               *, pad_to: int | None = None) -> dict[str, np.ndarray | None]:
    """Batch of prompts (and per-prompt image lists) -> `input_ids`/`attention_mask` `[B, L]`,
    `pixel_values` `[N_patches, patch_dim]`, `image_grid_thw` `[N_images, 3]` (None without images)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    images = [[] for _ in prompts] if images is None else [list(x) for x in images]
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
    flat_images = [im for row in images for im in row]
    pixels = grids = None
    if flat_images:
      pixels, grids = self.preprocess_images(flat_images)
    rows, start = [], 0
    for prompt, row_images in zip(prompts, images):
      row_grids = None if grids is None else grids[start:start + len(row_images)]
      start += len(row_images)
      rows.append(expand_image_placeholders(self.encode(prompt, len(row_images)), row_grids,
                                            image_token_id=self.config.image_token_id,
                                            merge_unit=self.config.vision.merge_unit))
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    if any(len(r) > length for r in rows):
      raise ValueError(f"a prompt has {max(len(r) for r in rows)} tokens, more than pad_to={length}")
    input_ids = np.full((len(rows), length), self.config.pad_token_id, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
      input_ids[i, :len(r)], attention_mask[i, :len(r)] = r, 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels,
            "image_grid_thw": grids}
