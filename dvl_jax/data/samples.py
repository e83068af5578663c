"""One LLaVA row -> the token ids, labels and pixels the model trains on (spec §2.1, §4.2–§4.6).

`shape()` gives a row's final length and image grids from its text and image headers alone, so the
whole data set can be bucketed (and every process can agree on batch shapes) before any pixel is
decoded; `encode()` produces the arrays through the same code path. What an image becomes (its grid,
tokens and pixel rows) is the model family's business (its `data.image_inputs` hook).

Deliberate deviation from the repo: a text-only row gets no dummy 56x56 image. The repo encodes one
only to keep every rank running the ViT and then discards its features (§4.6); it contributes no
token, so leaving it out changes nothing the model sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from dvl_jax.data.bad_rows import MALFORMED_CONVERSATION, UNREADABLE_IMAGE, BadRow
from dvl_jax.data.chat_template import conversation_messages
from dvl_jax.data.image_inputs import ImageShape
from dvl_jax.data.image_tokens import IMAGE_PLACEHOLDER, expand_image_placeholders
from dvl_jax.data.labels import IGNORE, StructuralTokens, tokenize_conversation
from dvl_jax.data.llava_json import Record, image_size, open_image
from dvl_jax.data.processor import IMAGE_MARKER, Processor


@dataclasses.dataclass(frozen=True)
class RowShape:
  """What batching needs to know about a row: `length` after image expansion, truncation and EOS
  padding (of which `eos_tokens` block-aligned EOS); `grids`, one `image_grid_thw` row per image (Qwen:
  (t, gh, gw); LLaVA: (height, width)); `used_tokens`, the tokens of each image that survive truncation
  (an image may be cut, spec §4.3.4); `image_rows`, the pixel rows of each image. Plain tuples:
  comparable, and light for an index of millions of rows."""

  length: int
  eos_tokens: int
  grids: tuple[tuple[int, ...], ...]
  used_tokens: tuple[int, ...]
  image_rows: tuple[int, ...]

  @property
  def patches(self) -> int:
    """Pixel rows of the row's images."""
    return sum(self.image_rows)


@dataclasses.dataclass(frozen=True)
class Sample:
  """`input_ids`, `labels` `[length]` (HF image-token convention, block-aligned EOS included),
  `pixel_values` `[patches, patch_dim]`, `shape` as predicted by `SampleEncoder.shape`."""

  input_ids: np.ndarray
  labels: np.ndarray
  pixel_values: np.ndarray
  shape: RowShape


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
  """LLaVA's `expand2square`: centre the image on a square canvas of its longer side."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), background)
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def patch_dim(config: Any) -> int:
  """Length of a pixel row; 0 for a text-only family (no vision tower: every row is text)."""
  return 0 if config.vision is None else config.vision.patch_dim


class SampleEncoder:
  """Conversation template, labels, image splicing, truncation and block-aligned EOS for one row.

  `square_pad` is the training-time `image_aspect_ratio=pad` (background `int(255 * image_mean)`,
  i.e. (122, 116, 104) for Qwen's processor); None is the family's default (its hook's
  `TRAINING_SQUARE_PAD`: Qwen2.5-VL pads, DiffusionVL-Qwen does not). `block_aligned_eos` appends
  `(bs - n % bs) % bs` EOS tokens labelled EOS after truncation to `max_length` (spec §4.5: BD3-LM
  training; off for AR training).
  """

  def __init__(self, processor: Processor, *, max_length: int = 8192, square_pad: bool | None = None,
               block_aligned_eos: bool = True, image_folder: str | None = None):
    cfg = processor.config
    if block_aligned_eos and max_length % cfg.block_size:
      raise ValueError(f"max_length={max_length} must be a multiple of block_size={cfg.block_size} "
                       "so that block-aligned EOS padding never overflows it")
    self.processor, self.config = processor, cfg
    takes_images = processor.image_processor is not None
    if square_pad is None:
      square_pad = takes_images and processor.images.TRAINING_SQUARE_PAD
    self.max_length, self.square_pad, self.block_aligned_eos = max_length, square_pad, block_aligned_eos
    self.image_folder = image_folder
    self.structural = StructuralTokens.from_tokenizer(processor.tokenizer)
    self.background = tuple(int(255 * m) for m in processor.image_processor.image_mean) if takes_images else ()

  @property
  def images(self) -> Any:
    """The family's image hook (a module: looked up, not held, so that the encoder pickles for grain workers)."""
    return self.processor.images

  def shape(self, record: Record) -> RowShape:
    """The row's shape from its text and image headers; raises `BadRow`."""
    ids, labels = self._text(record)
    return self._assemble(ids, labels, [self._image(*image_size(ref, self.image_folder)) for ref in record.images])[2]

  def encode(self, record: Record) -> Sample:
    """The row's arrays; raises `BadRow`."""
    ids, labels = self._text(record)
    images = [open_image(ref, self.image_folder) for ref in record.images]
    if self.square_pad:
      images = [expand_to_square(im, self.background) for im in images]
    shapes = [self._image(*im.size) for im in images]
    pixels = self._pixels(images, shapes)
    input_ids, labels, shape = self._assemble(ids, labels, shapes)
    return Sample(input_ids, labels, pixels, shape)

  def _text(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
    messages = conversation_messages(record.conversations, len(record.images))
    ids, labels = tokenize_conversation(messages, self._encode, self.structural)
    if (ids == self.config.image_token_id).any():
      raise BadRow(MALFORMED_CONVERSATION, "the text itself contains the image token")
    return ids, labels

  def _encode(self, text: str) -> np.ndarray:
    return self.processor.encode(text, text.count(IMAGE_MARKER))

  def _image(self, width: int, height: int) -> ImageShape:
    """What the family's image processor will make of an image of this size (after square padding)."""
    if self.square_pad:
      width = height = max(width, height)
    try:
      return self.images.image_shape(self.processor.image_processor, width, height, self.config.vision)
    except ValueError as e:
      raise BadRow(UNREADABLE_IMAGE, str(e)) from None

  def _pixels(self, images: list[Image.Image], shapes: list[ImageShape]) -> np.ndarray:
    """The images' pixel rows; the processor must make what `shapes` predicted (the batch plan relies on it)."""
    if not images:
      return np.zeros((0, patch_dim(self.config)), np.float32)
    try:
      out = self.images.preprocess(self.processor.image_processor, images, self.config.vision)
    except (ValueError, OSError) as e:
      raise BadRow(UNREADABLE_IMAGE, f"image processor: {e}") from None
    predicted = [s.grid for s in shapes], sum(s.rows for s in shapes), [s.tokens for s in shapes]
    if ([tuple(g) for g in out.image_grid_thw.tolist()], len(out.pixel_values), out.tokens.tolist()) != predicted:
      raise BadRow(UNREADABLE_IMAGE, "the image processor's output differs from what its size predicted")
    return out.pixel_values

  def _assemble(self, ids: np.ndarray, labels: np.ndarray, shapes: list[ImageShape]
                ) -> tuple[np.ndarray, np.ndarray, RowShape]:
    """Expand placeholders, truncate to `max_length`, append block-aligned EOS."""
    cfg = self.config
    tokens = np.array([s.tokens for s in shapes], np.int64)
    starts = np.flatnonzero(ids == IMAGE_PLACEHOLDER) + np.cumsum(tokens - 1) - (tokens - 1)
    counts = np.stack([tokens, np.ones_like(tokens), np.ones_like(tokens)], -1)  # one token per "patch"
    input_ids = expand_image_placeholders(ids, counts, image_token_id=cfg.image_token_id, merge_unit=1)
    labels = expand_image_placeholders(np.where(ids == IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER, labels), counts,
                                       image_token_id=IGNORE, merge_unit=1)
    input_ids, labels = input_ids[:self.max_length], labels[:self.max_length]
    pad = (-len(input_ids)) % cfg.block_size if self.block_aligned_eos else 0
    eos = np.full(pad, cfg.eos_token_id, np.int64)
    input_ids, labels = np.concatenate([input_ids, eos]), np.concatenate([labels, eos])
    used = np.clip(self.max_length - starts, 0, tokens)
    return input_ids, labels, RowShape(len(input_ids), pad, tuple(tuple(int(x) for x in s.grid) for s in shapes),
                                       tuple(used.tolist()), tuple(int(s.rows) for s in shapes))
