"""`dvl.Processor`: prompts with `<image>` markers + images -> padded model inputs.

Tokenizer and image processor are transformers' own (never re-implemented); the image processor and the
token count of each image are the model family's (its `data.image_inputs` hook: Qwen2.5-VL's slow PIL
`Qwen2VLImageProcessor` with the checkpoint's pixel bounds, spec §2.1, see `pixel_bounds`; DiffusionVL-Qwen's
anyres crops). Prompts use the LLaVA convention of one `<image>` per image; each marker becomes the image-token
id repeated once per image token (the HF convention the model takes), exactly as the repo's
`tokenizer_image_token` splits and joins text chunks around `-200` (spec §9.2).
"""

from __future__ import annotations

import json
import os
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from dvl_jax.core import storage
from dvl_jax.core.config import ModelConfig
from dvl_jax.data.image_tokens import IMAGE_PLACEHOLDER, expand_image_placeholders

IMAGE_MARKER = "<image>"
MIN_PIXELS, MAX_PIXELS = 384 * 384, 512 * 512  # DiffusionVL's ModelArguments defaults
SOURCE_CONFIG = "hf_config.json"  # the source's config.json, kept by `dvl convert` (to_orbax.HF_CONFIG_COPY)
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # a HF image processor's settings, copied by `dvl convert`
QWEN_STOCK_PIXELS = (56 * 56, 28 * 28 * 16384)  # the Hub Qwen2.5-VL preprocessor_config.json's min/max pixels


class Processor:
  """Tokenizes prompts, preprocesses images and pads a batch (right padding, pad id from the config)."""

  def __init__(self, tokenizer: Any, image_processor: Any, config: ModelConfig):
    self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config

  @property
  def images(self) -> ModuleType:
    """The family's image hook (`data.image_inputs`)."""
    return _family(self.config).host_images

  @classmethod
  def from_pretrained(cls, ckpt_dir: str, *, min_pixels: int | None = None, max_pixels: int | None = None
                      ) -> "Processor":
    """Loads the tokenizer files `dvl convert` copied next to the params, the model config and its family's
    image processor (none for a text-only family; Qwen2.5-VL's with the checkpoint's `pixel_bounds`, an
    argument overriding its bound); `ckpt_dir` may be a `gs://` URL (its side files are cached locally)."""
    from transformers import PreTrainedTokenizerFast

    ckpt_dir = storage.local_side_files(ckpt_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")):
      raise FileNotFoundError(f"{ckpt_dir} has no tokenizer.json; convert a checkpoint that ships its tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt_dir)
    config = ModelConfig.load(os.path.join(ckpt_dir, "config.json"))
    family = _family(config)
    image_processor = None if not family.images else family.host_images.image_processor(
        ckpt_dir, config.vision, min_pixels=min_pixels, max_pixels=max_pixels)
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
    """Images -> `pixel_values` `[N_rows, patch_dim]` float32 and `image_grid_thw` `[N_images, k]`."""
    return self.images.preprocess(self.image_processor, images, self.config.vision)[:2]

  def __call__(self, prompts: str | Sequence[str], images: Sequence[Sequence[Any]] | None = None,
               *, pad_to: int | None = None) -> dict[str, np.ndarray | None]:
    """Batch of prompts (and per-prompt image lists) -> `input_ids`/`attention_mask` `[B, L]`,
    `pixel_values` `[N_rows, patch_dim]`, `image_grid_thw` `[N_images, k]` (None without images): what
    `dvl.generate` takes (it builds the family's layout from `image_grid_thw`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    images = [[] for _ in prompts] if images is None else [_pil_images(x, i) for i, x in enumerate(images)]
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
    flat_images = [im for row in images for im in row]
    pixels = grids = None
    tokens = np.zeros(0, np.int64)
    if flat_images:
      pixels, grids, tokens = self.images.preprocess(self.image_processor, flat_images, self.config.vision)
    rows, start = [], 0
    for prompt, row_images in zip(prompts, images):
      # one (count, 1, 1) "grid" per image with merge unit 1: each marker becomes `count` image tokens
      counts = tokens[start:start + len(row_images)]
      start += len(row_images)
      rows.append(expand_image_placeholders(self.encode(prompt, len(row_images)),
                                            np.stack([counts, np.ones_like(counts), np.ones_like(counts)], -1),
                                            image_token_id=self.config.image_token_id, merge_unit=1))
    length = max(len(r) for r in rows) if pad_to is None else pad_to
    if any(len(r) > length for r in rows):
      raise ValueError(f"a prompt has {max(len(r) for r in rows)} tokens, more than pad_to={length}")
    input_ids = np.full((len(rows), length), self.config.pad_token_id, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
      input_ids[i, :len(r)], attention_mask[i, :len(r)] = r, 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels,
            "image_grid_thw": grids}


def _pil_images(row: Any, index: int) -> list[Any]:
  """One prompt's images as PIL images: `[height, width, 3]` uint8 arrays are converted; anything else (a file
  path, an image not wrapped in its prompt's list) is refused with what to pass instead."""
  from PIL import Image

  if not isinstance(row, (list, tuple)):
    raise TypeError(f"images hold one list per prompt (e.g. [[image]]: one prompt, one image); entry {index} is a "
                    f"{type(row).__name__}")
  out = []
  for image in row:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
      image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
      raise TypeError(f"an image must be a PIL image or a [height, width, 3] uint8 array (open files with "
                      f"PIL.Image.open), got {type(image).__name__} {getattr(image, 'shape', '')}".rstrip())
    out.append(image)
  return out


def _family(config: ModelConfig) -> Any:
  """The config's `models.families.Family`: the registry is a layer above this one, so it is looked up late."""
  from dvl_jax.models import families

  return families.get(config.family)


def pixel_bounds(ckpt_dir: str, *, min_pixels: int | None = None, max_pixels: int | None = None
                 ) -> tuple[int, int]:
  """`(min_pixels, max_pixels)` for images of the local checkpoint `ckpt_dir`; each bound comes from the
  first of these that names it:

  1. the arguments;
  2. `hf_config.json`'s top-level `min_pixels` / `max_pixels`: DiffusionVL's training writes them into its
     `config.json` (kept under this name by `dvl convert`), and its evaluation passes them over the image
     processor's own (spec §2.1, §9.1), so they win over 3.;
  3. `preprocessor_config.json` (copied by `dvl convert`): `min_pixels` / `max_pixels`, else newer
     transformers' `size: {shortest_edge, longest_edge}`; but not Qwen2.5-VL's stock 3136 / 12845056,
     which DiffusionVL always replaces by 4. (a checkpoint converted from the Hub, or trained from one,
     carries that file);
  4. DiffusionVL's defaults `MIN_PIXELS` / `MAX_PIXELS`.

  A dvl `config.json` cannot hold bounds (it is a `ModelConfig`), so it is not read here.
  """
  sources = [("the arguments", {"min_pixels": min_pixels, "max_pixels": max_pixels}),
             (SOURCE_CONFIG, _read_json(os.path.join(ckpt_dir, SOURCE_CONFIG))),
             (PREPROCESSOR_CONFIG, _preprocessor_bounds(os.path.join(ckpt_dir, PREPROCESSOR_CONFIG))),
             ("DiffusionVL's defaults", {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})]
  (low, low_from), (high, high_from) = (
      next((named[key], name) for name, named in sources if named.get(key) is not None)
      for key in ("min_pixels", "max_pixels"))
  for key, value, where in (("min_pixels", low, low_from), ("max_pixels", high, high_from)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{key} from {where} must be a positive integer, got {value!r}")
  if low > high:
    raise ValueError(f"min_pixels={low} (from {low_from}) is above max_pixels={high} (from {high_from})")
  return low, high


def _preprocessor_bounds(path: str) -> dict[str, Any]:
  """The bounds a HF `preprocessor_config.json` sets, `{}` for none or for Qwen2.5-VL's stock ones."""
  saved = _read_json(path)
  size = saved.get("size") if isinstance(saved.get("size"), dict) else {}
  bounds = {key: size.get(edge) if saved.get(key) is None else saved[key]
            for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge"))}
  return {} if (bounds["min_pixels"], bounds["max_pixels"]) == QWEN_STOCK_PIXELS else bounds


def _read_json(path: str) -> dict[str, Any]:
  """A JSON object file, `{}` if there is none."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path} does not hold a JSON object")
  return saved
