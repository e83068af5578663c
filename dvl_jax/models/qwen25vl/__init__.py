"""Qwen2.5-VL (and DiffusionVL-QwenVL): the ViT with PatchMerger, the Qwen2.5 decoder, their checkpoint key map."""
