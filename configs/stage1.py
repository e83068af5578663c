"""Stage 1, connector alignment (spec §7.2): stage 2's recipe (configs/stage2.py) except next-token CE
with only the projector (PatchMerger; DiffusionVL-Qwen's mlp2x_gelu) training at lr 1e-3, global batch 128
without micro-batches, and no block-aligned EOS (AR objective). DiffusionVL-Qwen's square images come from
its stage-1 start (`dvl convert --lm ... --vision ...`)."""

import os

from dvl_jax.training.run_config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage2.py"))
  c.stage = "stage1"
  c.optimizer.learning_rate, c.optimizer.vision_learning_rate = 1e-3, None
  c.data.batch_size, c.data.micro_batches = 128, 1
  c.data.block_aligned_eos = False
  return c
