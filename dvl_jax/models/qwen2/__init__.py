"""Qwen2 / Qwen2.5 text-only language models as block-diffusion LMs: the shared decoder, no vision tower."""
