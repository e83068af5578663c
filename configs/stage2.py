"""Stage 2, diffusion finetuning (spec §7.1): BD3-LM loss with block-aligned EOS, everything trainable,
lr 1e-5 (vision tower 2e-6), cosine with 3% warmup, weight decay 0, clip 1.0, global batch 256 as 8
micro-batches, 8192 tokens, bf16 compute with fp32 master weights, full remat, a checkpoint every 800
steps, one epoch. The recipe is spelled out here, not left to the defaults. The same file is DiffusionVL-Qwen's
stage 2 (spec §7.2: "same table as §7.1"); its images follow the checkpoint's vision config (anyres_max_4), and
`square_pad` None lets each family pad as its recipe does (Qwen2.5-VL's `pad`; none for DiffusionVL-Qwen)."""

from dvl_jax.training.run_config import default_config


def get_config():
  c = default_config()
  c.stage, c.epochs, c.checkpoint_every = "stage2", 1, 800
  c.compute_dtype, c.remat_policy = "bfloat16", "full"
  c.optimizer.learning_rate, c.optimizer.vision_learning_rate, c.optimizer.projector_learning_rate = 1e-5, 2e-6, None
  c.optimizer.warmup_ratio, c.optimizer.weight_decay, c.optimizer.clip_norm = 0.03, 0.0, 1.0
  c.data.batch_size, c.data.micro_batches, c.data.max_length = 256, 8, 8192
  c.data.square_pad, c.data.block_aligned_eos, c.data.group_by_modality = None, True, True
  return c
