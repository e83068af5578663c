"""DiffusionVL-Qwen (and LLaVA-OneVision): SigLIP tower, `mlp2x_gelu` projector, anyres packing, Qwen2.5 decoder."""
