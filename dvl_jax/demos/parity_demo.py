"""The README's main job until the training demo lands: build, convert, load, compare with PyTorch.

Builds a tiny random Qwen2.5-VL in PyTorch, saves it as a Hugging Face checkpoint, converts it with
`dvl.convert`, loads it with `dvl.load`, runs one forward on a text + image batch with the real
Qwen2.5-VL image processor and prints the logits agreement with `transformers` in both position modes.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def _inputs(cfg, rng: np.random.Generator):
  """Two prompts (one with an image, one text-only and right-padded) in HF token conventions."""
  from PIL import Image
  from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

  processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
  image = Image.fromarray(rng.integers(0, 255, (150, 230, 3), dtype=np.uint8))
  pixels = processor(images=[image], return_tensors="np")
  grid = pixels["image_grid_thw"]
  n_image_tokens = int(grid.prod() // cfg.vision.merge_unit)
  words = lambda n: list(rng.integers(3, cfg.image_token_id - 10, n))
  row0 = words(5) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image_tokens + [
      cfg.vision_end_token_id] + words(7)
  row1 = words(len(row0) - 6)
  ids = np.full((2, len(row0)), cfg.pad_token_id, np.int64)
  ids[0], ids[1, :len(row1)] = row0, row1
  mask = (np.arange(len(row0))[None] < np.array([[len(row0)], [len(row1)]])).astype(np.int64)
  return ids, mask, pixels["pixel_values"].astype(np.float32), grid


def run(workdir: str | None = None, seed: int = 0) -> dict[str, float]:
  """Runs the round trip and returns the max |logits difference| per position mode."""
  import jax
  import torch

  import dvl_jax as dvl
  from dvl_jax.testing.tiny import tiny_config
  from dvl_jax.testing.tiny import save_hf_checkpoint

  jax.config.update("jax_default_matmul_precision", "highest")
  cfg = tiny_config()
  workdir = workdir or tempfile.mkdtemp(prefix="dvl_demo_")
  hf_dir, dvl_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "dvl")
  print(f"1. building a tiny random Qwen2.5-VL in PyTorch -> {hf_dir}")
  hf_model = save_hf_checkpoint(hf_dir, cfg, seed=seed)
  print(f"2. converting with dvl.convert -> {dvl_dir}")
  t0 = time.perf_counter()
  dvl.convert(hf_dir, dvl_dir, overwrite=True)
  print(f"   converted in {time.perf_counter() - t0:.1f}s")
  model = dvl.load(dvl_dir)
  ids, mask, pixels, grid = _inputs(cfg, np.random.default_rng(seed))
  print(f"3. forward: batch {ids.shape}, one image of grid {grid.tolist()[0]} and one padded text row")
  rows = {}
  flat_pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  for mode, hf_kwargs in (("mrope", {}), ("flat", {"position_ids": torch.tensor(flat_pos)})):
    with torch.no_grad():
      ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid), **hf_kwargs).logits.numpy()
    t0 = time.perf_counter()
    ours = np.asarray(model(ids, pixel_values=pixels, image_grid_thw=grid, positions=mode, attention_mask=mask))
    rows[mode] = (float(np.abs(ours - ref)[mask == 1].max()), float(np.abs(ref).max()), time.perf_counter() - t0)
  print(f"\n{'positions':<10} {'max |Δ logits|':>15} {'max |logits|':>13} {'forward s':>10}")
  for mode, (diff, scale, secs) in rows.items():
    print(f"{mode:<10} {diff:>15.2e} {scale:>13.2f} {secs:>10.2f}")
  ok = all(diff <= 1e-4 for diff, _, _ in rows.values())
  print("\nJAX matches PyTorch (≤ 1e-4)" if ok else "\nMISMATCH: JAX differs from PyTorch by more than 1e-4")
  return {mode: diff for mode, (diff, _, _) in rows.items()}
