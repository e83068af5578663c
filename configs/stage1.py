"""Stage 1, connector alignment (spec §7.2): next-token CE, only the projector (PatchMerger) trains,
lr 1e-3, cosine with 3% warmup, global batch 128, square images, no block-aligned EOS (AR objective)."""

from dvl_jax.train.run_config import default_config


def get_config():
  c = default_config()
  c.stage = "stage1"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.vision_learning_rate = None
  c.data.batch_size = 128
  c.data.micro_batches = 1
  c.data.block_aligned_eos = False
  return c
