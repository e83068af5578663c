"""Tiny Qwen2.5-VL checkpoints in every layout of spec §8, all written from one PyTorch state dict."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re

import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file

from checkpoints_convert import orbax_stream
from dvl_jax.core.config import ModelConfig
from dvl_jax.testing.tiny import tiny_config
from dvl_jax.checkpoints.loading import load
from dvl_jax.models.families import abstract_model
from dvl_jax.testing.tiny import build_hf_model

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 64}',
    "vocab.json": '{"a": 0}',
    "merges.txt": "#version: 0.2\n",
    "preprocessor_config.json": '{"patch_size": 14}',
    "chat_template.json": '{"chat_template": "{{ messages }}"}',
}


@dataclasses.dataclass
class Tiny:
  """A tiny random model and its state dict in the in-memory (transformers >= 4.52) naming."""

  cfg: ModelConfig
  model: torch.nn.Module
  state: dict[str, torch.Tensor]

  @property
  def tied(self) -> bool:
    return self.cfg.text.tie_word_embeddings


def tiny(tied: bool, seed: int = 0) -> Tiny:
  cfg = tiny_config()
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
  model = build_hf_model(cfg, seed=seed)
  return Tiny(cfg, model, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})


# ---- layouts ---------------------------------------------------------------------------------------

def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
  out = {}
  for name, value in state.items():
    for pattern, repl in rules:
      name = re.sub(pattern, repl, name)
    out[name] = value
  return out


def hub_state(t: Tiny) -> dict[str, torch.Tensor]:
  """Hub names (`visual.*`, `model.*`), lm_head only when untied, as `save_pretrained` writes them."""
  state = _rename(t.state, [(r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model.")])
  return {k: v for k, v in state.items() if not (t.tied and k == "lm_head.weight")}


def write_side_files(path: str, config: dict | None) -> None:
  """Tokenizer / processor stand-ins and, unless None, `config.json`."""
  os.makedirs(path, exist_ok=True)
  for name, text in SIDE_FILES.items():
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)


def write_hub(path: str, t: Tiny, dtype: torch.dtype | None = None, max_shard_size: str = "2GB") -> str:
  model = t.model if dtype is None else copy.deepcopy(t.model).to(dtype)
  model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
  write_side_files(path, None)
  return path


def write_transformers(path: str, t: Tiny) -> str:
  """The in-memory layout, lm_head included even when tied (equal to the embedding)."""
  write_side_files(path, t.cfg.to_hf())
  save_file(t.state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return path


def diffusionvl_config(cfg: ModelConfig) -> dict:
  """DiffusionVL's config.json (spec §8.1): correct `text_config`, wrong top-level text fields."""
  hf = cfg.to_hf()
  return {"model_type": "diffusionvl_qwenvl", "architectures": ["DiffusionVLQwenVLForCausalLM"],
          "hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 29568, "num_attention_heads": 64,
          "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_scaling": None, "vocab_size": 152064,
          "tie_word_embeddings": not cfg.text.tie_word_embeddings, "text_config": hf["text_config"],
          "vision_config": hf["vision_config"], "image_token_id": cfg.image_token_id,
          "video_token_id": cfg.video_token_id, "enable_bd3lm": False, "bd3lm_block_size": 4,
          **{k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id",
                                "vision_end_token_id")},
          # Real DiffusionVL configs omit it (151671 fits their vocabulary); a tiny vocabulary cannot.
          "mask_token_id": cfg.mask_token_id}


def write_training(path: str, t: Tiny) -> str:
  """DiffusionVL training layout: LM in model.safetensors, tower and projector in files of their own."""
  hub = hub_state(t)
  write_side_files(path, diffusionvl_config(t.cfg))
  with open(os.path.join(path, "vision_config.json"), "w") as f:
    json.dump(t.cfg.to_hf()["vision_config"], f)
  lm = {k: v for k, v in hub.items() if not k.startswith("visual.")}
  tower = {k[len("visual."):]: v for k, v in hub.items() if k.startswith("visual.") and ".merger." not in k}
  projector = {k[len("visual.merger."):]: v for k, v in hub.items() if k.startswith("visual.merger.")}
  for name, part in (("model", lm), ("vision_tower", tower), ("projector", projector)):
    save_file(part, os.path.join(path, f"{name}.safetensors"), metadata={"format": "pt"})
  return path


def write_released(path: str, t: Tiny, shards: int = 2) -> str:
  """Released DiffusionVL layout, sharded with an index json."""
  state = _rename(hub_state(t), [(r"^visual\.merger\.", "model.mm_projector.merger."),
                                 (r"^visual\.", "model.vision_tower.vision_tower.")])
  write_sharded(path, state, shards)
  write_side_files(path, diffusionvl_config(t.cfg))
  return path


def write_sharded(path: str, state: dict[str, torch.Tensor], shards: int) -> None:
  os.makedirs(path, exist_ok=True)
  names = sorted(state)
  weight_map = {}
  for k, part in enumerate(np.array_split(np.array(names), shards)):
    file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    save_file({n: state[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


# ---- reading results -------------------------------------------------------------------------------

def loaded_params(ckpt_dir: str, **kwargs) -> dict[str, np.ndarray]:
  """The params of a converted checkpoint through the public `load`, by dotted path."""
  _, state = nnx.split(load(ckpt_dir, **kwargs), nnx.Param)
  return {".".join(p): np.asarray(v[...]) for p, v in orbax_stream.variables(state).items()}


def expected_params(t: Tiny) -> dict[str, np.ndarray]:
  """Independent oracle: the params `Qwen25VL` should hold, derived from the state dict by name rules."""
  special = {"visual.patch_embed": "model.visual.patch_embed.proj", "visual.merger.mlp_in": "model.visual.merger.mlp.0",
             "visual.merger.mlp_out": "model.visual.merger.mlp.2", "lm_head": "lm_head"}
  out = {}
  for p, var in _abstract_params(t.cfg).items():
    module, leaf = p.rsplit(".", 1)
    hf = special.get(module) or re.sub(r"^text\.", "model.language_model.",
                                       re.sub(r"^visual\.", "model.visual.", module))
    hf += ".bias" if leaf == "bias" else ".weight"

    def get(name):
      x = t.state[name].float().numpy()
      if leaf != "kernel":
        return x
      return x.reshape(x.shape[0], -1).T if "patch_embed" in name else x.T

    if ".layers." in hf or ".blocks." in hf:
      n = var.shape[0]
      out[p] = np.stack([get(re.sub(r"\.(layers|blocks)\.", rf".\1.{i}.", hf)) for i in range(n)])
    else:
      out[p] = get(hf)
  return out


def _abstract_params(cfg: ModelConfig) -> dict[str, nnx.Variable]:
  _, state = nnx.split(abstract_model(cfg), nnx.Param)
  return {".".join(p): v for p, v in orbax_stream.variables(state).items()}
