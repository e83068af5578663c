"""`dvl demo --from-lm`: DiffusionVL-Qwen's two stages (spec §7.2) on a CPU, from a text-only LM and a SigLIP tower.

1. a small Qwen2 LM (`qwen2` family) learns the synthetic task's language as text (`dvl train`, stage "ar") and is
   saved as a Hugging Face `Qwen2ForCausalLM` checkpoint (`dvl export`): the "Qwen2.5-7B-Instruct" of the recipe;
2. a randomly initialised SigLIP-architecture tower (56-px images = 2x2 patches of 28) is saved as a Hugging
   Face SigLIP checkpoint: the "SigLIP2-so400m";
3. `dvl convert --lm --vision` builds stage 1's start (tower minus its last layer, a new mlp2x_gelu projector);
   stage 1 trains the projector alone with the AR loss on square images at lr 1e-3 (`dvl train`, "stage1");
4. the projector goes out as `mm_projector.bin` and `dvl convert --lm --vision --stage 2 --projector` builds
   stage 2's start (anyres_max_4 + spatial_unpad, a new `image_newline`); stage 2 trains everything with BD3-LM,
   the tower and the projector at their own lower learning rate (`dvl train`, "stage2");
5. held-out questions (another seed): AR greedy decoding of the stage-1 model (the AR VLM the diffusion model
   starts from) vs static / dynamic / threshold block diffusion of the stage-2 model, in the first demo's table.

Why these choices:
- the LM's text: each row is a scene written out in the task's words (the fixed-width "cells" description,
  "the top left red circle , the top right zero shapes , ...") followed by a question and its answer. An LM that reads
  answers off a description is what LLaVA's recipe assumes (a pretrained LM that understands the words; the
  projector only has to bring the image into that space). 300 steps cost ~15 s. Measured: with a random LM
  stage 1's loss stays at 4.56 nats (uniform over the 128 words is 4.85), its AR model answers nothing; with the
  text-pretrained LM it falls to 0.05 and the stage-1 model answers 75% of the held-out questions;
- the tower stays random (nothing can be downloaded) and small, in 28-px patches: one patch per grid cell of the
  56-px image, so its patch embedding sees a whole shape. DiffusionVL's mlp2x_gelu projector works on one patch at
  a time (no 2x2 merge as in Qwen2.5-VL), and with 14-px patches (four per cell) the shape stayed at chance
  through stage 2 (900 steps, tower at 1e-4: exact match 70.7%, every colour / count / position right, 8 of 36
  shapes) while the tower moved by 4% of its norm; SigLIP's learned absolute position embeddings say which cell a
  patch is;
- stage 1 trains only the projector of a frozen random tower and the frozen LM, so its AR answers are what a
  connector alone can get out of random features (with 28-px patches: every colour, 80% of the shapes); stage 2
  (everything trains, as in DiffusionVL, whose stage 2 is the only stage that touches the LM and the tower) keeps
  the first demo's finetuning rates, 3e-4 for the LM and 3e-5 for the tower and the projector: at 1e-3 / 3e-4 it
  unlearned what stage 1 had found (shapes 15 of 36, descriptions 6 of 29; block diffusion 65%, AR 75%);
- 56-px images are one crop: anyres_max_4's best fit for a 56x56 image is the 1x1 grid whatever the pinpoints, so
  stage 2 sees the global view plus one crop (2 x 4 patch tokens) with a newline per row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

from dvl_jax.core.config import ModelConfig
from dvl_jax.data import synthetic
from dvl_jax.data.word_tokenizer import word_tokenizer
from dvl_jax.demos import train_demo
from dvl_jax.demos.train_demo import VOCAB_SIZE, DemoSize, combined, evaluate

BAR = 0.80  # every block-diffusion decoder in a full run; one run (seed 0) reached 87.5% (see `passed`)


@dataclasses.dataclass(frozen=True)
class Size:
  """Data, steps and learning rates of one run. Stage 2's tower and projector train at `vision_learning_rate`
  (train_demo.DemoSize says why: at the LM's rate their features churn and the LM learns to ignore them)."""

  train_examples: int
  eval_examples: int
  lm_steps: int  # text-only AR pretraining of the LM; 0 = a random LM
  stage1_steps: int
  stage2_steps: int
  batch_size: int = 32
  lm_learning_rate: float = 1e-3
  stage1_learning_rate: float = 1e-3  # spec §7.2
  stage2_learning_rate: float = 3e-4
  vision_learning_rate: float = 3e-5
  per_layer: bool = True  # evaluate with per-layer weights (train_demo.DemoSize.per_layer)


FULL = Size(train_examples=8192, eval_examples=256, lm_steps=300, stage1_steps=300, stage2_steps=500)
QUICK = Size(train_examples=128, eval_examples=16, lm_steps=8, stage1_steps=8, stage2_steps=8, batch_size=16,
             per_layer=False)


def lm_config(vocab_size: int = VOCAB_SIZE) -> ModelConfig:
  """The first demo's 4-layer decoder as a text-only Qwen2 LM, with its token ids (the image and mask ids are
  reserved in the tokenizer; a Qwen2 config.json names neither, so they are passed to the conversion)."""
  return train_demo.demo_model_config(vocab_size).replace(family="qwen2", vision=None)


PATCH_SIZE = 28  # one patch per grid cell of the 56-px image (see the module docstring)


def save_siglip(dst: str, cfg: ModelConfig, *, depth: int = 4, seed: int = 0) -> str:
  """A random SigLIP vision tower of `depth` + 1 layers (conversion drops the last) on 56-px images in
  `PATCH_SIZE` patches, the LM's width, saved as a Hugging Face checkpoint."""
  import torch
  import transformers

  torch.manual_seed(seed)
  hidden = cfg.text.hidden_size
  config = transformers.SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                           num_hidden_layers=depth + 1, num_attention_heads=4,
                                           image_size=synthetic.IMAGE_SIZE, patch_size=PATCH_SIZE)
  transformers.SiglipVisionModel(config).eval().save_pretrained(dst)
  return dst


def write_text_dataset(out_dir: str, n: int, seed: int) -> str:
  """The LM's text: scene description (the "cells" answer), question, answer; no images."""
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for i, ex in enumerate(synthetic.examples(n, seed)):
    scene = synthetic.answer("cells", ex.items)
    rows.append({"id": f"text-{seed}-{i}", "conversations": [
        {"from": "human", "value": f"{scene}\n{ex.question}"}, {"from": "gpt", "value": ex.answer}]})
  path = os.path.join(out_dir, "text.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  return path


def stage_config(stage: str, init: str, data_json: str, *, steps: int, learning_rate: float, size: Size,
                 seed: int) -> Any:
  """train_demo's run config with this family's settings: no pixel bounds (fixed-size crops); stage 1's
  projector at the stage's own rate (it is all that trains), stage 2's tower and projector at the vision rate."""
  demo_size = DemoSize(train_examples=size.train_examples, eval_examples=size.eval_examples, ar_steps=0,
                       diffusion_steps=0, batch_size=size.batch_size, vision_learning_rate=size.vision_learning_rate)
  c = train_demo.run_config(stage, init, data_json, steps=steps, learning_rate=learning_rate, size=demo_size,
                            seed=seed, log_every=max(1, min(20, steps // 2)))
  c.data.min_pixels = c.data.max_pixels = None
  c.data.square_pad = None  # the family's default: square (stage 1) / anyres (stage 2) as the config says
  if stage == "stage1":
    c.optimizer.projector_learning_rate = learning_rate
  return c


def run(workdir: str | None = None, *, quick: bool = False, seed: int = 0, progress: bool = True,
        size: Size | None = None) -> dict[str, Any]:
  """Runs the five stages; prints and returns `{"results": {group: evaluator results}, "workdir", "seconds",
  "dirs"}`."""
  import dvl_jax as dvl
  from checkpoints_convert import convert_from_lm, export_mm_projector

  size = size or (QUICK if quick else FULL)
  workdir = workdir or tempfile.mkdtemp(prefix="dvl-demo-from-lm-")
  d = {name: os.path.join(workdir, name) for name in (
      "lm_init", "lm", "lm_hf", "siglip", "stage1_start", "stage1", "stage2_start", "stage2")}
  tic = time.perf_counter()
  data_json = synthetic.write_dataset(os.path.join(workdir, "data"), size.train_examples, seed=1000 + seed)
  cfg = lm_config()
  tokenizer = word_tokenizer(synthetic.corpus(), cfg)
  train_demo.init_checkpoint(d["lm_init"], cfg, tokenizer, seed)
  lm = d["lm_init"]
  if size.lm_steps:
    print(f"[1/5] text-only AR pretraining of a {cfg.text.num_layers}-layer Qwen2 LM on the task's language "
          f"(scene description, question, answer; {size.lm_steps} steps)")
    text_json = write_text_dataset(os.path.join(workdir, "text"), size.train_examples, seed=3000 + seed)
    lm = train_demo._train(d["lm"], stage_config("ar", lm, text_json, steps=size.lm_steps,
                                                 learning_rate=size.lm_learning_rate, size=size, seed=seed), progress)
  else:
    print(f"[1/5] a random {cfg.text.num_layers}-layer Qwen2 LM (no pretraining)")
  dvl.export(lm, d["lm_hf"], progress=False)
  print(f"[2/5] a random SigLIP tower, saved as Hugging Face checkpoints: LM {d['lm_hf']}, tower {d['siglip']}")
  save_siglip(d["siglip"], cfg, seed=seed)
  ids = dict(mask_token_id=cfg.mask_token_id, image_token_id=cfg.image_token_id)

  print(f"[3/5] dvl convert --lm --vision (stage 1 start); stage 1: the projector alone, AR loss, square images "
        f"({size.stage1_steps} steps, lr {size.stage1_learning_rate:g})")
  convert_from_lm(d["lm_hf"], d["siglip"], d["stage1_start"], seed=seed, progress=False, **ids)
  stage1 = train_demo._train(d["stage1"], stage_config(
      "stage1", d["stage1_start"], data_json, steps=size.stage1_steps, learning_rate=size.stage1_learning_rate,
      size=size, seed=seed), progress)

  projector = export_mm_projector(stage1, os.path.join(workdir, "mm_projector.bin"))
  print(f"[4/5] mm_projector.bin -> dvl convert --stage 2 --projector; stage 2: BD3-LM, everything trains, anyres "
        f"({size.stage2_steps} steps, lr {size.stage2_learning_rate:g}, tower {size.vision_learning_rate:g})")
  convert_from_lm(d["lm_hf"], d["siglip"], d["stage2_start"], projector=projector, stage=2, seed=seed,
                  progress=False, **ids)
  stage2 = train_demo._train(d["stage2"], stage_config(
      "stage2", d["stage2_start"], data_json, steps=size.stage2_steps, learning_rate=size.stage2_learning_rate,
      size=size, seed=seed), progress)

  print(f"[5/5] evaluation on {size.eval_examples} held-out questions (AR: the stage-1 model)")
  # the first demo's evaluator and table on the task's default kinds (one- to three-word answers: this
  # demo's models never see the long ones); each model with its own stage's processor (square / anyres crops)
  results = evaluate(stage1, stage2, os.path.join(workdir, "eval"), data=f"{2000 + seed}:{size.eval_examples}",
                     groups={"short": synthetic.QUESTION_KINDS}, latency_groups={}, pixels=None, progress=progress,
                     per_layer=size.per_layer)
  seconds = time.perf_counter() - tic
  print(f"total {seconds:.0f} s; runs in {workdir}")
  return {"results": results, "workdir": workdir, "seconds": seconds,
          "dirs": {**d, "lm": lm, "stage1": stage1, "stage2": stage2, "projector": projector}}


def passed(results: dict[str, dict[str, Any]]) -> bool:
  """The bar of a full run: every block-diffusion decoder >= `BAR` exact match."""
  return all(r["exact_match"] >= BAR for name, r in combined(results).items() if name != "ar")
