"""dvl_jax: DiffusionVL (Qwen2.5-VL translated into a block-diffusion VLM) in JAX / Flax NNX.

Public surface (design §3):

    import dvl_jax as dvl
    dvl.convert(src_dir, dst_dir)          # HF / DiffusionVL safetensors -> dvl (Orbax) checkpoint
    dvl.export(src_dir, dst_dir)           # dvl checkpoint -> HF Qwen2.5-VL safetensors
    model = dvl.load(ckpt_dir, mesh=None)  # Flax NNX model, params placed on their shardings
    proc  = dvl.Processor.from_pretrained(ckpt_dir)   # prompts with <image> + images -> padded arrays
    logits = model(input_ids, pixel_values=None, image_grid_thw=None, positions="mrope" | "flat")
    out = dvl.generate(model, dvl.Prompts.from_lists(token_lists), dvl.SamplingConfig(...))  # .tokens .nfe ...
    loss, aux = dvl.bd3_loss(model, batch, rng, noise=None)   # noise=(t, move_mask) injectable

`dvl.make_mesh` builds a ('data', 'fsdp', 'tensor') mesh for `dvl.load(..., mesh=...)`; `dvl.suggest_mesh`
picks its shape for sampling (`generate` then runs on the mesh the params are on).
Names resolve on first use, so `import dvl_jax` stays cheap and does not need the converter's deps.
"""

import importlib

_EXPORTS = {
    "convert": "checkpoints_convert",
    "export": "checkpoints_convert",
    "load": "dvl_jax.loading",
    "Processor": "dvl_jax.data.processor",
    "make_mesh": "dvl_jax.parallel.mesh",
    "suggest_mesh": "dvl_jax.parallel.sampling_mesh",
    "ModelConfig": "dvl_jax.config",
    "TextConfig": "dvl_jax.config",
    "VisionConfig": "dvl_jax.config",
    "Qwen25VL": "dvl_jax.model.vlm",
    "generate": "dvl_jax.diffusion.sampler",
    "SamplingConfig": "dvl_jax.diffusion.sampling_config",
    "Prompts": "dvl_jax.diffusion.sampling_config",
    "bd3_loss": "dvl_jax.diffusion.loss",
    "ar_loss": "dvl_jax.diffusion.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'dvl_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
