"""The work one step of the decoding loop does, read from the compiled HLO of a tiny model's sampler: a per-layer
model's weights are read in place (no copy of them in the loop) and denoising, greedy or sampled, runs the lm_head
and the proposal at the masked positions, not always over the whole block."""

import functools
import re

import pytest

from dvl_jax.diffusion import kv_cache, sampler
from dvl_jax.diffusion.sampling_config import Prompts, SamplingConfig
from dvl_jax.testing.tiny import tiny_config, tiny_model

CFG = tiny_config()
VOCAB = CFG.text.vocab_size
PROMPTS = Prompts.from_lists([list(range(3, 16))])
TWO_PHASES = Prompts.from_lists([list(range(3, 16)), list(range(3, 6))])  # rows in different phases of their blocks
GREEDY = SamplingConfig(gen_length=16)


@functools.cache
def compiled_hlo(config: SamplingConfig, scan_layers: bool = True) -> str:
  return sampler.lower(tiny_model(CFG.replace(scan_layers=scan_layers)), PROMPTS, config).compile().as_text()


@pytest.mark.parametrize("algorithm", ["block_diffusion", "autoregressive"])
def test_per_layer_weights_are_read_in_place(algorithm):
  """No layer weight matrix (their shapes are no activation's here) is an op's result inside the loop of a
  per-layer model (`scan_layers=False`); the stacked model's loop copies them out of the stacks on CPU."""
  t = CFG.text
  shapes = {(t.hidden_size, t.intermediate_size), (t.intermediate_size, t.hidden_size),
            (t.hidden_size, t.num_heads * t.head_dim), (t.hidden_size, t.num_kv_heads * t.head_dim)}
  pattern = "|".join(rf"(?:1,)?{a},{b}" for a, b in shapes)
  config = SamplingConfig(gen_length=16, algorithm=algorithm)

  def copies(scan_layers: bool) -> list[str]:
    return [line for line in compiled_hlo(config, scan_layers).splitlines()
            if re.search(rf"= f32\[(?:{pattern})\]", line) and "decode_loop" in line]

  assert not copies(scan_layers=False), copies(scan_layers=False)[:3]
  assert copies(scan_layers=True)


def test_greedy_denoising_runs_the_lm_head_only_at_masked_widths():
  """Logits `[w, vocab]` at widths 1, 2, 4 and the whole block 8 (batch 1): the lm_head is not always 8 wide."""
  assert {1, 2, 4, CFG.block_size} <= logits_widths(GREEDY)
  assert sampler.widths(8) == (1, 2, 4, 8) and sampler.widths(6) == (1, 2, 4, 6)
  assert sampler.widths(32, 8) == (1, 2, 4, 8, 16, 24, 32)  # a batch of 4 gathered together


def logits_widths(config: SamplingConfig) -> set[int]:
  return {int(w) for w in re.findall(rf"= f32\[(?:1,)?(\d+),{VOCAB}\]", compiled_hlo(config))}


def lm_head_widths(hlo: str) -> set[int]:
  """The rows of every lm_head product `[w, vocab]` in a compiled program."""
  return {int(w) for w in re.findall(rf"= f32\[(\d+),{VOCAB}\]\S* dot\(", hlo)}


def test_on_one_device_a_batch_gathers_its_masked_positions_together():
  """Batch 2, rows in different phases of their blocks: lm_head products `[w, vocab]` from 1 up to the batch's
  2 x 8 = 16 positions, gathered together (each row gathered alone, as wide as the widest, gives no width 1)."""
  hlo = sampler.lower(tiny_model(CFG), TWO_PHASES, GREEDY).compile().as_text()
  assert lm_head_widths(hlo) == {1, 2, 4, 8, 16}
  assert not re.search(rf"= f32\[2,\d+,{VOCAB}\]\S* dot\(", hlo)


def test_sampled_denoising_runs_the_lm_head_and_the_draw_only_at_masked_positions():
  """A program that may sample (the serving engine's slots) takes the batch's masked positions as greedy decoding
  does: lm_head products at widths 1 to 16 only; where a row samples, the draw (its Gumbel noise's logarithms) over
  `[bs, vocab]` chunks of them, never over every row's whole block `[2, bs, vocab]`."""
  hlo = sampler.lower(tiny_model(CFG), TWO_PHASES, SamplingConfig(gen_length=16, temperature=0.7)).compile().as_text()
  assert lm_head_widths(hlo) == {1, 2, 4, 8, 16}
  assert {int(w) for w in re.findall(rf"= f32\[(\d+),{VOCAB}\]\S* log\(", hlo)} == {CFG.block_size}
  assert not re.search(rf"= f32\[2,{CFG.block_size},{VOCAB}\]", hlo)


def test_lowering_allocates_no_cache(monkeypatch):
  """`sampler.lower` needs shapes only, so it also lowers for devices a process only describes (a TPU or GPU
  compiled for without one: benchmarks/deviceless.py); `generate` still makes its cache."""
  model = tiny_model(CFG)
  monkeypatch.setattr(kv_cache, "init", lambda *_: pytest.fail("lowering allocated a KV cache"))
  for config in (GREEDY, SamplingConfig(gen_length=16, algorithm="autoregressive")):
    text = sampler.lower(model, TWO_PHASES, config).as_text()
    assert re.search(rf"tensor<{CFG.text.num_layers}x2x\d+x{CFG.text.num_kv_heads}x{CFG.text.head_dim}xf32>", text)
  monkeypatch.undo()
  assert sampler.generate(model, TWO_PHASES, GREEDY).cache[0].shape[1] == 2
