"""Tiny random models, configs and checkpoints for tests, demos and notebooks (no downloads): `dvl.testing`."""

from dvl_jax.testing.tiny import (build_hf_model, converted_checkpoint, save_hf_checkpoint, save_tiny_checkpoint,
                                  tiny_config, tiny_model, tiny_text_config)

__all__ = ["build_hf_model", "converted_checkpoint", "save_hf_checkpoint", "save_tiny_checkpoint", "tiny_config",
           "tiny_model", "tiny_text_config"]
