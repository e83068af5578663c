"""DiffusionVL-Qwen / LLaVA-OneVision checkpoints: Hub tensor names <-> params of `DiffusionVLQwen`, layouts.

The Hub names are transformers' in-memory names of `LlavaOnevisionForConditionalGeneration` (what `dvl export`
writes and `from_pretrained` loads as is); `save_pretrained`'s llava-hf names and the released DiffusionVL
LLaVA names (`model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.{0,2}.*`,
`model.image_newline`, `model.layers.*`, `lm_head`) are reduced to them by prefix renames.
"""

from __future__ import annotations

from dvl_jax.models.decoder_key_map import DECODER_RULES
from dvl_jax.models.key_map import LM_HEAD, Layout, Rule, Transform, linear

TOWER = "model.vision_tower.vision_model."
LM = "model.language_model."


def _layer_norm(hub: str, param: str) -> list[Rule]:
  return [Rule(f"{hub}.weight", f"{param}.scale", Transform.IDENTITY),
          Rule(f"{hub}.bias", f"{param}.bias", Transform.IDENTITY)]


def _language(rule: Rule) -> Rule:
  """The decoder's `model.*` names under transformers' `model.language_model.*`."""
  return rule if rule.hub == LM_HEAD else Rule(LM + rule.hub[len("model."):], rule.param, rule.transform)


RULES: tuple[Rule, ...] = (
    Rule(TOWER + "embeddings.patch_embedding.weight", "vision_tower.patch_embed.kernel", Transform.CONV2D_FLATTEN),
    Rule(TOWER + "embeddings.patch_embedding.bias", "vision_tower.patch_embed.bias", Transform.IDENTITY),
    Rule(TOWER + "embeddings.position_embedding.weight", "vision_tower.position_embedding", Transform.IDENTITY),
    *_layer_norm(TOWER + "encoder.layers.{i}.layer_norm1", "vision_tower.layers.layer_norm1"),
    *_layer_norm(TOWER + "encoder.layers.{i}.layer_norm2", "vision_tower.layers.layer_norm2"),
    *[r for p in ("q_proj", "k_proj", "v_proj", "out_proj")
      for r in linear(TOWER + f"encoder.layers.{{i}}.self_attn.{p}", f"vision_tower.layers.{p}")],
    *[r for p in ("fc1", "fc2") for r in linear(TOWER + f"encoder.layers.{{i}}.mlp.{p}", f"vision_tower.layers.{p}")],
    *_layer_norm(TOWER + "post_layernorm", "vision_tower.post_layernorm"),
    *linear("model.multi_modal_projector.linear_1", "projector.linear_1"),
    *linear("model.multi_modal_projector.linear_2", "projector.linear_2"),
    Rule("model.image_newline", "image_newline", Transform.IDENTITY),
    *(_language(r) for r in DECODER_RULES),
)

LAYOUTS = (
    Layout("diffusionvl", (("model.vision_tower.vision_tower.", "model.vision_tower."),
                           ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                           ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
                           ("model.image_newline", "model.image_newline"),
                           ("model.", LM)),
           ("model.vision_tower.vision_tower.", "model.mm_projector.")),
    Layout("transformers", (), (TOWER, LM)),
    Layout("hub", (("language_model.model.", LM), ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                   ("image_newline", "model.image_newline")),
           ("language_model.model.", "vision_tower.vision_model.")),
)

SIDE_FILES: dict[str, str] = {}
SIDE_FILES_LAYOUT = ""

# Stage 1 starts from two checkpoints (spec §7.2): a Qwen2 LM (`model.*`, `lm_head.weight`) and SigLIP
# (`vision_model.*`; a full SigLIP also holds `text_model.*` and its logit scale / bias). DiffusionVL keeps the
# vision tower without its last layer and its pooling head; the projector and `image_newline` are new.
STAGE1_LM = Layout("qwen2 LM", (("model.", LM),), ("model.",))
STAGE1_VISION = Layout("siglip", (("vision_model.", "model.vision_tower.vision_model."),), ("vision_model.",))
STAGE1_UNUSED = ("text_model.", "logit_scale", "logit_bias", "vision_model.head.")


def stage1_removed_layer(depth: int) -> str:
  """The prefix of the SigLIP layer DiffusionVL deletes (the last of `depth + 1`)."""
  return f"vision_model.encoder.layers.{depth}."
