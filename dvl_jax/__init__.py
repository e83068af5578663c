"""dvl_jax: DiffusionVL in JAX / Flax NNX.

A Qwen2.5-VL vision-language model turned into a block-diffusion VLM: instead of one token per forward
it denoises a block of masked tokens in a few parallel passes (BD3-LM), reusing a KV cache across blocks.
This package loads and converts Hugging Face / DiffusionVL checkpoints, trains (stage 1, stage 2, AR),
and samples on one device or a ('data', 'fsdp', 'tensor') mesh. The `dvl` command wraps it
(`dvl convert | export | generate | train | demo | bench`, each with --help).

Example, with a checkpoint converted by `dvl convert HF_DIR ckpt`:

    import dvl_jax as dvl
    from PIL import Image
    model, proc = dvl.load("ckpt"), dvl.Processor.from_pretrained("ckpt")
    inputs = proc(dvl.generation_prompt("What is in the image?"), [[Image.open("cat.png")]])
    out = dvl.generate(model, inputs, dvl.SamplingConfig(gen_length=64), tokenizer=proc.tokenizer)
    print(out.clean_text[0], out.nfe[0])  # the answer as DiffusionVL's evaluation scores it, the forwards it took

Public surface (design §3):

    dvl.convert(src_dir, dst_dir)          # HF / DiffusionVL safetensors -> dvl (Orbax) checkpoint
    dvl.export(src_dir, dst_dir)           # dvl checkpoint -> HF Qwen2.5-VL safetensors
    model = dvl.load(ckpt_dir, mesh=None)  # Flax NNX model (dvl.Qwen25VL), params placed on their shardings
    proc  = dvl.Processor.from_pretrained(ckpt_dir)   # prompts with <image> + images -> padded arrays
    logits = model(input_ids, pixel_values=None, image_grid_thw=None, positions="mrope" | "flat")
    out = dvl.generate(model, inputs, dvl.SamplingConfig(...))  # a dvl.GenerateOutput: .tokens .text .nfe ...
    loss, aux = dvl.bd3_loss(model, batch, rng, noise=None)     # noise=(t, move_mask) injectable; dvl.ar_loss
    metrics = dvl.train(config, workdir)   # a training run from an ml_collections config, as `dvl train`

`inputs` is the processor's output, a `dvl.Prompts`, or lists of token ids. `dvl.generation_prompt(question,
num_images)` is DiffusionVL's chat prompt with one `<image>` per image (`dvl.conversation_prompt(turns, system)`
the same for a multi-turn conversation). Token ids in LLaVA's convention (one
-200 per image) become the model's with `dvl.expand_image_placeholders(ids, image_grid_thw,
image_token_id=...)`; `model.image_features(pixel_values, layout)` takes a `dvl.VisionLayout` from
`dvl.vision_layout(image_grid_thw, model.config.vision)`. `out.clean_text` is `out.text` after
`dvl.clean_answer`, the original evaluation's clean-up. `generate(..., on_block=fn)` calls `fn(row, tokens)`
as each block of an answer is final (streaming, same tokens). `dvl.make_mesh` builds a mesh for
`dvl.load(..., mesh=...)`; `dvl.suggest_mesh` picks its shape for sampling (`generate` runs on the mesh
the params are on). `dvl.ModelConfig` / `TextConfig` / `VisionConfig` describe the architecture.

Serving and evaluation: `dvl.Engine(model,
dvl.SamplingConfig(...), slots=8)` batches `dvl.Request`s continuously over the slots of one KV cache, each
request's tokens those of `dvl.generate` on it alone; `dvl.get_task(name)` is a benchmark task (loader, prompt,
scorer as lmms-eval scores it: mmmu_val, mme, ai2d, mmstar, chartqa, realworldqa, synthetic, easy_vqa), and
`dvl.evaluate(model, processor, task)` scores it with AR and block-diffusion decoders (`dvl eval`).

Demo and test helpers (the notebooks use them): `dvl.synthetic`, the shapes VQA data set;
`dvl.word_tokenizer`, a small tokenizer over its words; `dvl.testing`, tiny random models and
checkpoints (JAX and Hugging Face); `dvl.train_demo`, the `dvl demo` recipe (model, run configs, evaluation).

Names resolve on first use, so `import dvl_jax` stays cheap and needs no converter deps.
"""

import importlib

_EXPORTS = {  # name -> the module that defines it
    "convert": "checkpoints_convert",
    "export": "checkpoints_convert",
    "load": "dvl_jax.checkpoints.loading",
    "Processor": "dvl_jax.data.processor",
    "generation_prompt": "dvl_jax.data.chat_template",
    "conversation_prompt": "dvl_jax.data.chat_template",
    "expand_image_placeholders": "dvl_jax.data.image_tokens",
    "vision_layout": "dvl_jax.core.vision_layout",
    "VisionLayout": "dvl_jax.core.vision_layout",
    "make_mesh": "dvl_jax.parallel.mesh",
    "suggest_mesh": "dvl_jax.diffusion.sampling_mesh",
    "ModelConfig": "dvl_jax.core.config",
    "TextConfig": "dvl_jax.core.config",
    "VisionConfig": "dvl_jax.core.config",
    "Qwen25VL": "dvl_jax.models.qwen25vl.model",
    "generate": "dvl_jax.diffusion.sampler",
    "SamplingConfig": "dvl_jax.diffusion.sampling_config",
    "Prompts": "dvl_jax.diffusion.sampling_config",
    "GenerateOutput": "dvl_jax.diffusion.sampling_config",
    "clean_answer": "dvl_jax.diffusion.sampling_config",
    "bd3_loss": "dvl_jax.diffusion.loss",
    "ar_loss": "dvl_jax.diffusion.loss",
    "train": "dvl_jax.training.loop",
    "word_tokenizer": "dvl_jax.data.word_tokenizer",
    "Engine": "dvl_jax.serving.engine",
    "Request": "dvl_jax.serving.request",
    "get_task": "dvl_jax.evaluation.registry",
    "evaluate": "dvl_jax.evaluation.runner",
}
_MODULES = {  # name -> a module exported whole
    "synthetic": "dvl_jax.data.synthetic",
    "testing": "dvl_jax.testing",
    "train_demo": "dvl_jax.demos.train_demo",
}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
  if name in _MODULES:
    value = importlib.import_module(_MODULES[name])
  elif name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  else:
    raise AttributeError(f"module 'dvl_jax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return __all__

