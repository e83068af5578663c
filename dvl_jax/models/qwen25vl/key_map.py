"""Qwen2.5-VL / DiffusionVL-QwenVL checkpoints: Hub tensor names <-> params of `Qwen25VL`, and the layouts.

Every layout of spec §8 is reduced to the Hub names (`visual.*`, `model.*`, `lm_head.weight`) by prefix
renames, recognised by marker prefixes and checked in order (the more specific prefixes first).
"""

from __future__ import annotations

from dvl_jax.models.decoder_key_map import DECODER_RULES, MLP
from dvl_jax.models.key_map import Layout, Rule, Transform, linear, norm

RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", Transform.CONV3D_FLATTEN),
    *norm("visual.blocks.{i}.norm1", "visual.blocks.norm1"),
    *norm("visual.blocks.{i}.norm2", "visual.blocks.norm2"),
    *linear("visual.blocks.{i}.attn.qkv", "visual.blocks.attn.qkv"),
    *linear("visual.blocks.{i}.attn.proj", "visual.blocks.attn.proj"),
    *[r for p in MLP for r in linear(f"visual.blocks.{{i}}.mlp.{p}", f"visual.blocks.mlp.{p}")],
    *norm("visual.merger.ln_q", "visual.merger.ln_q"),
    *linear("visual.merger.mlp.0", "visual.merger.mlp_in"),
    *linear("visual.merger.mlp.2", "visual.merger.mlp_out"),
    *DECODER_RULES,
)

LAYOUTS = (
    Layout("transformers", (("model.visual.", "visual."), ("model.language_model.", "model.")),
           ("model.visual.", "model.language_model.")),
    Layout("diffusionvl", (("model.vision_tower.vision_tower.", "visual."),
                           ("model.mm_projector.merger.", "visual.merger.")),
           ("model.vision_tower.", "model.mm_projector.")),
    Layout("hub", (), ("visual.",)),
)

# DiffusionVL training output (spec §8.1): the tower and projector live in files of their own, unprefixed.
SIDE_FILES = {"vision_tower.safetensors": "visual.", "projector.safetensors": "visual.merger."}
SIDE_FILES_LAYOUT = "diffusionvl-train"
