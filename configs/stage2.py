"""Stage 2, diffusion finetuning (spec §7.1): BD3-LM loss, everything trainable, lr 1e-5 (vision
tower 2e-6), cosine with 3% warmup, weight decay 0, clip 1.0, global batch 256 as 8 micro-batches,
8192 tokens, bf16 compute with fp32 master weights, full remat, a checkpoint every 800 steps."""

from dvl_jax.train.run_config import default_config


def get_config():
  return default_config()
