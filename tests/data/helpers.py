"""Helpers of the data tests: a word-level ChatML tokenizer built here, a small-image processor, rows."""

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from dvl_jax.testing.tiny import tiny_config
from dvl_jax.data import synthetic
from dvl_jax.data.processor import Processor
from dvl_jax.data.word_tokenizer import word_tokenizer

CORPUS = [*synthetic.corpus(), "What is this ? A big red ball . Tell me more about it . It rolls ."]


def make_processor(**config_overrides) -> Processor:
  """Tiny config (pad 0, EOS 2, image token 250, block 8) with images of 56^2..112^2 pixels."""
  cfg = tiny_config(**config_overrides)
  return Processor(word_tokenizer(CORPUS, cfg), Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                   cfg)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def qa_row(row_id: str, question: str, answer: str, image=None) -> dict:
  """A single-turn LLaVA row; with an image the question gets an `<image>` marker after it."""
  row = {"id": row_id, "conversations": [
      {"from": "human", "value": f"{question}\n<image>" if image is not None else question},
      {"from": "gpt", "value": answer}]}
  if image is not None:
    row["image"] = image
  return row


def make_llava_processor(stage: int = 2) -> Processor:
  """The tiny DiffusionVL-Qwen family's processor: stage 1's square crops (flat, no newline) or stage 2's anyres."""
  import dataclasses

  from dvl_jax.data.llava_pixels import image_processor
  from dvl_jax.testing.tiny import tiny_siglip_config

  cfg = tiny_siglip_config()
  if stage == 1:
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_aspect_ratio="square", patch_merge_type="flat"))
  return Processor(word_tokenizer(CORPUS, cfg), image_processor(cfg.vision), cfg)
