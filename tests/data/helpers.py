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


LLAVA_SIZES = [(44, 44), (120, 40), (30, 100), (90, 90), (60, 130), (130, 70), (20, 20), (100, 60)]  # (width, height)


def llava_rows(n: int) -> list[dict]:
  """Rows over the images `i.png` of `LLAVA_SIZES` (every aspect ratio; some rows with two images) and text-only
  rows, for the DiffusionVL-Qwen family's training data."""
  rows = []
  for i in range(n):
    if i % 5 == 4:
      rows.append(qa_row(f"t{i}", "Tell me more about it .", "It rolls ."))
      continue
    row = qa_row(f"r{i}", "What is this ?", "A big red ball ." if i % 2 else "A ball", f"{i % len(LLAVA_SIZES)}.png")
    if i % 3 == 2:
      row["image"] = [row["image"], f"{(i + 3) % len(LLAVA_SIZES)}.png"]
      row["conversations"][0]["value"] += " <image>"
    rows.append(row)
  return rows


def write_llava_dataset(root, n: int) -> str:
  """`llava_rows(n)` as `root/train.json` with its images next to it; returns the JSON's path."""
  import json
  import os

  for i, (w, h) in enumerate(LLAVA_SIZES):
    noise_image(w, h, seed=i).save(os.path.join(root, f"{i}.png"))
  path = os.path.join(root, "train.json")
  with open(path, "w") as f:
    json.dump(llava_rows(n), f)
  return path
