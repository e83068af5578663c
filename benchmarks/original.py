"""Side by side with the original: DiffusionVL's own PyTorch sampler and `dvl.generate` on the same random weights.

`--original` is a checkout of hustvl/DiffusionVL: its `train/` folder goes on the path and its
`DiffusionVLQwenForCausalLM.generate_with_bd3lm` runs as it is (nothing of it is copied here); its AR
baseline is transformers' `Qwen2ForCausalLM.generate` (greedy, DynamicCache) on the same weights. The model is
`benchmarks/sampling.py`'s (hidden 512, 8 layers, GQA 8 / 2; 179M parameters with the full 151,680-row
vocabulary, which the original needs: it hard-codes Qwen's mask id 151671 and EOS id 151645), as a text-only
`qwen2` family model, its lm_head scaled as there and EOS never emitted, fp32, batch 1, one prompt of 40
tokens, `--gen` new tokens, blocks of 8. Every setting of this project must decode exactly the original's
tokens (checked; a mismatch stops the run). Settings alternate inside each repeat (the machine's speed
drifts); tokens/s is `--gen` over the median repeat's wall time. NFE counts the decoder's forwards, prefill
included (the original's by a counter on its decoder; the original also runs the lm_head over the prompt).

    python benchmarks/original.py --original /path/to/DiffusionVL [--gen 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.sampling import FULL_VOCAB, bench_model, table  # noqa: E402
from checkpoints_convert import orbax_stream  # noqa: E402
from dvl_jax.diffusion import sampler  # noqa: E402
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig  # noqa: E402
from dvl_jax.models import key_map, layer_layout  # noqa: E402

QWEN_MASK_ID, QWEN_EOS_ID = 151671, 151645  # what the original's sampler hard-codes
PROMPT_LENGTH = 40
# name: (the original's `generate_with_bd3lm` options, or None for AR; this project's settings)
SETTINGS: dict[str, tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]] = {
    "AR greedy": (None, {"dvl_jax": dict(algorithm="autoregressive")}),
    "static s8": (dict(steps=8, remasking_strategy="low_confidence_static"),
                  {"dvl_jax reference": dict(mode="reference"), "dvl_jax fused": dict(mode="fused")}),
    "dynamic t0.85": (dict(steps=8, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.85),
                      {"dvl_jax reference": dict(mode="reference", remasking_strategy="low_confidence_dynamic"),
                       "dvl_jax fused": dict(mode="fused", remasking_strategy="low_confidence_dynamic")}),
}


def model(lm_head_scale: float, vocab: int = FULL_VOCAB) -> Any:
  """`benchmarks/sampling.py`'s random model as a text-only Qwen2.5 with the real Qwen mask and EOS ids."""
  return bench_model(False, lm_head_scale, vocab, "per-layer", family="qwen2", vision=None,
                     mask_token_id=QWEN_MASK_ID, eos_token_id=QWEN_EOS_ID)


def torch_weights(model: Any) -> dict[str, torch.Tensor]:
  """The model's params under its family's Hugging Face names, as `dvl export` writes them (the key map)."""
  params = orbax_stream.variables(layer_layout.stacked(nnx.state(model, nnx.Param), model.config))
  arrays = {path: np.asarray(var[...], np.float32) for path, var in params.items()}
  weights = {}
  for t in key_map.hub_tensors({path: x.shape for path, x in arrays.items()}, model.config):
    x = arrays[t.param] if t.layer is None else arrays[t.param][t.layer]
    weights[t.name] = torch.from_numpy(np.array(t.transform.to_torch(x, t.shape)))  # an own, writable copy
  return weights


def torch_model(model_class: type, config: Any, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
  module = model_class(config).eval()
  module.load_state_dict(weights, strict=True)
  return module


class Counted:
  """Counts the calls of a module's decoder (its forwards)."""

  def __init__(self, decoder: torch.nn.Module):
    self.calls, forward = 0, decoder.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
      self.calls += 1
      return forward(*args, **kwargs)

    decoder.forward = counted


def originals(original: str, model: Any) -> tuple[Callable, Callable, Counted, Counted]:
  """(the original's block-diffusion sampler, transformers' AR generate), each `(ids [1, P], options) -> [G]` ids,
  and the counters of their decoders."""
  sys.path.insert(0, os.path.join(original, "train"))
  from llava.model.language_model.llava_diffusionvl_qwen import DiffusionVLQwenConfig, DiffusionVLQwenForCausalLM
  from transformers import Qwen2Config, Qwen2ForCausalLM

  weights = torch_weights(model)
  bd = torch_model(DiffusionVLQwenForCausalLM, DiffusionVLQwenConfig(**model.config.to_hf(), enable_bd3lm=True),
                   weights)  # the family's HF config carries `bd3lm_block_size`
  ar = torch_model(Qwen2ForCausalLM, Qwen2Config(**model.config.to_hf()), weights)
  bd_count, ar_count = Counted(bd.model), Counted(ar.model)

  @torch.no_grad()
  def block_diffusion(ids: torch.Tensor, gen: int, options: dict[str, Any]) -> np.ndarray:
    embeds = bd.get_model().embed_tokens(ids)
    return bd.generate_with_bd3lm(inputs_embeds=embeds, gen_length=gen, temperature=0.0, **options)[0].numpy()

  @torch.no_grad()
  def autoregressive(ids: torch.Tensor, gen: int, _: Any) -> np.ndarray:
    out = ar.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].numpy()

  return block_diffusion, autoregressive, bd_count, ar_count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--original", required=True, help="a checkout of hustvl/DiffusionVL (the folder with train/)")
  parser.add_argument("--gen", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--lm-head-scale", type=float, default=40.0)
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.original, "train", "llava", "model", "language_model",
                                     "llava_diffusionvl_qwen.py")):
    parser.error(f"--original {args.original} is not a DiffusionVL checkout (no train/llava/model/language_model/"
                 "llava_diffusionvl_qwen.py); clone https://github.com/hustvl/DiffusionVL there")
  ours = model(args.lm_head_scale)
  block_diffusion, autoregressive, bd_count, ar_count = originals(args.original, ours)
  ids = np.random.default_rng(1).integers(3, 1000, PROMPT_LENGTH)
  prompts, torch_ids = Prompts.from_lists([ids.tolist()]), torch.from_numpy(ids[None]).long()

  runs: dict[tuple[str, str], Callable[[], tuple[np.ndarray, int]]] = {}
  for name in args.settings:
    original_options, ours_settings = SETTINGS[name]
    run, count = (autoregressive, ar_count) if original_options is None else (block_diffusion, bd_count)

    def run_original(run=run, count=count, options=original_options) -> tuple[np.ndarray, int]:
      before = count.calls
      return run(torch_ids, args.gen, options), count.calls - before
    runs[name, "original"] = run_original
    for label, options in ours_settings.items():
      config = SamplingConfig(gen_length=args.gen, **options)

      def run_ours(config=config) -> tuple[np.ndarray, int]:
        out = sampler.generate(ours, prompts, config)
        return np.asarray(out.tokens[0]), int(out.nfe[0])
      runs[name, label] = run_ours

  seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
  outputs: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
  for repeat in range(args.repeats + 1):  # round 0 compiles and warms up
    for key, run in runs.items():
      start = time.perf_counter()
      outputs[key] = run()
      if repeat:
        seconds[key].append(time.perf_counter() - start)
  rows = []
  for (name, label), times in seconds.items():
    tokens, nfe = outputs[name, label]
    reference = outputs[name, "original"][0]
    if not np.array_equal(tokens, reference):
      raise SystemExit(f"{name} / {label} decoded other tokens than the original: {tokens[:16]} vs "
                       f"{reference[:16]} (first 16)")
    rate = args.gen / statistics.median(times)
    vs = args.gen / statistics.median(seconds[name, "original"])
    rows.append((name, label, f"{rate:.1f}", f"{rate / vs:.2f}x", nfe, "yes"))
  table(("setting", "sampler", "tokens/s (median)", "vs original", "NFE", "same tokens"), rows)


if __name__ == "__main__":
  main()
