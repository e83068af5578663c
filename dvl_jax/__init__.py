"""dvl_jax: DiffusionVL in JAX / Flax NNX.

A Qwen2.5-VL vision-language model turned into a block-diffusion VLM: instead of one token per forward
it denoises a block of masked tokens in a few parallel passes (BD3-LM), reusing a KV cache across blocks.
This package loads and converts Hugging Face / DiffusionVL checkpoints, trains (stage 1, stage 2, AR),
and samples on one device or a ('data', 'fsdp', 'tensor') mesh. The `dvl` command wraps it
(`dvl convert | export | generate | train | demo | bench`, each with --help).

Example, with a checkpoint converted by `dvl convert HF_DIR ckpt`:

    import dvl_jax as dvl
    from PIL import Image
    from dvl_jax.data.chat_template import generation_prompt  # DiffusionVL's chat format
    model, proc = dvl.load("ckpt"), dvl.Processor.from_pretrained("ckpt")
    inputs = proc(generation_prompt("What is in the image?"), [[Image.open("cat.png")]])
    out = dvl.generate(model, inputs, dvl.SamplingConfig(gen_length=64), tokenizer=proc.tokenizer)
    print(out.text[0], out.nfe[0])  # the answer, and the model forwards it took

Public surface (design §3):

    dvl.convert(src_dir, dst_dir)          # HF / DiffusionVL safetensors -> dvl (Orbax) checkpoint
    dvl.export(src_dir, dst_dir)           # dvl checkpoint -> HF Qwen2.5-VL safetensors
    model = dvl.load(ckpt_dir, mesh=None)  # Flax NNX model (dvl.Qwen25VL), params placed on their shardings
    proc  = dvl.Processor.from_pretrained(ckpt_dir)   # prompts with <image> + images -> padded arrays
    logits = model(input_ids, pixel_values=None, image_grid_thw=None, positions="mrope" | "flat")
    out = dvl.generate(model, inputs, dvl.SamplingConfig(...))  # .tokens .text .nfe .tokens_per_forward
    loss, aux = dvl.bd3_loss(model, batch, rng, noise=None)     # noise=(t, move_mask) injectable; dvl.ar_loss

`inputs` is the processor's output, a `dvl.Prompts`, or lists of token ids. `generate(..., on_block=fn)`
calls `fn(row, tokens)` as each block of an answer is final (streaming, same tokens). `dvl.make_mesh`
builds a mesh for `dvl.load(..., mesh=...)`; `dvl.suggest_mesh` picks its shape for sampling (`generate`
runs on the mesh the params are on). `dvl.ModelConfig` / `TextConfig` / `VisionConfig` describe the
architecture. Names resolve on first use, so `import dvl_jax` stays cheap and needs no converter deps.
"""

import importlib

_EXPORTS = {
    "convert": "checkpoints_convert",
    "export": "checkpoints_convert",
    "load": "dvl_jax.checkpoints.loading",
    "Processor": "dvl_jax.data.processor",
    "make_mesh": "dvl_jax.parallel.mesh",
    "suggest_mesh": "dvl_jax.diffusion.sampling_mesh",
    "ModelConfig": "dvl_jax.core.config",
    "TextConfig": "dvl_jax.core.config",
    "VisionConfig": "dvl_jax.core.config",
    "Qwen25VL": "dvl_jax.models.qwen25vl.model",
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
